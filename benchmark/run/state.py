"""What a run has produced so far, and the checkpoint payload that lets it continue exactly.

:class:`RunState` is the progress (recall rows, train times, ...) every checkpoint carries;
:func:`checkpoint_payload` is everything a checkpoint holds (:mod:`benchmark.checkpoint` writes
it), and :func:`restore` puts a freshly built run back where a payload was taken.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from ..method import Method, TrainData

from .. import checkpoint as ckpt
from ..errors import CheckpointError
from ..evaluation import DIRECTIONS, KS
from ..rng import capture_rng, restore_rng
from ..strategy import ContrastiveStrategy, ResumePoint, clock_state, restore_clock
from .planning import PlannedRun

log = logging.getLogger("benchmark.runner")  # the name the harness's log lines have always carried


@dataclasses.dataclass
class RunState:
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

    @classmethod
    def start(cls, num_tasks: int) -> "RunState":
        """Nothing produced yet: every recall cell of the T x T matrices unknown."""
        T = num_tasks
        return cls(recall={d: {k: [[None] * T for _ in range(T)] for k in KS} for d in DIRECTIONS})


def checkpoint_payload(run: PlannedRun, task_names: list[str], state: RunState, method: Method,
                       strategy: ContrastiveStrategy, plugins: list, *, inside: bool, current_task_time: float,
                       elapsed_s: float, peak_memory_mb: float,
                       frozen: ckpt.FrozenWeights | None = None) -> dict[str, Any]:
    """A checkpoint after the completed sessions, or (``inside``) at the current step of the task
    being trained. The times and peak memory are the run's totals up to now
    (``current_task_time``: of the task being trained, 0 outside a task).

    ``frozen``: the method's backbone as built; the entries still equal to it are left out of
    ``method_state`` and recorded (names and digest) under ``frozen``. Without it the whole
    state dict is saved."""
    if frozen is not None:
        method_state, left_out = frozen.payload(method)
    else:
        method_state, left_out = method.state_dict(), None
    return {
        "run_id": run.run_id, "config_hash": run.digest, "identity": run.identity, "method": run.method_cls.name,
        "seed": run.seed, "task_names": list(task_names),
        "completed_sessions": state.completed,
        "position": {"epoch": strategy.epoch, "iteration": strategy.epoch_iteration} if inside else None,
        "method_state": method_state,
        "frozen": left_out,
        "trainable": ckpt.trainable_names(method),
        "optimizer": strategy.optimizer.state_dict() if inside else None,
        "scheduler": strategy.scheduler.state_dict() if inside and strategy.scheduler is not None else None,
        "epoch_rng": strategy.epoch_rng if inside else None,
        "rng": capture_rng(),
        "clock": clock_state(strategy.clock),
        "plugins": ckpt.plugin_states(plugins),
        "replay_rng": state.replay_rng,
        "last_train_loss": float(strategy.last_train_loss),
        "grad_scaler": strategy.scaler.state_dict() if strategy.scaler is not None else None,  # fp16's loss scale
        "progress": {
            "recall": state.recall, "routing": state.routing, "initial": state.initial,
            "train_times": state.train_times, "last_ranks": state.last_ranks,
            "current_task_time": current_task_time,
            "elapsed_s": elapsed_s,
            "peak_memory_mb": peak_memory_mb, "resumes": state.resumes},
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclasses.dataclass
class Restored:
    """A run put back at its checkpoint."""

    state: RunState
    resume_point: ResumePoint | None  # where to continue inside a task, if anywhere
    task_time_before: float  # train time of the interrupted task spent before the checkpoint


def restore(saved: dict[str, Any], *, run: PlannedRun, task_names: list[str], method: Method,
            strategy: ContrastiveStrategy, plugins: list, experiences: list, device: torch.device, label: str,
            train_data: Callable[[int], TrainData], frozen: ckpt.FrozenWeights | None = None) -> Restored:
    """Rebuild the run as it was at the checkpoint ``saved``, on a method, strategy and plugins
    built as for a fresh run; ``train_data(task)`` is what training handed the method's hooks.
    ``frozen``: the rebuilt method's :class:`~benchmark.checkpoint.FrozenWeights` (its digests
    are then computed once for the check here and the run's later checkpoints)."""
    if saved.get("task_names") != list(task_names):
        source = run.adopt_from or run.checkpoint  # --resume-anyway continues from another run's checkpoint
        raise CheckpointError(f"checkpoint {source} was saved for tasks {saved.get('task_names')}, "
                              f"not {task_names}; delete it to start the run over")
    done = int(saved["completed_sessions"])
    where = ckpt.describe(saved, task_names)
    # Before anything runs on the rebuilt method: the backbone it left out must be the one it had.
    left_out = ckpt.check_frozen(saved, method, frozen, str(run.adopt_from or run.checkpoint))
    log.info("%s: continuing from the checkpoint %s", label, where)
    # Per-task structure first (prompts, adapters, ...), exactly as training created it.
    if method.trains:
        for task in range(done):
            method.before_training_exp(train_data(task))
        method.to(device)
    position = saved.get("position")
    if position is None:
        ckpt.restore_module(method, saved["method_state"], saved["trainable"], f"method {method.name!r}",
                            left_out)
    ckpt.restore_plugins(plugins, saved["plugins"], strategy, experiences, saved["replay_rng"])
    restore_clock(strategy.clock, saved["clock"])
    strategy.last_train_loss = saved.get("last_train_loss", float("nan"))
    if saved.get("grad_scaler") and strategy.scaler is not None:  # fp16: continue with the scale found so far
        strategy.scaler.load_state_dict(saved["grad_scaler"])

    progress = saved["progress"]
    state = RunState(recall=progress["recall"], routing=progress["routing"], initial=progress["initial"],
                     train_times=list(progress["train_times"]), last_ranks=progress["last_ranks"],
                     replay_rng=list(saved["replay_rng"]), elapsed_s=progress["elapsed_s"],
                     peak_memory_mb=progress["peak_memory_mb"],
                     resumes=[*progress["resumes"], {"from": where, "saved": saved.get("saved"),
                                                     "resumed": datetime.now(timezone.utc).isoformat(
                                                         timespec="seconds"),
                                                     **({"anyway": saved["adopted"]} if saved.get("adopted") else {})}],
                     completed=done)
    resume_point, task_time_before = None, 0.0
    if position is not None:
        task_time_before = progress["current_task_time"]

        def load_state(strategy: ContrastiveStrategy) -> None:
            # Called once the task's before_training_exp and optimizer have run again.
            ckpt.restore_module(method, saved["method_state"], saved["trainable"], f"method {method.name!r}",
                                left_out)
            strategy.optimizer.load_state_dict(saved["optimizer"])
            if saved["scheduler"] is not None and strategy.scheduler is not None:
                strategy.scheduler.load_state_dict(saved["scheduler"])
            restore_clock(strategy.clock, saved["clock"])

        resume_point = ResumePoint(epoch=position["epoch"], iteration=position["iteration"],
                                   epoch_rng=saved["epoch_rng"], step_rng=saved["rng"], clock=saved["clock"],
                                   load_state=load_state)
        if position["iteration"]:
            log.info("%s: fast-forwarding %d step(s) of epoch %d to reach the checkpoint", label,
                     position["iteration"], position["epoch"] + 1)
    restore_rng(saved["rng"])  # last: rebuilding above drew random numbers
    return Restored(state, resume_point, task_time_before)
