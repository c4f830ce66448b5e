"""Experiment tracking: what a run logs while it runs, for TensorBoard, W&B or a CSV file.

Switched on with ``--logger tensorboard,wandb,csv`` or ``loggers: [tensorboard, csv]`` in the
YAML. Loggers never change what a run computes, so they are not part of its identity (the
config hash) and turning one on does not invalidate a cached record. Each run writes under
``<output_dir>/logs/<run_id>/``:

* ``tensorboard/`` — event files (``tensorboard --logdir <output_dir>/logs``);
* ``wandb/`` — a W&B run (``WANDB_MODE=offline`` keeps it on disk; ``wandb sync`` uploads it);
* ``metrics.csv`` — one row per logged value: ``metric, step, value``.

What is logged:

* ``train/loss`` and ``train/lr`` after every training step, at step = the global training
  step (0-based, counted over all tasks; ``train/lr/group_<i>`` too when the optimizer has
  several parameter groups with their own rates). The losses are kept on the device and read
  together every ``Tracker.flush_every`` steps, at the end of each epoch, before each checkpoint
  and on close (reading one every step would make the host wait for the device every step);
* after the evaluation of session ``t``, at step ``t`` (0-based): ``recall/<direction>/R@<K>/
  task_<name>`` = ``R[t][j]`` for every evaluated task ``j`` (the row ``t`` of the recall
  matrices in the record), and ``routing/<image|text>/task_<name>`` for methods that route.
  Under ``protocol.tasks=all`` the evaluation before training is logged as ``recall_initial/...``
  at step 0.

**Avalanche's loggers or the libraries?** All three are Avalanche loggers in the sense of its
interface: each is a :class:`~avalanche.logging.BaseLogger` fed
:class:`~avalanche.evaluation.metric_results.MetricValue` objects through ``log_metrics`` (the call
``EvaluationPlugin`` makes). The values are not produced by Avalanche metrics, though: recall is
computed by :mod:`benchmark.evaluation` outside the strategy's ``eval`` loop, so the harness
builds the ``MetricValue`` objects itself and hands them to the loggers instead of registering
metrics with the strategy's ``EvaluationPlugin``. Then:

* TensorBoard: Avalanche's own :class:`~avalanche.logging.TensorboardLogger`. It takes any
  scalar and assumes nothing about classification; the only change is the writer's
  ``purge_step`` when a run continues from a checkpoint, so the steps trained after that
  checkpoint and before the interruption are hidden instead of drawn twice.
* W&B: the wandb library directly (:class:`WandbLogger`). Avalanche 0.6's ``WandBLogger`` would
  fit the interface, but it does not run against the wandb release installed here (0.31): it
  calls ``wandb.util.generate_id`` and ``wandb.viz.CustomChart``, which are gone. W&B also needs
  one increasing step for everything, so the W&B step counts logged events, and ``train/step``
  and ``session`` are logged beside the values and declared as their x-axes (``define_metric``).
  A resumed run starts a new W&B run with the same name and group (the run id) and is given the
  finished sessions' rows again.
* CSV: the ``csv`` module (:class:`CsvLogger`, one row per value, flushed as it goes).
  Avalanche's ``CSVLogger`` only picks the ``Top1_Acc_*`` and ``Loss_*`` values of classification
  out of its callbacks and would write none of these values. On resume, the rows after the
  checkpoint are dropped before the run continues.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from avalanche.logging import BaseLogger

from .config import LOGGERS
from .errors import ConfigError, one_line
from .evaluation import DIRECTIONS, KS

log = logging.getLogger(__name__)
_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it needs


def logs_folder(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / "logs" / run_id


def check_loggers(names: Iterable[str]) -> None:
    """Fail before any training when a requested logger's package is missing."""
    for name in names:
        package = _NEEDS.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger {name!r} needs the {package} package, which is not installed: "
                              f"pip install {package}, or drop {name} from --logger / loggers")


# ============================================================================ sinks


def _values(values: dict[str, float], step: int) -> list[MetricValue]:
    return [MetricValue(None, name, float(value), step) for name, value in values.items()]


class CsvLogger(BaseLogger):
    """An Avalanche logger (``log_metrics`` of ``MetricValue``) writing ``metric, step, value`` rows."""

    FIELDS = ("metric", "step", "value")

    def __init__(self, path: Path, keep=None):
        """``keep(metric, step) -> bool``: on resume, the rows of the earlier attempt to keep."""
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if keep is not None and path.exists():
            with path.open(newline="", encoding="utf-8") as old:
                rows = [r for r in csv.DictReader(old) if keep(r["metric"], int(r["step"]))]
        self.file = path.open("w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        self.writer.writerow(self.FIELDS)
        self.writer.writerows([r[f] for f in self.FIELDS] for r in rows)
        self.file.flush()

    def log_metrics(self, metric_values: list[MetricValue]) -> None:
        for value in metric_values:
            self.writer.writerow((value.name, value.x_plot, repr(float(value.value))))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Sink:
    """One logger, with the step convention it needs."""

    def __init__(self, logger):
        self.logger = logger

    def train(self, values: dict[str, float], step: int) -> None:
        self.logger.log_metrics(_values(values, step))

    def session(self, values: dict[str, float], session: int) -> None:
        self.logger.log_metrics(_values(values, session))

    def to_relog(self, train_steps: int, sessions: int) -> tuple[bool, range]:
        """On resume: whether the initial evaluation, and which finished sessions, this logger must be
        given again (``train_steps`` steps and ``sessions`` sessions were done at the checkpoint)."""
        return False, range(0)

    def close(self) -> None:
        self.logger.close()


class _TensorBoard(_Sink):
    def __init__(self, folder: Path, purge_step: int | None):
        from avalanche.logging import TensorboardLogger
        from torch.utils.tensorboard import SummaryWriter

        class Logger(TensorboardLogger):
            # Avalanche's logger with the writer's purge_step (the steps after a checkpoint are hidden).
            def _make_writer(self, tb_log_dir, filename_suffix):
                writer = SummaryWriter(tb_log_dir, filename_suffix=filename_suffix, purge_step=purge_step)
                weakref.finalize(self, SummaryWriter.close, writer)
                return writer

        super().__init__(Logger(tb_log_dir=folder))
        self.purge_step = purge_step

    def to_relog(self, train_steps: int, sessions: int) -> tuple[bool, range]:
        # purge_step hides every tag's events at steps >= train_steps, session rows included.
        return train_steps == 0, range(min(train_steps, sessions), sessions)

    def close(self) -> None:
        self.logger.writer.close()


class WandbLogger(BaseLogger):
    """A W&B run written with the wandb library (see the module docstring for why not Avalanche's):
    each ``log_metrics`` call is one ``Run.log`` of its values at its step."""

    def __init__(self, folder: Path, run_id: str, config: dict[str, Any]):
        super().__init__()
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "clvl-benchmark"), name=run_id, group=run_id,
                              dir=str(folder), config=config, settings=wandb.Settings(console="off", save_code=False))

    def log_metrics(self, metric_values: list[MetricValue]) -> None:
        for step in dict.fromkeys(value.x_plot for value in metric_values):
            self.run.log({v.name: v.value for v in metric_values if v.x_plot == step}, step=step)

    def close(self) -> None:
        self.run.finish()


class _WandB(_Sink):
    def __init__(self, folder: Path, run_id: str, config: dict[str, Any]):
        try:
            logger = WandbLogger(folder, run_id, config)
        except ImportError:
            raise ConfigError("logger 'wandb' needs the wandb package, which is not installed: pip install wandb, "
                              "or drop wandb from --logger / loggers") from None
        except Exception as error:  # wandb's own errors (no API key, no network, ...)
            raise ConfigError(f"W&B could not start a run ({one_line(error)}); run `wandb login`, or set "
                              "WANDB_MODE=offline to keep the run on disk") from None
        super().__init__(logger)
        run = logger.run
        run.define_metric("train/step")
        run.define_metric("train/*", step_metric="train/step")
        run.define_metric("session")
        for prefix in ("recall", "recall_initial", "routing"):
            run.define_metric(f"{prefix}/*", step_metric="session")
        self.events = 0

    def train(self, values: dict[str, float], step: int) -> None:
        self.logger.log_metrics(_values({**values, "train/step": step}, self.events))
        self.events += 1

    def session(self, values: dict[str, float], session: int) -> None:
        self.logger.log_metrics(_values({**values, "session": session}, self.events))
        self.events += 1

    def to_relog(self, train_steps: int, sessions: int) -> tuple[bool, range]:
        return True, range(sessions)  # a new W&B run: give it the finished sessions too


class _Csv(_Sink):
    def __init__(self, path: Path, resume: tuple[int, int] | None):
        keep = None
        if resume is not None:
            train_steps, sessions = resume

            def keep(metric: str, step: int) -> bool:
                if metric.startswith("train/"):
                    return step < train_steps
                return metric.startswith("recall_initial/") or step < sessions

        super().__init__(CsvLogger(path, keep))


# ============================================================================ the tracker


class Tracker(SupervisedPlugin):
    """The loggers of one run: a plugin for the per-step values, ``log_session`` after each evaluation."""

    flush_every = 50  # training steps whose losses are read from the device in one go

    supports_distributed = True  # Avalanche's flag: under --ddp only process 0's tracker has loggers

    def __init__(self, sinks: list[_Sink], task_names: list[str]):
        super().__init__()
        self.sinks, self.task_names = sinks, list(task_names)
        self.pending: list[tuple[int, Any, list[float]]] = []  # (step, loss on the device, rates)

    def after_training_iteration(self, strategy, **kwargs):
        if not self.sinks:
            return
        # Avalanche's clock counts this step after the plugins: train_iterations is its 0-based index.
        step = int(strategy.clock.train_iterations)
        rates = [float(group["lr"]) for group in strategy.optimizer.param_groups]
        self.pending.append((step, strategy.train_loss, rates))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def after_training_epoch(self, strategy, **kwargs):
        self.flush()

    def flush(self) -> None:
        """Hand the buffered training steps to the loggers (one read of their losses from the device)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        losses = torch.stack([torch.as_tensor(loss, dtype=torch.float32).reshape(())
                              for _, loss, _ in pending]).tolist()
        for (step, _, rates), loss in zip(pending, losses):
            values = {"train/loss": loss, "train/lr": rates[0]}
            if len(set(rates)) > 1:
                values.update({f"train/lr/group_{i}": rate for i, rate in enumerate(rates)})
            for sink in self.sinks:
                sink.train(values, step)

    def session_values(self, recall: dict, routing: dict | None, session: int,
                       prefix: str = "recall") -> dict[str, float]:
        """The scalars of one evaluation: ``recall[d][K][j]`` (one row) and ``routing[m][j]``."""
        values = {}
        for d in DIRECTIONS:
            for k in KS:
                for j, value in enumerate(recall[d][k]):
                    if value is not None:
                        values[f"{prefix}/{d}/R@{k}/task_{self.task_names[j]}"] = value
        for modality, row in (routing or {}).items():
            for j, value in enumerate(row):
                if value is not None:
                    values[f"routing/{modality}/task_{self.task_names[j]}"] = value
        return values

    def log_session(self, session: int, recall: dict, routing: dict | None, sinks=None) -> None:
        values = self.session_values(recall, routing, session)
        for sink in self.sinks if sinks is None else sinks:
            sink.session(values, session)

    def log_initial(self, recall: dict, sinks=None) -> None:
        values = self.session_values(recall, None, 0, prefix="recall_initial")
        for sink in self.sinks if sinks is None else sinks:
            sink.session(values, 0)

    def resumed(self, train_steps: int, state) -> None:
        """After a resume: give each logger the finished sessions' rows it lacks (``state``: the run's _State)."""
        for sink in self.sinks:
            initial, sessions = sink.to_relog(train_steps, state.completed)
            if initial and state.initial is not None:
                self.log_initial(state.initial, [sink])
            for t in sessions:
                row = {d: {k: state.recall[d][k][t] for k in KS} for d in DIRECTIONS}
                routing = None if state.routing is None else {m: state.routing[m][t] for m in state.routing}
                self.log_session(t, row, routing, [sink])

    def close(self) -> None:
        try:
            self.flush()
        except Exception as error:  # as below: a logger's failure must not hide the run's own outcome
            log.warning("logging the last training steps failed: %s", one_line(error))
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as error:  # a logger that fails to close must not hide the run's own outcome
                log.warning("closing a logger failed: %s", one_line(error))


def open_tracker(names: list[str], folder: Path, run_id: str, task_names: list[str], config: dict[str, Any],
                 resume: tuple[int, int] | None = None) -> Tracker:
    """The loggers ``names`` for one run, writing under ``folder``.

    ``resume``: (training steps, finished sessions) of the checkpoint the run continues from.
    """
    check_loggers(names)
    sinks: list[_Sink] = []
    try:
        for name in names:
            if name == "tensorboard":
                sinks.append(_TensorBoard(folder / "tensorboard", None if resume is None else resume[0]))
            elif name == "wandb":
                sinks.append(_WandB(folder, run_id, config))
            elif name == "csv":
                sinks.append(_Csv(folder / "metrics.csv", resume))
            else:
                raise ConfigError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    except BaseException:
        Tracker(sinks, task_names).close()
        raise
    if sinks:
        log.info("logging %s to %s", ", ".join(names), folder)
    return Tracker(sinks, task_names)
