"""Run methods x seeds on one scenario and write one record per run.

For each method and seed: seed every RNG, load a fresh backbone, build the method, train it
task by task through :class:`~benchmark.strategy.ContrastiveStrategy`, evaluate after every
session (:mod:`benchmark.evaluation`), save a checkpoint after every session
(:mod:`benchmark.checkpoint`), and at the end write the run record atomically to
``<output_dir>/runs/<run_id>.json`` and delete the checkpoint.

**Identity and the result cache.** A run's id ends with its config hash, a SHA-256 of the
effective config (method and its hyperparameters, scenario and its options, backbone,
protocol, training settings, seed, device type), the code version and the data identity
(:mod:`benchmark.provenance`). A run whose record exists is finished: a rerun of the same grid
skips it and says so, ``force`` reruns it. Changing the code that computes results, the data
files or any setting gives a new id, so a stale record is never taken for a current one.

**Interrupted runs.** A run without a record but with a checkpoint was interrupted. ``resume``
continues it from the checkpoint and reaches the same recall matrices as an uninterrupted run
(bit-identical on the CPU; on CUDA with ``training.deterministic``); ``force`` starts it over;
with neither, ``run`` stops before training anything and says which runs could be continued.
The first Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next safe point: inside a
task after the current step (a checkpoint of that step is saved), otherwise after the current
evaluation (the task's checkpoint is saved). A second signal stops at once, losing the work
since the last checkpoint.

**Failures** keep the last checkpoint: a corrupt image or a NaN loss stops the run with an
error that says where its checkpoint is; a failed write (full disk, no permission) leaves the
previous file intact and says what to do.

**Watching a run.** Each task's training and each evaluation has a progress bar; log lines are
printed above the bars (``tqdm.contrib.logging``). Every run writes the harness's log lines to
``<output_dir>/runs/<run_id>.log`` beside its record, line by line (a crash leaves it; a resumed
or rerun run appends to it). The loggers of ``loggers`` / ``--logger`` (:mod:`benchmark.tracking`)
write under ``<output_dir>/logs/<run_id>/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from methods import get_method
from methods.base import Method, TrainData

from . import checkpoint as ckpt
from . import provenance, tracking
from .backbone import default_cache_dir, load_backbone
from .config import RunConfig, coerce_to_fields, config_hash
from .errors import (BenchmarkError, CheckpointError, ConfigError, OutputError, RunInterrupted,
                     TrainingDiverged, one_line)
from .evaluation import DIRECTIONS, KS, evaluate_session, items_to_encode
from .io import atomic_write_json
from .scenarios import Scenario, build_scenario
from .scenarios.streams import Streams, make_streams
from .strategy import ContrastiveStrategy, ResumePoint, clock_state, restore_clock

log = logging.getLogger(__name__)
RECORD_SCHEMA = "clvl-benchmark/run-record/v1"
# Per-query ranks are stored one character each: "0".."9" for ranks 0..9, "x" for 10 or worse.
# Enough for recall at K <= 10 (KS), and 25k queries cost 25 kB.
RANK_CHARS = "0123456789"
RANK_BEYOND = "x"


@dataclasses.dataclass
class RunControl:
    """How to run, as opposed to what: never part of a run's identity."""

    resume: bool = False  # continue interrupted runs from their checkpoints
    keep_checkpoints: bool = False  # keep a finished run's checkpoint (default: deleted once its record is written)
    checkpoint_every: int = 0  # also save a checkpoint every N training steps inside a task (0: after each task only)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``training.deterministic``: only deterministic kernels (CUDA), restored afterwards.

    CPU runs are reproducible without it (same machine, same thread count). On CUDA, cuBLAS
    also needs ``CUBLAS_WORKSPACE_CONFIG``, which must be set before its first use: here,
    before the backbone is loaded.
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


def method_config(method_cls: type[Method], params: dict[str, Any]):
    """Build a method's Config dataclass from YAML/CLI params, rejecting unknown fields."""
    known = {f.name for f in dataclasses.fields(method_cls.Config)}
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown parameter {key!r} for method {method_cls.name!r}{hint}; "
                              f"its parameters are: {', '.join(sorted(known)) or 'none'}")
    params = coerce_to_fields(method_cls.Config, params, f"method_params.{method_cls.name}")
    try:
        return method_cls.Config(**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad parameters for method {method_cls.name!r}: {error}") from None


def run_id(method: str, scenario: str, seed: int, digest: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "-", method).strip("-")
    return f"{safe}__{scenario}__seed{seed}__{digest[:8]}"


class _Progress(SupervisedPlugin):
    """A progress bar per task: iterations, with the running loss."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar = label, None

    def before_training_exp(self, strategy, **kwargs):
        total = len(strategy.dataloader) * strategy.train_epochs
        task = strategy.task_names[strategy.experience.current_experience]
        self.bar = tqdm(total=total, desc=f"{self.label} | train {task}", unit="step", leave=False,
                        mininterval=_bar_interval())

    def after_training_iteration(self, strategy, **kwargs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{strategy.last_train_loss:.3f}", refresh=False)

    def after_training_exp(self, strategy, **kwargs):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _bar_interval() -> float:
    # In a log file (batch jobs, nohup) a bar redrawn ten times a second is megabytes of noise.
    return 0.1 if sys.stderr.isatty() else 30.0


# ============================================================================ planning


@dataclasses.dataclass
class PlannedRun:
    method_name: str  # as given (registry name or module:Class)
    method_cls: type[Method]
    params: Any  # the method's Config instance
    seed: int
    digest: str
    run_id: str
    path: Path
    checkpoint: Path


def plan_runs(config: RunConfig, scenario: Scenario, backbone: str,
              manifest: dict[str, Any] | None = None) -> list[PlannedRun]:
    """Resolve every (method, seed) into a run with its identity; fails before any training."""
    manifest = manifest if manifest is not None else provenance.data_manifest(scenario)
    data = provenance.data_identity(scenario, manifest)
    weights = provenance.backbone_weights(backbone)
    weights = None if weights is None else [[f["name"], f["sha256"]] for f in weights["files"]]
    planned = []
    for name in config.methods:
        cls = get_method(name)
        params = method_config(cls, {**scenario.method_defaults.get(cls.name, {}), **config.method_params.get(name, {})})
        if config.protocol.task_identity not in cls.task_identity:
            raise ConfigError(f"method {cls.name!r} supports task identity {sorted(cls.task_identity)}, "
                              f"not {config.protocol.task_identity!r}")
        code = provenance.code_identity(cls)
        for seed in config.seeds:
            identity = {"scenario": scenario.name, "scenario_options": scenario.info.get("options"),
                        "method": cls.name, "method_class": f"{cls.__module__}.{cls.__qualname__}",
                        "method_params": dataclasses.asdict(params), "backbone": backbone,
                        "protocol": dataclasses.asdict(config.protocol), "training": dataclasses.asdict(config.training),
                        "seed": seed, "device": resolve_device(config.device).type, "code": code, "data": data,
                        "backbone_weights": weights}
            digest = config_hash(identity)
            rid = run_id(cls.name, scenario.name, seed, digest)
            planned.append(PlannedRun(name, cls, params, seed, digest, rid,
                                      Path(config.output_dir) / "runs" / f"{rid}.json",
                                      ckpt.checkpoint_path(config.output_dir, rid)))
    return planned


def check_writable(output_dir: Path) -> None:
    """Fail before any training if results cannot be written where they should go."""
    for folder in (output_dir / "runs", output_dir / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as error:
            raise OutputError(f"results folder {output_dir} is not writable ({error.strerror or error}: "
                              f"{error.filename or folder}); choose another --output-dir or fix its "
                              "permissions") from None


# ============================================================================ the grid


class StopSignals:
    """While a grid runs, the first SIGINT/SIGTERM becomes a request to stop at a safe point."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        # Handlers can only be installed from the main thread (a run driven from another thread
        # keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without waiting for a checkpoint
        self.signal_number = number
        print(f"\n{signal.Signals(number).name} received: stopping at the next safe point (a checkpoint is "
              "saved); send it again to stop at once", file=sys.stderr, flush=True)

    def interrupted(self, message: str) -> RunInterrupted:
        name = signal.Signals(self.signal_number).name
        return RunInterrupted(f"{name}: {message}", self.signal_number)


def run_all(config: RunConfig, control: RunControl | None = None) -> list[Path]:
    """Run every planned (method, seed) and return the record paths (existing ones included)."""
    control = control or RunControl()
    if control.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every must be 0 (after each task only) or a positive number of steps")
    scenario = build_scenario(config.scenario, config.scenario_options, config.data_root)
    backbone_name = config.backbone or scenario.default_backbone
    manifest = provenance.data_manifest(scenario)
    planned = plan_runs(config, scenario, backbone_name, manifest)
    device = resolve_device(config.device)
    tracking.check_loggers(config.loggers)
    check_writable(Path(config.output_dir))
    todo = _triage(planned, config, control)
    log.info("scenario %s: %d tasks (%s); backbone %s; device %s; %d run(s), %d to do", scenario.name,
             scenario.num_tasks, ", ".join(scenario.task_names), backbone_name, device, len(planned), len(todo))
    paths = []
    with StopSignals() as stop, logging_redirect_tqdm(tqdm_class=tqdm):  # log lines above the bars
        for run in planned:
            if run.run_id not in todo:
                paths.append(run.path)
                continue
            if stop.requested:
                raise stop.interrupted(f"stopped before {run.run_id} started; every finished run is saved")
            state = None
            if todo[run.run_id] == "resume":
                state = ckpt.load(run.checkpoint, config_hash=run.digest)
            execution = RunExecution(run, config, scenario, backbone_name, device, manifest, control, stop)
            try:
                record = execution.execute(state)
            except RunInterrupted:
                raise
            except BenchmarkError as error:
                if run.checkpoint.exists() and str(run.checkpoint) not in one_line(error):
                    then = ("a changed configuration starts a new run" if isinstance(error, TrainingDiverged) else
                            "once the cause is fixed, --resume continues from there")
                    error.args = (f"{one_line(error)} [the run's last checkpoint is kept: {run.checkpoint}; {then}]",)
                raise
            try:
                atomic_write_json(run.path, record)
            except OSError as error:
                raise OutputError(f"could not write the record of {run.run_id} to {run.path} "
                                  f"({error.strerror or error}); its final checkpoint is kept at {run.checkpoint}: "
                                  "free some space (or fix the folder) and rerun the same command with --resume to "
                                  "write the record without training again") from None
            log.info("wrote %s", run.path)
            if not control.keep_checkpoints:
                ckpt.remove(run.checkpoint)
            paths.append(run.path)
    with contextlib.suppress(OSError):  # only if empty: no unfinished run left anything there
        (Path(config.output_dir) / "checkpoints").rmdir()
    return paths


def _triage(planned: list[PlannedRun], config: RunConfig, control: RunControl) -> dict[str, str]:
    """run id -> "start" | "resume" for the runs that need work; says why the others are skipped."""
    todo: dict[str, str] = {}
    blocked = []
    for run in planned:
        has_record, has_checkpoint = run.path.exists(), run.checkpoint.exists()
        if has_record and not config.force:
            log.info("skipping %s: finished already (cached record %s, same config, code and data); "
                     "pass --force to rerun", run.run_id, run.path)
            if has_checkpoint and not control.keep_checkpoints:
                ckpt.remove(run.checkpoint)  # left over from a crash between the record and the clean-up
            continue
        # Past this point there is no record, or --force asks for a new one.
        if has_checkpoint and control.resume:
            log.info("resuming %s from its checkpoint (%s)", run.run_id, _where(run))
            todo[run.run_id] = "resume"
        elif has_checkpoint and not config.force:
            blocked.append(run)
        else:
            if has_checkpoint:
                log.info("starting %s over (--force): its checkpoint (%s) is discarded", run.run_id, _where(run))
                ckpt.remove(run.checkpoint)
            elif control.resume:
                log.info("%s has no checkpoint: starting it", run.run_id)
            todo[run.run_id] = "start"
    if blocked:
        listed = "; ".join(f"{run.run_id} ({_where(run)})" for run in blocked)
        raise ConfigError(f"{len(blocked)} interrupted run(s) can be continued from a checkpoint: {listed}; "
                          "rerun with --resume to continue them, or with --force to start them over")
    return todo


def _where(run: PlannedRun) -> str:
    return ckpt.read_summary(run.checkpoint) or "position unknown"


# ============================================================================ one run


@dataclasses.dataclass
class _State:
    """What a run has produced so far (saved in every checkpoint)."""

    recall: dict  # {direction: {K: T x T}}
    routing: dict | None = None
    initial: dict | None = None  # recall before training (protocol tasks=all)
    train_times: list = dataclasses.field(default_factory=list)
    last_ranks: dict | None = None  # per-query ranks of the latest evaluation
    replay_rng: list = dataclasses.field(default_factory=list)  # RNG before plugins' after_training_exp, per task
    elapsed_s: float = 0.0  # wall time of earlier attempts, up to their last checkpoint
    peak_memory_mb: float = 0.0
    resumes: list = dataclasses.field(default_factory=list)
    completed: int = 0  # sessions trained and evaluated


class RunExecution:
    """Train and evaluate one (method, seed), checkpointing as it goes; ``execute`` returns its record."""

    def __init__(self, run: PlannedRun, config: RunConfig, scenario: Scenario, backbone_name: str,
                 device: torch.device, manifest: dict[str, Any], control: RunControl, stop: StopSignals | None = None):
        self.run, self.config, self.scenario = run, config, scenario
        self.backbone_name, self.device, self.manifest = backbone_name, device, manifest
        self.control, self.stop = control, stop or StopSignals()
        self.label = f"{run.method_cls.name} seed {run.seed}"
        self.protocol = config.protocol_object()

    # ---- the run ---------------------------------------------------------------------------------
    def execute(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._run_log(resume), deterministic_mode(self.config.training.deterministic):
            self.progress_bar = self.tracker = None
            try:
                return self._execute(resume)
            finally:
                if self.progress_bar is not None:
                    self.progress_bar.close()
                if self.tracker is not None:
                    self.tracker.close()

    @contextlib.contextmanager
    def _run_log(self, resume: dict[str, Any] | None):
        """``runs/<run_id>.log``: the harness's log lines while this run executes (appended to)."""
        path = self.run.path.with_suffix(".log")
        try:
            handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # flushed after every line
        except OSError as error:
            raise OutputError(f"could not open the run log {path} ({error.strerror or error}); choose another "
                              "--output-dir or fix its permissions") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        loggers = [logging.getLogger("benchmark"), logging.getLogger("methods")]
        harness = loggers[0]
        level = harness.level
        if harness.getEffectiveLevel() > logging.INFO:  # driven without the CLI: still keep INFO lines
            harness.setLevel(logging.INFO)
        for logger in loggers:
            logger.addHandler(handler)

        def to_file(level: int, message: str, exc_info=None) -> None:  # the file only, not the console
            handler.handle(harness.makeRecord(log.name, level, __file__, 0, message, (), exc_info))

        what = "continuing from a checkpoint" if resume is not None else "starting"
        to_file(logging.INFO, f"==== {self.run.run_id}: {what} | method {self.run.method_cls.name}, seed "
                              f"{self.run.seed}, scenario {self.scenario.name}, tasks "
                              f"{', '.join(self.scenario.task_names)}, config hash {self.run.digest}")
        try:
            yield
            to_file(logging.INFO, f"==== {self.run.run_id}: finished")
        except RunInterrupted as stopped:
            to_file(logging.WARNING, f"==== {self.run.run_id}: interrupted by {stopped}")
            raise
        except BenchmarkError as error:
            to_file(logging.ERROR, f"==== {self.run.run_id}: failed: {one_line(error)}")
            raise
        except BaseException as error:
            to_file(logging.ERROR, f"==== {self.run.run_id}: stopped by {type(error).__name__}",
                    exc_info=(type(error), error, error.__traceback__))
            raise
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            harness.setLevel(level)
            handler.close()

    def _execute(self, resume: dict[str, Any] | None) -> dict[str, Any]:
        run, config, device = self.run, self.config, self.device
        self.attempt_started = time.perf_counter()
        seed_everything(run.seed)
        self.memory_window = provenance.reset_peak_memory(device)  # this run's peak, not the process's
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        backbone = load_backbone(self.backbone_name, cache_dir=cache_dir, device=str(device))
        self.streams: Streams = make_streams(self.scenario, backbone)
        seed_everything(run.seed)  # building the backbone may have drawn random numbers
        try:
            self.method = run.method_cls(backbone, run.params, self.scenario.num_tasks).to(device)
        except ValueError as error:
            raise ConfigError(f"method {run.method_cls.name!r}: {error}") from None
        self.streams.use_transforms(**self.method.image_transforms())
        self.plugins = list(self.method.plugins())
        self.progress_bar = _Progress(self.label)
        resumed_at = None if resume is None else (int(resume["clock"].get("train_iterations", 0)),
                                                  int(resume["completed_sessions"]))
        self.tracker = tracking.open_tracker(config.loggers, tracking.logs_folder(config.output_dir, run.run_id),
                                             run.run_id, list(self.scenario.task_names), self._tracked_config(),
                                             resume=resumed_at)
        self.strategy = ContrastiveStrategy(
            method=self.method, train_epochs=config.training.epochs, train_mb_size=config.training.batch_size,
            eval_mb_size=config.training.eval_batch_size, device=device, task_names=self.scenario.task_names,
            plugins=[*self.plugins, self.progress_bar, self.tracker], num_workers=config.training.num_workers,
            step_hook=self._after_step)
        self.experiences = list(self.streams.train_stream)
        T = self.scenario.num_tasks
        self.state = _State(recall={d: {k: [[None] * T for _ in range(T)] for k in KS} for d in DIRECTIONS})
        self.task_started = None
        self.task_time_before = 0.0  # train time of the current task spent in an earlier attempt

        resume_point = None
        if resume is not None:
            resume_point = self._restore(resume)
            self.tracker.resumed(resumed_at[0], self.state)
        elif self.protocol.tasks == "all":
            self.state.initial = self._evaluate(-1).recall
            self.tracker.log_initial(self.state.initial)

        for session in range(self.state.completed, T):
            if self.stop.requested:
                raise self.stop.interrupted(self._stopped_message())
            self.task_started = time.perf_counter()
            if self.method.trains:
                self.strategy.resume_at = resume_point
                resume_point = None
                self.strategy.train(self.experiences[session])
                self.state.replay_rng.append(self.strategy.rng_before_plugins_after_exp)
            self.state.train_times.append(self.task_time_before + time.perf_counter() - self.task_started)
            self.task_started, self.task_time_before = None, 0.0
            result = self._evaluate(session)
            for d in DIRECTIONS:
                for k in KS:
                    self.state.recall[d][k][session] = result.recall[d][k]
            if result.routing is not None:
                self.state.routing = self.state.routing or {m: [[None] * T for _ in range(T)] for m in ("image", "text")}
                for modality in ("image", "text"):
                    self.state.routing[modality][session] = result.routing[modality]
            self.state.last_ranks = result.ranks
            self.state.completed = session + 1
            self._save()
            self.tracker.log_session(session, result.recall, result.routing)
            log.info("%s | after %s: R@1 i2t %s | t2i %s", self.label, self.scenario.task_names[session],
                     _fmt(result.recall["i2t"][1]), _fmt(result.recall["t2i"][1]))
        return self._record()

    def _evaluate(self, session: int):
        when = "before training" if session < 0 else f"after {self.scenario.task_names[session]}"
        bar = tqdm(total=items_to_encode(self.streams.galleries, session, self.protocol), unit="item",
                   desc=f"{self.label} | eval {when}", leave=False, mininterval=_bar_interval())
        try:
            return evaluate_session(self.method, self.streams.galleries, session, self.protocol,
                                    batch_size=self.config.training.eval_batch_size, device=self.device,
                                    task_names=list(self.scenario.task_names), progress=bar.update)
        finally:
            bar.close()

    def _tracked_config(self) -> dict[str, Any]:
        """What a W&B run is told about this run (its config panel)."""
        run = self.run
        return {"run_id": run.run_id, "config_hash": run.digest, "method": run.method_cls.name, "seed": run.seed,
                "scenario": self.scenario.name, "scenario_options": self.scenario.info.get("options"),
                "tasks": list(self.scenario.task_names), "backbone": self.backbone_name,
                "method_params": dataclasses.asdict(run.params),
                "protocol": dataclasses.asdict(self.config.protocol),
                "training": dataclasses.asdict(self.config.training)}

    def _stopped_message(self) -> str:
        if self.run.checkpoint.exists():
            where = ckpt.read_summary(self.run.checkpoint) or "its last checkpoint"
            return (f"{self.label} stopped; checkpoint {where} saved at {self.run.checkpoint}; rerun the same "
                    "command with --resume to continue")
        return f"{self.label} stopped before its first checkpoint; rerun the same command to start it again"

    # ---- checkpoints -----------------------------------------------------------------------------
    def _after_step(self, strategy: ContrastiveStrategy) -> None:
        """After every training step: save a checkpoint when one is due, stop when asked to."""
        every = self.control.checkpoint_every
        if self.stop.requested or (every and strategy.clock.train_exp_iterations % every == 0):
            self._save(strategy)
        if self.stop.requested:
            raise self.stop.interrupted(self._stopped_message())

    def _save(self, strategy: ContrastiveStrategy | None = None) -> None:
        """A checkpoint after the completed sessions, or (``strategy`` given) inside the current task."""
        now = time.perf_counter()
        inside = strategy is not None
        state = self.state
        peak, _ = provenance.peak_memory_mb(self.device, self.memory_window)
        payload = {
            "run_id": self.run.run_id, "config_hash": self.run.digest, "method": self.run.method_cls.name,
            "seed": self.run.seed, "task_names": list(self.scenario.task_names),
            "completed_sessions": state.completed,
            "position": {"epoch": strategy.epoch, "iteration": strategy.epoch_iteration} if inside else None,
            "method_state": self.method.state_dict(),
            "trainable": ckpt.trainable_names(self.method),
            "optimizer": strategy.optimizer.state_dict() if inside else None,
            "scheduler": strategy.scheduler.state_dict() if inside and strategy.scheduler is not None else None,
            "epoch_rng": strategy.epoch_rng if inside else None,
            "rng": ckpt.capture_rng(),
            "clock": clock_state(self.strategy.clock),
            "plugins": ckpt.plugin_states(self.plugins),
            "replay_rng": state.replay_rng,
            "last_train_loss": float(self.strategy.last_train_loss),
            "progress": {
                "recall": state.recall, "routing": state.routing, "initial": state.initial,
                "train_times": state.train_times, "last_ranks": state.last_ranks,
                "current_task_time": (self.task_time_before + now - self.task_started) if inside else 0.0,
                "elapsed_s": state.elapsed_s + now - self.attempt_started,
                "peak_memory_mb": max(state.peak_memory_mb, peak), "resumes": state.resumes},
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            ckpt.save(self.run.checkpoint, payload)
        except OSError as error:
            previous = ckpt.read_summary(self.run.checkpoint)
            kept = (f"the previous checkpoint ({previous}) is intact: free some space and rerun the same command "
                    "with --resume"
                    if previous else "no earlier checkpoint exists: free some space and rerun")
            raise OutputError(f"could not save the checkpoint of {self.run.run_id} to {self.run.checkpoint} "
                              f"({error.strerror or error}); {kept}") from None
        log.debug("%s: checkpoint %s", self.label, ckpt.read_summary(self.run.checkpoint))

    def _restore(self, saved: dict[str, Any]) -> ResumePoint | None:
        """Rebuild the run as it was at the checkpoint; returns where to continue inside a task, if anywhere."""
        if saved.get("task_names") != list(self.scenario.task_names):
            raise CheckpointError(f"checkpoint {self.run.checkpoint} was saved for tasks {saved.get('task_names')}, "
                                  f"not {self.scenario.task_names}; delete it to start the run over")
        done = int(saved["completed_sessions"])
        where = ckpt.describe(saved, self.scenario.task_names)
        log.info("%s: continuing from the checkpoint %s", self.label, where)
        # Per-task structure first (prompts, adapters, ...), exactly as training created it.
        if self.method.trains:
            for task in range(done):
                self.method.before_training_exp(self._train_data(task))
            self.method.to(self.device)
        position = saved.get("position")
        if position is None:
            ckpt.restore_module(self.method, saved["method_state"], saved["trainable"], f"method {self.method.name!r}")
        ckpt.restore_plugins(self.plugins, saved["plugins"], self.strategy, self.experiences, saved["replay_rng"])
        restore_clock(self.strategy.clock, saved["clock"])
        self.strategy.last_train_loss = saved.get("last_train_loss", float("nan"))

        progress = saved["progress"]
        self.state = _State(recall=progress["recall"], routing=progress["routing"], initial=progress["initial"],
                            train_times=list(progress["train_times"]), last_ranks=progress["last_ranks"],
                            replay_rng=list(saved["replay_rng"]), elapsed_s=progress["elapsed_s"],
                            peak_memory_mb=progress["peak_memory_mb"],
                            resumes=[*progress["resumes"], {"from": where, "saved": saved.get("saved"),
                                                            "resumed": datetime.now(timezone.utc).isoformat(
                                                                timespec="seconds")}],
                            completed=done)
        resume_point = None
        if position is not None:
            self.task_time_before = progress["current_task_time"]

            def load_state(strategy: ContrastiveStrategy) -> None:
                # Called once the task's before_training_exp and optimizer have run again.
                ckpt.restore_module(self.method, saved["method_state"], saved["trainable"],
                                    f"method {self.method.name!r}")
                strategy.optimizer.load_state_dict(saved["optimizer"])
                if saved["scheduler"] is not None and strategy.scheduler is not None:
                    strategy.scheduler.load_state_dict(saved["scheduler"])
                restore_clock(strategy.clock, saved["clock"])

            resume_point = ResumePoint(epoch=position["epoch"], iteration=position["iteration"],
                                       epoch_rng=saved["epoch_rng"], step_rng=saved["rng"], clock=saved["clock"],
                                       load_state=load_state)
            if position["iteration"]:
                log.info("%s: fast-forwarding %d step(s) of epoch %d to reach the checkpoint", self.label,
                         position["iteration"], position["epoch"] + 1)
        ckpt.restore_rng(saved["rng"])  # last: rebuilding above drew random numbers
        return resume_point

    def _train_data(self, task: int) -> TrainData:
        return TrainData(task_id=task, task_name=self.scenario.task_names[task],
                         dataset=self.experiences[task].dataset, batch_size=self.config.training.eval_batch_size,
                         device=self.device)

    # ---- the record ------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        run, config, scenario, state = self.run, self.config, self.scenario, self.state
        peak, peak_kind = provenance.peak_memory_mb(self.device, self.memory_window)
        counts = self.method.parameter_counts()
        effective = config.to_dict()
        effective.pop("loggers", None)  # how the run was watched, not what it is (like RunControl)
        effective["backbone"] = self.backbone_name
        effective["method_params"] = {run.method_name: dataclasses.asdict(run.params)}
        effective["methods"] = [run.method_name]
        effective["seeds"] = [run.seed]
        record_provenance = provenance.provenance(self.device)
        record_provenance["code"] = provenance.code_version(run.method_cls)
        record_provenance["data_manifest"] = self.manifest
        record_provenance["backbone_weights"] = provenance.backbone_weights(self.backbone_name)
        record_provenance["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        return {
            "schema": RECORD_SCHEMA,
            "run_id": run.run_id,
            "method": run.method_cls.name,
            "scenario": scenario.name,
            "seed": run.seed,
            "config": effective,
            "config_hash": run.digest,
            "protocol": dataclasses.asdict(config.protocol),
            "tasks": list(scenario.task_names),
            "task_counts": scenario.counts(),
            "scenario_info": scenario.info,
            "recall": {d: {str(k): state.recall[d][k] for k in KS} for d in DIRECTIONS},
            "recall_initial": (None if state.initial is None
                               else {d: {str(k): state.initial[d][k] for k in KS} for d in DIRECTIONS}),
            "routing_accuracy": state.routing,
            "recall_tie_rule": "expected",  # benchmark.retrieval: ties count as the expected hit
            "final_session_queries": self._final_queries(),
            "method_access": self._access(),
            "captions_truncated": self._truncated(),
            "costs": {"trainable_params": counts["trainable"], "total_params": counts["total"],
                      "backbone_params": counts["backbone"], "added_params": counts["added"],
                      "params_per_task": counts.get("per_task"), "params_shared": counts.get("shared"),
                      "forward_passes_per_query": run.method_cls.forward_passes,
                      "wall_time_s": state.elapsed_s + time.perf_counter() - self.attempt_started,
                      "train_time_s_per_task": state.train_times,
                      "peak_memory_mb": max(peak, state.peak_memory_mb), "peak_memory_kind": peak_kind},
            "resumed": state.resumes,
            "provenance": record_provenance,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _final_queries(self) -> dict[str, Any] | None:
        """Per-query ranks of the final session (for paired tests over queries, benchmark.stats)."""
        ranks = self.state.last_ranks
        if not ranks:
            return None
        out: dict[str, Any] = {"query_set": query_set_digest(self.scenario), "encoding": (
            "ranks: one character per query, tasks in order: '0'..'9' = number of gallery items scoring "
            "strictly above the best true match, 'x' = 10 or more; ties: [query, tied, tied_true] for the "
            "queries whose best true match ties with other items (tied = non-matching items at its score, "
            "tied_true = true items at it), hit at K = expected hit under a random order of the ties "
            "(benchmark.retrieval); queries not listed have no ties, hit at K means rank < K")}
        for direction in DIRECTIONS:
            tasks = sorted(ranks[direction])
            columns = torch.cat([torch.as_tensor(ranks[direction][j]).reshape(-1, 3) for j in tasks])
            out[direction] = {"tasks": tasks, "counts": [len(ranks[direction][j]) for j in tasks],
                              "ranks": encode_ranks(columns[:, 0]), "ties": encode_ties(columns)}
        return out

    def _access(self) -> dict[str, Any]:
        """What the method was allowed to see (for the protocol card, ``benchmark show``)."""
        replay = [{"plugin": type(p).__name__, "mem_size": getattr(p, "mem_size", None)}
                  for p in self.plugins if hasattr(p, "storage_policy")]
        return {"task_labels_in_training": True,
                "task_identity_at_test": self.protocol.task_identity,
                "current_task_training_data": bool(self.method.trains),
                "replay_memory": replay,
                "plugins": [type(p).__name__ for p in self.plugins]}

    def _truncated(self) -> dict[str, Any]:
        train = self.streams.train_pairs or []
        return {"context_length": int(self.streams.galleries[0].caption_tokens.shape[1]),
                "train": [p.truncated_captions for p in train],
                "test": [g.truncated_captions for g in self.streams.galleries]}


def encode_ranks(ranks: torch.Tensor) -> str:
    return "".join(RANK_CHARS[r] if r < len(RANK_CHARS) else RANK_BEYOND for r in ranks.tolist())


def encode_ties(columns: torch.Tensor) -> list[list[int]]:
    """``[query, tied, tied_true]`` for each query (rows of ``columns`` = above, tied, tied_true)
    whose ties can change a hit at K <= 10; healthy features have none, so the list is short."""
    relevant = (columns[:, 1] > 0) & (columns[:, 0] < len(RANK_CHARS))
    index = torch.nonzero(relevant).flatten()
    return [[int(q), int(columns[q, 1]), int(columns[q, 2])] for q in index.tolist()]


def query_set_digest(scenario: Scenario) -> str:
    """Identifies the test queries (images and captions of every task, in order): two records
    can be paired query by query only when their digests are equal."""
    sha = hashlib.sha256()
    for name, test in zip(scenario.task_names, scenario.test):
        sha.update(f"task\0{name}\0".encode())
        for item in test:
            sha.update(f"{item.image_id}\0{len(item.captions)}\0".encode())
            for caption in item.captions:
                sha.update(caption.encode() + b"\0")
    return sha.hexdigest()


def _fmt(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.1f}" for v in values)
