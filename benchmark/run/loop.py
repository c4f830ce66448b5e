"""One run, trained and evaluated session by session, and the grid of runs: config -> plan ->
run -> record.

:func:`run_all` plans the grid (:mod:`benchmark.run.planning`) and runs what needs running; for each
method and seed :class:`RunExecution` builds backbone, method and strategy
(:mod:`benchmark.run.factory`), trains task by task through
:class:`~benchmark.strategy.ContrastiveStrategy`, evaluates after every session
(:mod:`benchmark.evaluation`), saves a checkpoint after every session (:mod:`benchmark.run.state`,
:mod:`benchmark.checkpoint`), and at the end writes the run record atomically to
``<output_dir>/runs/<run_id>.json`` and deletes the checkpoint. The two halves are separate
functions: :func:`prepare` (scenario, plan, checks) and :func:`run_one` (one planned run, up to
its record), which :mod:`benchmark.launch` also calls, once per cell, for ``--launcher ray``.

**Interrupted runs.** ``resume`` continues a run from its checkpoint and reaches the same recall
matrices as an uninterrupted run (bit-identical on the CPU; on CUDA with
``training.deterministic``). The first Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next
safe point (:mod:`benchmark.run.signals`): inside a task after the current step (a checkpoint of
that step is saved), otherwise after the current evaluation (the task's checkpoint is saved). A
second signal stops at once, losing the work since the last checkpoint.

**Failures** keep the last checkpoint: a corrupt image or a NaN loss stops the run with an
error that says where its checkpoint is; a failed write (full disk, no permission) leaves the
previous file intact and says what to do.

**Watching a run.** Each task's training and each evaluation has a progress bar
(:mod:`benchmark.run.progress`); log lines are printed above the bars. Every run writes the
harness's log lines to ``<output_dir>/runs/<run_id>.log`` beside its record, line by line (a crash
leaves it; a resumed or rerun run appends to it). The loggers of ``loggers`` / ``--logger``
(:mod:`benchmark.tracking`) write under ``<output_dir>/logs/<run_id>/``.

**One run over several processes** (``control.ddp``, launched by torchrun; see
:mod:`benchmark.distributed`): every process plans, trains and evaluates the same runs on its
part of the data; process 0 alone decides what to do (:func:`~benchmark.run.planning.triage`),
builds the backbone cache first, and writes: records, checkpoints, run logs, loggers' files,
progress bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import checkpoint as ckpt
from .. import distributed, provenance, tracking
from ..backbone import default_cache_dir, load_backbone, warn_if_pretrained_elsewhere
from ..config import RunConfig
from ..data import preflight, token_cache
from ..data.token_cache import TokenCache
from ..errors import BenchmarkError, ConfigError, OutputError, RunInterrupted, TrainingDiverged, one_line
from ..evaluation import DIRECTIONS, KS, EvaluationCache, evaluate_session, items_to_encode
from ..io import atomic_write_json
from ..method import TrainData
from ..record import ERROR_SUFFIX
from ..record import build as build_record
from ..record import query_set_digest
from ..scenarios import Scenario, build_scenario
from ..strategy import ContrastiveStrategy, ResumePoint
from .factory import build_method, build_strategy, train_data
from .planning import PlannedRun, RunControl, check_split, check_writable, plan_runs, select_runs, triage
from .progress import TrainingProgress, evaluation_bar
from .runtime import deterministic_mode, resolve_device
from .signals import StopSignals
from .state import RunState, checkpoint_payload, restore

log = logging.getLogger("benchmark.runner")  # the name the harness's log lines have always carried


@dataclasses.dataclass
class Grid:
    """What every run of a grid shares once it is planned: built once by the driver, and again
    (identically) by each cell of :mod:`benchmark.launch`, which runs one of its runs."""

    config: RunConfig
    scenario: Scenario
    backbone_name: str
    manifest: dict[str, Any]
    device: torch.device
    planned: list[PlannedRun]  # restricted to RunControl.only when given


def prepare(config: RunConfig, control: RunControl) -> Grid:
    """Everything before deciding what to run: the scenario, every run's identity, the image
    check, the device, the loggers and a writable results folder; fails before any training."""
    if control.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every must be 0 (after each task only) or a positive number of steps")
    if control.ddp:
        distributed.start(config.device)  # torchrun's process group (a one-line error without torchrun)
    scenario = build_scenario(config.scenario, config.scenario_options, config.data_root)
    backbone_name = config.backbone or scenario.default_backbone
    manifest = provenance.data_manifest(scenario)
    planned = plan_runs(config, scenario, backbone_name, manifest)  # every method's config checked first
    if control.check_images:
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        with distributed.main_first():  # process 0 fills the check's cache, the others read it
            checked = preflight.check_and_apply(scenario, control.bad_images,
                                                cache_file=cache_dir / "image-check.json",
                                                progress_bar=tqdm if distributed.is_main() else None)
        if checked is not scenario:  # items were skipped: other data, so other run identities
            scenario = checked
            planned = plan_runs(config, scenario, backbone_name, manifest)
    planned = select_runs(planned, control.only)
    if control.ddp:  # the runs this command does (--only), before anything trains, alike in every process
        check_split(planned, config, control)
    warn_if_pretrained_elsewhere(backbone_name, scenario.name)  # once, before anything trains
    device = distributed.current().device if control.ddp else resolve_device(config.device)
    tracking.check_loggers(config.loggers)
    if distributed.is_main():
        check_writable(Path(config.output_dir))
    return Grid(config, scenario, backbone_name, manifest, device, planned)


def run_all(config: RunConfig, control: RunControl | None = None) -> list[Path]:
    """Run every planned (method, seed) and return the record paths (existing ones included)."""
    control = control or RunControl()
    grid = prepare(config, control)
    scenario, planned = grid.scenario, grid.planned
    todo = distributed.on_main(lambda: triage(planned, control))  # under --ddp: process 0's decision, for all
    log.info("scenario %s: %d tasks (%s); backbone %s; device %s; %d run(s), %d to do", scenario.name,
             scenario.num_tasks, ", ".join(scenario.task_names), grid.backbone_name, grid.device, len(planned),
             len(todo))
    paths = []
    with StopSignals() as stop, logging_redirect_tqdm(tqdm_class=tqdm):  # log lines above the bars
        for run in planned:
            if run.run_id not in todo:
                paths.append(run.path)
                continue
            if stop.requested:
                raise stop.interrupted(f"stopped before {run.run_id} started; every finished run is saved")
            paths.append(run_one(grid, run, todo[run.run_id], control, stop))
    remove_empty_checkpoints_folder(config)
    return paths


def run_one(grid: Grid, run: PlannedRun, how: str, control: RunControl, stop: StopSignals) -> Path:
    """Execute one planned run as :func:`triage` decided (``how``: start, resume or adopt), write
    its record atomically, then delete its checkpoint (unless kept) and any error record an
    earlier failed attempt left (:data:`benchmark.record.ERROR_SUFFIX`); return the record's path."""
    config = grid.config
    state = None
    if how == "resume":
        state = ckpt.load(run.checkpoint, config_hash=run.digest)
    elif how == "adopt":  # --resume-anyway: an earlier identity's checkpoint, noted in the record
        state = ckpt.load(run.adopt_from, config_hash=None)
        state["adopted"] = {"checkpoint_of": run.adopt_from.parent.name,
                            "changed": run.adopt_changes}
    execution = RunExecution(run, config, grid.scenario, grid.backbone_name, grid.device, grid.manifest, control,
                             stop)
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
    if not distributed.is_main():  # the same record: process 0 writes it
        return run.path
    try:
        atomic_write_json(run.path, record)
    except OSError as error:
        raise OutputError(f"could not write the record of {run.run_id} to {run.path} "
                          f"({error.strerror or error}); its final checkpoint is kept at {run.checkpoint}: "
                          "free some space (or fix the folder) and rerun the same command with --resume to "
                          "write the record without training again") from None
    log.info("wrote %s", run.path)
    with contextlib.suppress(FileNotFoundError):  # the failure it recorded is superseded by this record
        run.path.with_name(run.run_id + ERROR_SUFFIX).unlink()
    if not control.keep_checkpoints:
        ckpt.remove(run.checkpoint)
        if run.adopt_from is not None:  # superseded by this run's record
            ckpt.remove(run.adopt_from)
    return run.path


def remove_empty_checkpoints_folder(config: RunConfig) -> None:
    if not distributed.is_main():
        return
    with contextlib.suppress(OSError):  # only if empty: no unfinished run left anything there
        (Path(config.output_dir) / "checkpoints").rmdir()


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
        """``runs/<run_id>.log``: the harness's log lines while this run executes (appended to);
        process 0's alone under ``--ddp``."""
        if not distributed.is_main():
            yield
            return
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
        self.memory_window = provenance.reset_peak_memory(device)  # this run's peak, not the process's
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        setup = build_method(run.method_cls, run.params, self.scenario, device, seed=run.seed,
                             load_backbone=lambda: _load_backbone_once(self.backbone_name, cache_dir, device),
                             config_errors=True, token_cache=TokenCache(cache_dir / token_cache.FOLDER_NAME))
        self.method, self.streams = setup.method, setup.streams
        self.frozen = ckpt.FrozenWeights(self.method)  # the backbone as built: checkpoints leave it out
        self.eval_cache = EvaluationCache()  # test crops and frozen features, kept across this run's sessions
        self.plugins = list(self.method.plugins())
        self.progress_bar = TrainingProgress(self.label, show=distributed.is_main())
        resumed_at = None if resume is None else (int(resume["clock"].get("train_iterations", 0)),
                                                  int(resume["completed_sessions"]))
        self.tracker = tracking.open_tracker(config.loggers if distributed.is_main() else [],
                                             tracking.logs_folder(config.output_dir, run.run_id),
                                             run.run_id, list(self.scenario.task_names), self._tracked_config(),
                                             resume=resumed_at)
        self.strategy = build_strategy(setup, config.training, [*self.plugins, self.progress_bar, self.tracker],
                                       step_hook=self._after_step)
        self.experiences = list(self.streams.train_stream)
        T = self.scenario.num_tasks
        self.state = RunState.start(T)
        self.task_started = None
        self.task_time_before = 0.0  # train time of the current task spent in an earlier attempt

        resume_point = None
        if resume is not None:
            resume_point = self._restore(resume)
            self.tracker.resumed(resumed_at[0], self.state)
        elif self.protocol.tasks == "all":
            self.state.initial = self._evaluate(-1).recall
            self.tracker.log_initial(self.state.initial)

        for task in range(self.state.completed, T):
            if self.stop.requested:
                raise self.stop.interrupted(self._stopped_message())
            self.task_started = time.perf_counter()
            if self.method.trains:
                self.strategy.resume_at = resume_point
                resume_point = None
                self.strategy.train(self.experiences[task])
                self.state.replay_rng.append(self.strategy.rng_before_plugins_after_exp)
            self.state.train_times.append(self.task_time_before + time.perf_counter() - self.task_started)
            self.task_started, self.task_time_before = None, 0.0
            result = self._evaluate(task)
            for d in DIRECTIONS:
                for k in KS:
                    self.state.recall[d][k][task] = result.recall[d][k]
            if result.routing is not None:
                self.state.routing = self.state.routing or {m: [[None] * T for _ in range(T)] for m in ("image", "text")}
                for modality in ("image", "text"):
                    self.state.routing[modality][task] = result.routing[modality]
            self.state.last_ranks = result.ranks
            self.state.completed = task + 1
            self._save()
            self.tracker.log_session(task, result.recall, result.routing)
            log.info("%s | after %s: R@1 i2t %s | t2i %s", self.label, self.scenario.task_names[task],
                     _fmt(result.recall["i2t"][1]), _fmt(result.recall["t2i"][1]))
        return self._record()

    def _evaluate(self, after_task: int):
        when = "before training" if after_task < 0 else f"after {self.scenario.task_names[after_task]}"
        bar = evaluation_bar(self.label, when, items_to_encode(self.streams.galleries, after_task, self.protocol),
                             show=distributed.is_main())
        try:
            return evaluate_session(self.method, self.streams.galleries, after_task, self.protocol,
                                    batch_size=self.config.training.eval_batch_size, device=self.device,
                                    task_names=list(self.scenario.task_names), progress=bar.update,
                                    cache=self.eval_cache,
                                    num_workers=self.strategy.num_workers,  # training.num_workers, resolved
                                    precision=self.config.training.precision)
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
        """A checkpoint after the completed sessions, or (``strategy`` given) inside the current task
        (process 0 alone writes it under ``--ddp``)."""
        if strategy is not None:
            strategy.check_divergence()  # never save a checkpoint after a loss that went NaN unseen
        self.tracker.flush()  # the logged steps reach the loggers before the checkpoint says they ran
        if not distributed.is_main():
            return
        now = time.perf_counter()
        inside = strategy is not None
        state = self.state
        peak, _ = provenance.peak_memory_mb(self.device, self.memory_window)
        payload = checkpoint_payload(
            self.run, self.scenario.task_names, state, self.method, self.strategy, self.plugins, inside=inside,
            current_task_time=(self.task_time_before + now - self.task_started) if inside else 0.0,
            elapsed_s=state.elapsed_s + now - self.attempt_started, peak_memory_mb=max(state.peak_memory_mb, peak),
            frozen=self.frozen)
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
        restored = restore(saved, run=self.run, task_names=self.scenario.task_names, method=self.method,
                           strategy=self.strategy, plugins=self.plugins, experiences=self.experiences,
                           device=self.device, label=self.label, train_data=self._train_data,
                           frozen=self.frozen)
        self.state, self.task_time_before = restored.state, restored.task_time_before
        return restored.resume_point

    def _train_data(self, task: int) -> TrainData:
        return train_data(self.experiences[task], self.scenario.task_names,
                          encode_batch_size=self.config.training.eval_batch_size, device=self.device,
                          num_workers=self.strategy.num_workers, precision=self.strategy.precision)

    # ---- the record ------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        run, state = self.run, self.state
        return build_record(
            run=run, config=self.config, scenario=self.scenario, backbone=self.backbone_name,
            recall=state.recall, recall_initial=state.initial, routing=state.routing, last_ranks=state.last_ranks,
            query_set=query_set_digest(self.scenario) if state.last_ranks else None, plugins=self.plugins,
            task_identity=self.protocol.task_identity, trains=self.method.trains, streams=self.streams,
            parameter_counts=self.method.parameter_counts(), forward_passes=run.method_cls.forward_passes,
            wall_time_s=state.elapsed_s + time.perf_counter() - self.attempt_started, train_times=state.train_times,
            peak_memory=provenance.peak_memory_mb(self.device, self.memory_window), earlier_peak_mb=state.peak_memory_mb,
            resumed=state.resumes, machine={**provenance.provenance(self.device), "training_data": provenance.training_data(
                self.streams, self.config.training.decode, self.strategy.num_workers)},
            code=provenance.code_version(run.method_cls), data_manifest=self.manifest,
            backbone_weights=provenance.backbone_weights(self.backbone_name),
            deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
            method_adjusted=self.method.adjusted, directions=DIRECTIONS, ks=KS).to_json()


def _load_backbone_once(name: str, cache_dir: Path, device: torch.device):
    """The backbone; under ``--ddp`` process 0 builds (and caches) it before the others load it."""
    with distributed.main_first():
        return load_backbone(name, cache_dir=cache_dir, device=str(device))


def _fmt(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.1f}" for v in values)
