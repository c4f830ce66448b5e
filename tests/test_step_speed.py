"""The training step never waits for the device; precision and torch.compile are settings.

Issue 14, item 4 and the precision part of item 6. Everything runs on the CPU with the random
``clvl-tiny`` backbone and the tiny synthetic stream (:mod:`benchmark.testing`).

*Host-device synchronisations* cannot be observed on the CPU (there is no device to wait for),
so they are counted by what would cause one on CUDA: the ops that copy a value to the host
(``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``), the ops whose
output shape depends on the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing) seen through a ``TorchDispatchMode``, and the Python-level reads that bypass the
dispatcher (``Tensor.tolist``, ``Tensor.cpu``, ``Tensor.numpy``), patched for the duration. The
optimizer's ``step`` is left out of the count: torch keeps its step counters on the host on
purpose (``torch/optim/adamw.py``, ``_get_value``), so their reads are no synchronisation on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from benchmark import precision
from benchmark.backbone.adapter import _make_room_for_prompts
from benchmark.config import TrainingConfig, build_config
from benchmark.errors import ConfigError, TrainingDiverged
from benchmark.run.factory import build_strategy
from benchmark.run.progress import TrainingProgress
from benchmark.strategy import DivergenceWatch
from benchmark.testing import tiny_setup
from methods import get_method
from methods.finetune import Finetune, FinetuneConfig

aten = torch.ops.aten
SHAPE_FROM_DATA = {aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
                   aten.unique_consecutive.default, aten.masked_select.default}
HOST_READS = ("tolist", "cpu", "numpy")


class SyncCounter(TorchDispatchMode):
    """Counts (by name) the ops that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is aten._local_scalar_dense.default or func in SHAPE_FROM_DATA:
            self.syncs.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_counted(found: list[str]):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            found.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class StepProbe(SupervisedPlugin):
    """Per training step (from before the forward to after the update, plugins included): the
    synchronising reads and the number of tensor ops."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[list[str], int]] = []
        self._stack = None

    def before_training_iteration(self, strategy, **kwargs):
        self.found: list[str] = []
        self.counter = SyncCounter()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(host_reads_counted(self.found))
        self._stack.enter_context(self.counter)

    def after_training_iteration(self, strategy, **kwargs):
        self._stack.close()
        self.steps.append((self.counter.syncs + self.found, self.counter.ops))


def probed_strategy(setup, probe, **training):
    strategy = build_strategy(setup, TrainingConfig(**{"epochs": 1, "batch_size": 8, **training}),
                              [*setup.method.plugins(), probe])
    step = strategy.optimizer_step

    def optimizer_step_uncounted(**kwargs):  # see the module docstring
        with _disable_current_modes():
            return step(**kwargs)

    strategy.optimizer_step = optimizer_step_uncounted
    return strategy


def train_tasks(strategy, setup, tasks=2):
    for experience in list(setup.streams.train_stream)[:tasks]:
        strategy.train(experience)


# ============================================================================ no syncs in a step


TRAINING_METHODS = [("lpi", {}), ("lpi_released", {}), ("finetune", {}), ("l2p", {}), ("dualprompt", {}),
                    ("coda", {}), ("sprompts", {}), ("lora", {}), ("lora", {"mode": "per_task"})]


@pytest.mark.parametrize("name, params", TRAINING_METHODS, ids=[f"{n}{'-' + '-'.join(p.values()) if p else ''}"
                                                                 for n, p in TRAINING_METHODS])
def test_a_training_step_makes_no_host_device_synchronisation(name, params):
    cls = get_method(name)
    setup = tiny_setup(cls, cls.Config(**params), num_tasks=2)
    probe = StepProbe()
    train_tasks(probed_strategy(setup, probe), setup)  # task 2 adds LPI's task loss
    assert len(probe.steps) == 8  # 32 pairs per task, batch 8
    for syncs, ops in probe.steps:
        assert syncs == [], syncs
        assert ops > 100  # the probe did see the step


def test_the_sync_counter_sees_each_kind_of_read():
    """The check above can fail: each read it must catch is caught."""
    x = torch.arange(6.0)
    found: list[str] = []
    with host_reads_counted(found), SyncCounter() as counter:
        x[0].item()
        bool(x.sum() > 0)
        float(x[1])
        torch.unique(torch.tensor([1, 1, 2]), return_inverse=True)
        x[x > 2]
        x.nonzero()
        x.tolist()
    assert found == ["Tensor.tolist"]
    assert counter.syncs.count("aten._local_scalar_dense.default") == 3
    assert set(counter.syncs) >= {"aten._unique2.default", "aten.nonzero.default",
                                  "aten.index.Tensor with a boolean mask"}


def test_reading_the_loss_each_step_would_be_counted():
    # The pre-issue strategy read float(loss) every step: a step probe sees that read.
    class Reader(SupervisedPlugin):
        def after_update(self, strategy, **kwargs):
            strategy.last_train_loss  # noqa: B018 (the read is the point)

    setup = tiny_setup(get_method("finetune"), num_tasks=1)
    probe = StepProbe()
    strategy = probed_strategy(setup, probe)
    strategy.plugins.insert(0, Reader())
    train_tasks(strategy, setup, tasks=1)
    assert all(syncs == ["aten._local_scalar_dense.default"] for syncs, _ in probe.steps)


def test_make_room_for_prompts_keeps_each_eot_without_a_sync():
    eot = 9
    text = torch.tensor([[1, 4, 5, eot, 0, 0, 0, 0],    # short: untouched
                         [1, 4, 5, 6, 7, 8, eot, 0],    # cut: EOT moves to the last kept position
                         [1, 4, eot, 0, 0, 0, 0, 0]])
    found: list[str] = []
    with host_reads_counted(found), SyncCounter() as counter:
        ids, pool_ids = _make_room_for_prompts(text, 3)
    assert counter.syncs == [] and found == []
    keep = 5
    expected = []
    for row in text.tolist():  # the rule written out: the first `keep` ids, EOT kept at the end if cut
        end = row.index(eot)
        kept = row[:keep]
        if end >= keep:
            kept[keep - 1] = eot
        expected.append(kept)
    assert ids.tolist() == expected
    assert pool_ids.tolist() == [[r[0], 0, 0, 0, *r[1:]] for r in expected]


# ============================================================================ divergence


@dataclass
class NanAtConfig(FinetuneConfig):
    """Fine-tuning whose loss is NaN at chosen 1-based steps of the first epoch."""


class NanAt(Finetune):
    name = "nan-at"
    Config = NanAtConfig
    bad_steps: tuple[int, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def extra_loss(self):
        self.calls += 1
        return torch.tensor(float("nan")) if self.calls in self.bad_steps else None


def _nan_run(bad_steps, check_every, tasks=1):
    NanAt.bad_steps = bad_steps
    setup = tiny_setup(NanAt, num_tasks=tasks)
    steps_done = []
    strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8),
                              step_hook=lambda s: steps_done.append(s.epoch_iteration))
    strategy.check_every = check_every
    with pytest.raises(TrainingDiverged) as caught:
        train_tasks(strategy, setup, tasks)
    return str(caught.value), steps_done


def test_a_nan_loss_is_reported_at_the_next_check_naming_the_first_bad_step():
    message, steps_done = _nan_run(bad_steps=(2, 3), check_every=3)
    assert "became nan on task 'colours' (epoch 1, step 2)" in message
    assert "lower the learning rate" in message
    assert steps_done == [1, 2]  # the check after step 3 raised, before the step hook of step 3


def test_a_single_nan_step_is_still_caught_at_the_end_of_the_epoch():
    message, steps_done = _nan_run(bad_steps=(2,), check_every=1000)
    assert "(epoch 1, step 2)" in message
    assert steps_done == [1, 2, 3, 4]  # all four steps ran; the epoch-end check raised


def test_an_infinite_loss_is_named_as_such():
    watch = DivergenceWatch(torch.device("cpu"))
    for value in (1.0, float("inf"), float("nan")):
        watch.observe(torch.tensor(value))
    assert watch.first_bad() == (1, math.inf)
    watch.reset()
    watch.observe(torch.tensor(2.0))
    assert watch.first_bad() is None


def test_the_runner_checks_before_saving_a_checkpoint(tmp_path, cache_dir):
    """With a checkpoint due after every step, the NaN of step 2 stops the run at the save of
    step 2: the checkpoint on disk is the one of step 1, written before the loss went bad."""
    from helpers import BASE, SYNTHETIC, error_line, run_main

    from benchmark import checkpoint as ckpt

    NanAt.bad_steps = (2,)
    out = tmp_path / "out"
    code, _, err = run_main(["run", "--methods", "test_step_speed:NanAt", *BASE, *SYNTHETIC, "--checkpoint-every",
                             "1", "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 3, err
    error_line(err, "became nan", "(epoch 1, step 2)", "checkpoint is kept")
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["position"] == {"epoch": 0, "iteration": 1}
    assert math.isfinite(saved["last_train_loss"])


# ============================================================================ reading the loss


def test_the_progress_bar_reads_the_loss_once_per_interval(monkeypatch):
    from benchmark.run import progress

    class Strategy:
        reads = 0

        @property
        def last_train_loss(self):
            Strategy.reads += 1
            return 0.5

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = TrainingProgress("test")
    bar.bar = progress.tqdm(total=100, disable=True)
    strategy = Strategy()
    for _ in range(50):  # 50 steps within one interval: one read
        bar.after_training_iteration(strategy)
        clock[0] += progress.loss_interval() / 100
    assert Strategy.reads == 1
    clock[0] += progress.loss_interval()
    bar.after_training_iteration(strategy)
    assert Strategy.reads == 2
    bar.close()


def test_the_tracker_logs_every_step_with_its_loss(tmp_path):
    """Buffered on the device and flushed in one read, the per-step rows are the ones a per-step
    read would have given: one row per step, in order, each with that step's loss."""
    from benchmark import tracking

    class Losses(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.values = []

        def after_training_iteration(self, strategy, **kwargs):
            self.values.append(float(strategy.train_loss))

    setup = tiny_setup(get_method("finetune"), num_tasks=2)
    tracker = tracking.open_tracker(["csv"], tmp_path, "run", list(setup.scenario.task_names), {})
    tracker.flush_every = 3
    losses = Losses()
    strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8), [losses, tracker])
    train_tasks(strategy, setup)
    tracker.close()
    import csv

    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["metric"] == "train/loss"]
    assert [int(row["step"]) for row in rows] == list(range(8))
    assert [float(row["value"]) for row in rows] == pytest.approx(losses.values, rel=0, abs=0)


# ============================================================================ precision


def test_precision_setting_is_validated_and_resolved():
    assert build_config(assignments=["training.precision=fp16"]).training.precision == "fp16"
    assert build_config().training.precision == "auto"
    with pytest.raises(ConfigError, match="training.precision must be one of auto, bf16, fp16, fp32"):
        build_config(assignments=["training.precision=fp8"])
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("auto", "cuda") == "bf16"
    assert precision.resolve("fp16", "cpu") == "fp16"
    assert precision.grad_scaler("cpu", "fp16") is not None and precision.grad_scaler("cpu", "bf16") is None
    assert isinstance(precision.autocast("cpu", "fp32"), contextlib.nullcontext)


def _autocast_seen(setting):
    setup = tiny_setup(get_method("finetune"), num_tasks=1)
    seen = []
    features = setup.method.training_features

    def spy(images, tokens, task_ids):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return features(images, tokens, task_ids)

    setup.method.training_features = spy
    strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8, precision=setting))
    train_tasks(strategy, setup, tasks=1)
    return seen, strategy, setup


def test_cpu_runs_float32_by_default_and_the_named_precision_when_asked():
    seen, _, _ = _autocast_seen("auto")
    assert {enabled for enabled, _ in seen} == {False}
    seen, _, _ = _autocast_seen("bf16")
    assert set(seen) == {(True, torch.bfloat16)}


def test_auto_on_the_cpu_is_exactly_fp32():
    _, _, auto = _autocast_seen("auto")
    _, _, fp32 = _autocast_seen("fp32")
    for (name, a), (_, b) in zip(auto.method.named_parameters(), fp32.method.named_parameters()):
        assert torch.equal(a, b), name


class Fp16Probe(Finetune):
    """Trains the logit scale and ``w`` only; ``extra_loss`` = ``sum(x @ w)`` with ``x @ w``
    computed under autocast. In float16 the gradient reaching ``x @ w`` is the loss scale itself,
    so at GradScaler's initial scale 2**16 (above float16's largest value, 65504) it overflows,
    and at half that it does not (``x`` is small enough that the gradient of ``w`` stays finite)."""

    name = "fp16-probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w = torch.nn.Parameter(torch.full((4, 1), 1e-3))

    def training_features(self, images, tokens, task_ids):
        self.probe = (images.flatten(1)[:, :4] * 1e-3) @ self.w
        return super().training_features(images, tokens, task_ids)

    def extra_loss(self):
        return self.probe.float().sum()


def test_fp16_scaler_skips_overflowing_steps_without_calling_them_divergence():
    setup = tiny_setup(Fp16Probe, FinetuneConfig(trainable=["logit_scale"]), num_tasks=1)
    weights = []

    def record(strategy):
        weights.append(setup.method.w.detach().clone())

    strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8, precision="fp16"), step_hook=record)
    train_tasks(strategy, setup, tasks=1)  # no TrainingDiverged
    assert setup.method.probe.dtype == torch.float16
    start = torch.full((4, 1), 1e-3)
    assert torch.equal(weights[0], start)  # step 1 overflowed (scale 2**16): skipped
    assert not torch.equal(weights[1], weights[0])  # step 2 (scale 2**15) updated
    assert strategy.scaler.get_scale() == 2.0 ** 15


# ============================================================================ torch.compile


def test_compile_setting_is_validated():
    assert build_config(assignments=["training.compile=true"]).training.compile == "default"
    assert build_config(assignments=["training.compile=false"]).training.compile == "none"
    assert build_config(assignments=["training.compile=reduce-overhead"]).training.compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="training.compile must be one of none, default, reduce-overhead"):
        build_config(assignments=["training.compile=fast"])


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """The plumbing, without compiling: training.compile's mode goes to torch.compile, once per
    strategy, and what it returns computes the features; `none` never calls it."""
    calls = []

    def fake_compile(fn, mode=None):
        calls.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    for mode in ("none", "reduce-overhead"):
        setup = tiny_setup(get_method("finetune"), num_tasks=1)
        train_tasks(build_strategy(setup, TrainingConfig(epochs=2, batch_size=8, compile=mode)), setup, tasks=1)
    assert calls == ["reduce-overhead"]


RUN_COMPILE = "CLVL_TEST_COMPILE"


def _inductor_unavailable() -> str | None:
    if os.environ.get(RUN_COMPILE) != "1":
        return (f"compiling takes minutes on a small CPU (12 min on the shared 2-core test machine); "
                f"set {RUN_COMPILE}=1 to run it")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile's inductor backend needs a C++ compiler on the CPU, and none is installed"
    return None


class Losses(SupervisedPlugin):
    """Every step's loss, read after the step (a test may wait for the device)."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def after_training_iteration(self, strategy, **kwargs):
        self.values.append(float(strategy.train_loss))


@pytest.mark.skipif(_inductor_unavailable() is not None, reason=str(_inductor_unavailable()))
def test_compiled_training_matches_eager():
    """Four compiled LPI steps (inductor on the CPU; the deep prompts and the interaction hooks
    included) against eager: every step's loss within 1e-5 relative, and the trained prompt and
    interaction weights within 1e-3 of the eager update (SGD, so a gradient difference stays a
    difference of the same size). Inductor fuses and reorders float32 arithmetic: bit-identity
    is not expected. Compiling takes minutes on a small CPU, so this is the one compiled case,
    and it runs only with CLVL_TEST_COMPILE=1."""
    runs = {}
    for mode in ("none", "default"):
        torch._dynamo.reset()
        setup = tiny_setup(get_method("lpi"), num_tasks=1)
        before = {n: p.detach().clone() for n, p in setup.method.named_parameters()}
        losses = Losses()
        strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8, compile=mode), [losses])
        try:
            train_tasks(strategy, setup, tasks=1)
        except Exception as error:  # pragma: no cover - depends on the machine's toolchain
            if mode == "none":
                raise
            pytest.skip(f"inductor could not compile here: {type(error).__name__}: {error}"[:300])
        after = {n: p.detach().clone() for n, p in setup.method.named_parameters()}
        runs[mode] = (before, after, losses.values)
    torch._dynamo.reset()
    (start, eager, eager_losses), (start_c, compiled, compiled_losses) = runs["none"], runs["default"]
    assert len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    trained = [n for n in eager if not torch.equal(start[n], eager[n])]
    assert any(n.startswith("prompts.0.") for n in trained) and any(n.startswith("interactions.0.") for n in trained)
    for name in eager:
        assert torch.equal(start[name], start_c[name]), name  # the same seed, the same start
        update = (eager[name] - start[name]).abs().max()
        assert (compiled[name] - eager[name]).abs().max() <= 1e-3 * update + 1e-7, name


def test_fp16_loss_scale_is_saved_and_restored_with_a_checkpoint(tmp_path):
    """A run continued from a checkpoint goes on with the scale its scaler had found (2**15 here,
    after the first step's overflow), not with the initial 2**16."""
    from types import SimpleNamespace

    from benchmark import checkpoint as ckpt
    from benchmark.run.state import RunState, checkpoint_payload, restore

    training = TrainingConfig(epochs=1, batch_size=8, precision="fp16")
    config = FinetuneConfig(trainable=["logit_scale"])
    setup = tiny_setup(Fp16Probe, config, num_tasks=1)
    strategy = build_strategy(setup, training)
    train_tasks(strategy, setup, tasks=1)
    state = RunState.start(1)
    state.completed = 1
    run = SimpleNamespace(run_id="fp16", digest="d", identity={}, method_cls=Fp16Probe, seed=0,
                          adopt_from=None, checkpoint=tmp_path / "checkpoint.pt")
    payload = checkpoint_payload(run, list(setup.scenario.task_names), state, setup.method, strategy, [],
                                 inside=False, current_task_time=0.0, elapsed_s=0.0, peak_memory_mb=0.0)
    ckpt.save(run.checkpoint, payload)
    saved = ckpt.load(run.checkpoint, config_hash="d")
    assert saved["grad_scaler"]["scale"] == 2.0 ** 15

    fresh = tiny_setup(Fp16Probe, config, num_tasks=1)
    again = build_strategy(fresh, training)
    assert again.scaler.get_scale() == 2.0 ** 16
    restore(saved, run=run, task_names=list(fresh.scenario.task_names), method=fresh.method, strategy=again,
            plugins=[], experiences=list(fresh.streams.train_stream), device=fresh.device, label="fp16",
            train_data=fresh.train_data)
    assert again.scaler.get_scale() == 2.0 ** 15
    assert build_strategy(fresh, TrainingConfig(epochs=1, batch_size=8)).scaler is None  # fp32: no scaler, None saved
