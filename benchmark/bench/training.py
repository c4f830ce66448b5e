"""Training throughput: pairs/s of each method's real training step, fed by the real data
pipeline and by in-memory tensors, and where each step's time goes.

Each method is built the way a run builds it (:func:`benchmark.run.factory.build_method` and
:func:`~benchmark.run.factory.build_strategy`, with the method's default hyperparameters) on a
random-weights backbone of the bench's model, and trained by the harness's own
:class:`~benchmark.strategy.ContrastiveStrategy` on one task. :class:`StepTimer`, an ordinary
Avalanche plugin, watches the steps; after ``warmup`` untimed steps it times ``steps`` steps and
then ends training (the task's key fitting and evaluation are not part of a step).

Feeds:

* ``pipeline`` — the harness's training dataset over the generated JPEGs
  (:mod:`benchmark.bench.data`): decode, the method's training transform, Avalanche's loader with
  the run's ``training.num_workers``;
* ``memory`` — the same shapes from tensors already in memory (no decoding): the step alone.

When ``pipeline`` is much slower than ``memory`` the run is data-bound; when they agree it is
compute-bound.

Where a step's time goes (shares of the wall time of the timed steps):

* ``data`` — the training loop waiting for the loader's next batch (host clock, from the end of
  one step to the start of the next; the move to the device is in it);
* ``device`` (CUDA) — the GPU's busy time: the sum of its kernel times, from
  :mod:`torch.profiler` over ``profile_steps`` extra steps (the profiler slows the host, so
  those steps are not among the timed ones);
* ``launch`` (CUDA) — the rest: wall time during which the GPU was neither fed data nor busy,
  i.e. the host launching kernels and waiting on synchronisations;
* on the CPU the device is the host: ``compute`` = 1 - ``data``, ``device``/``launch`` are n/a.

FLOPs of one step (forward, loss, backward, at the measured batch) are counted with
:func:`~benchmark.bench.device.count_flops` on the strategy's own ``forward`` / ``criterion`` /
``backward``; achieved TFLOP/s = FLOPs per step / median seconds per step.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import Dataset

from .device import count_flops, synchronize

log = logging.getLogger(__name__)
FEEDS = ("pipeline", "memory")


class EnoughSteps(Exception):
    """Raised by :class:`StepTimer` once its steps are timed, to leave the training loop."""


class StepTimer(SupervisedPlugin):
    """Times training steps from inside Avalanche's loop (see the module docstring).

    ``data_s[i]``: seconds the loop waited for batch ``i``; ``step_s[i]``: seconds from having
    batch ``i`` to the end of its step (host clock; on CUDA the device is synchronised only at
    the end of the timed window, so queued work overlaps the next batch's wait as in a run).
    """

    def __init__(self, device: torch.device, warmup: int, steps: int, profile_steps: int = 0):
        super().__init__()
        self.device, self.warmup, self.steps, self.profile_steps = device, warmup, steps, profile_steps
        self.seen = 0
        self.data_s: list[float] = []
        self.step_s: list[float] = []
        self.window_s: float | None = None
        self.device_busy_s: float | None = None
        self._last_end: float | None = None
        self._started: float | None = None
        self._window_start: float | None = None
        self._profiler = None

    def before_training_epoch(self, strategy, *args, **kwargs):
        self._last_end = time.perf_counter()  # the first batch of an epoch waits for the loader to start

    def before_training_iteration(self, strategy, *args, **kwargs):
        now = time.perf_counter()
        if self.seen == self.warmup and self._window_start is None:
            self._window_start = self._last_end  # the end of the last warm-up step (or the epoch's start)
        if self.warmup <= self.seen < self.warmup + self.steps:
            self.data_s.append(now - self._last_end)
        self._started = now

    def after_training_iteration(self, strategy, *args, **kwargs):
        now = time.perf_counter()
        timed_end = self.warmup + self.steps
        if self.warmup <= self.seen < timed_end:
            self.step_s.append(now - self._started)
        self.seen += 1
        if self.seen == self.warmup:
            synchronize(self.device)  # the warm-up's queued work is not the window's
        elif self.seen == timed_end:
            synchronize(self.device)
            self.window_s = time.perf_counter() - self._window_start
            if self.profile_steps:
                self._start_profiler()
        elif self.seen == timed_end + self.profile_steps and self._profiler is not None:
            synchronize(self.device)
            self._stop_profiler()
        self._last_end = time.perf_counter()
        if self.seen >= timed_end + self.profile_steps:
            raise EnoughSteps()

    def _start_profiler(self):
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._profiler.__enter__()

    def _stop_profiler(self):
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        try:  # microseconds of GPU kernels, each counted once (as its launching op's self time)
            busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in profiler.key_averages())
            self.device_busy_s = busy_us / 1e6 / self.profile_steps
        except Exception as error:  # noqa: BLE001 - a profiler that cannot say leaves the split unknown
            log.warning("the profiler gave no kernel times (%s); the device/launch split is left out", error)


class MemoryPairs(Dataset):
    """Training items ``(image, tokens, index)`` served from tensors in memory: ``images`` and
    ``tokens`` hold a few decoded items, repeated to ``length``."""

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, length: int):
        self.images, self.tokens, self.length = images, tokens, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        k = index % len(self.images)
        return self.images[k], self.tokens[k], torch.tensor(index)


def memory_experience(pairs, length: int, distinct: int):
    """A one-task Avalanche training experience over :class:`MemoryPairs` of ``pairs``' first
    ``distinct`` items (decoded once)."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels

    from ..scenarios.streams import _with_task_label

    items = [pairs[i] for i in range(min(distinct, len(pairs)))]
    dataset = MemoryPairs(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), length)
    labelled = _with_task_label(dataset, 0)
    return list(with_task_labels(benchmark_from_datasets(train=[labelled], test=[labelled])).train_stream)[0]


@dataclasses.dataclass
class Trainer:
    """A method, its strategy and the experience it trains on, built as a run builds them."""

    setup: Any
    strategy: Any
    experience: Any
    timer: StepTimer


def build_trainer(method_name: str, options, scenario, feed: str, *, warmup: int, steps: int,
                  profile_steps: int = 0) -> Trainer:
    """A method on a random-weights backbone, ready to train ``warmup + steps`` steps of ``feed``."""
    from ..backbone import load_backbone
    from ..config import TrainingConfig
    from ..method import get_method
    from ..run.factory import build_method, build_strategy

    cls = get_method(method_name)
    setup = build_method(cls, cls.Config(), scenario, options.device, seed=0, config_errors=True,
                         load_backbone=lambda: quiet_load(load_backbone, options.model, str(options.device)))
    total = warmup + steps + profile_steps
    if feed == "pipeline":
        experience = list(setup.streams.train_stream)[0]
    else:
        pairs = setup.streams.train_pairs[0]
        experience = memory_experience(pairs, length=options.batch_size * (total + 1),
                                       distinct=2 * options.batch_size)
    workers = options.num_workers if feed == "pipeline" else 0
    training = TrainingConfig(epochs=10 ** 6, batch_size=options.batch_size, num_workers=workers,
                              precision=options.precision)  # training.precision, as a run sets it
    timer = StepTimer(options.device, warmup, steps, profile_steps)
    strategy = build_strategy(setup, training, [*setup.method.plugins(), timer])
    return Trainer(setup, strategy, experience, timer)


def quiet_load(load_backbone: Callable, model: str, device: str):
    """Load the bench's random-weights backbone without the harness's and open_clip's "random
    weights" warnings (random weights are the point here)."""
    loggers = [logging.getLogger(name) for name in ("benchmark.backbone.resolve", "open_clip")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return load_backbone(model, device=device)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def train_until_timed(trainer: Trainer) -> None:
    """Run the strategy until :class:`StepTimer` has its steps."""
    try:
        trainer.strategy.train(trainer.experience)
    except EnoughSteps:
        return
    raise RuntimeError("the training loop ended before the bench's steps were timed")


def step_flops(trainer: Trainer) -> int:
    """FLOPs of one more training step on the last batch: the strategy's own forward, loss and
    backward (the optimizer's element-wise update is not counted)."""
    strategy = trainer.strategy

    def step():
        strategy.optimizer.zero_grad()
        strategy.mb_output = strategy.forward()
        strategy.loss = strategy.criterion()
        strategy.backward()
    flops = count_flops(step)
    strategy.optimizer.zero_grad()
    return flops


def shares(timer: StepTimer, device: torch.device) -> dict[str, float | None]:
    """Where the timed window went (see the module docstring); shares of its wall time."""
    window = timer.window_s or sum(timer.data_s) + sum(timer.step_s)
    data = min(1.0, sum(timer.data_s) / window) if window > 0 else None
    if device.type != "cuda":
        return {"data": data, "compute": None if data is None else 1.0 - data, "device": None, "launch": None}
    if timer.device_busy_s is None or data is None:
        return {"data": data, "compute": None, "device": None, "launch": None}
    busy = min(1.0 - data, timer.device_busy_s * len(timer.step_s) / window)
    return {"data": data, "compute": None, "device": busy, "launch": max(0.0, 1.0 - data - busy)}


def measure_method(method_name: str, feed: str, options, scenario) -> dict[str, Any]:
    """One row of the training section: ``method_name`` trained on ``feed``."""
    from ..method import get_method

    if not get_method(method_name).trains:
        return {"method": method_name, "feed": feed, "status": "does not train"}
    profile_steps = options.profile["profile_steps"] if options.device.type == "cuda" else 0
    trainer = build_trainer(method_name, options, scenario, feed, warmup=options.warmup, steps=options.steps,
                            profile_steps=profile_steps)
    train_until_timed(trainer)
    timer = trainer.timer
    seconds_per_step = timer.window_s / len(timer.step_s)
    flops = step_flops(trainer)
    row = {"method": method_name, "feed": feed, "status": "measured", "batch": options.batch_size,
           "workers": trainer.strategy.num_workers, "steps": len(timer.step_s), "warmup_steps": timer.warmup,
           "pairs_per_s": options.batch_size / seconds_per_step, "s_per_step": seconds_per_step,
           "median_step_s": statistics.median(timer.step_s), "median_data_wait_s": statistics.median(timer.data_s),
           "share": shares(timer, options.device), "gflop_per_step": flops / 1e9,
           "gflop_per_pair": flops / 1e9 / options.batch_size,
           "achieved_tflops": flops / 1e12 / seconds_per_step,
           "precision": options.precision}
    del trainer
    return row


def measure_training(options, scenario, tick: Callable[[], None]) -> dict:
    """The training section: every selected method on both feeds."""
    rows = []
    for method_name in options.methods:
        for feed in FEEDS:
            rows.append(measure_method(method_name, feed, options, scenario))
            tick()
    by = {(r["method"], r["feed"]): r for r in rows}
    for row in rows:  # how much the real pipeline keeps of the step's own speed
        memory = by.get((row["method"], "memory"), {})
        if row["feed"] == "pipeline" and row.get("status") == "measured" and memory.get("status") == "measured":
            row["pipeline_vs_memory"] = row["pairs_per_s"] / memory["pairs_per_s"]
    return {"status": "measured", "model": options.model, "rows": rows,
            "precision_note": f"training.precision = {options.precision} (autocast for bf16 / fp16, with a "
                              "gradient scaler for fp16), as a run with that setting trains",
            "definition": "pairs_per_s = batch / (wall time of the timed steps / steps); pipeline_vs_memory = "
                          "pipeline pairs_per_s / memory pairs_per_s"}
