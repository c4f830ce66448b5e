"""A conformance check for continual-learning method classes (run it on your own method).

:func:`check_method` drives a method class through the harness exactly as a run does (the
:class:`~benchmark.strategy.ContrastiveStrategy` training loop, then
:func:`~benchmark.evaluation.evaluate_session`), on the CPU, with a tiny random-weight
``clvl-tiny`` backbone and a tiny two-task ``synthetic`` scenario, in a few seconds. It raises
:class:`ConformanceError` (an ``AssertionError``) naming the first property that fails:

``class-contract``   a :class:`~benchmark.method.Method` subclass with a non-empty ``name``, a
                     ``Config`` dataclass (subclass of ``MethodConfig``) whose fields all have
                     defaults, and a non-empty ``task_identity`` within {"inferred", "given"};
                     the class can be built with the backbone, its config and the task count.
``training``         (when ``trains``) one epoch per task, batch 8: the loss is finite, the
                     training features are ``[B, embed_dim]`` and L2-normalised, every
                     optimised parameter is reachable from the module and gets a finite
                     gradient, and at least one gets a non-zero gradient in every task.
``frozen-backbone``  backbone parameters frozen when a task starts (and not unfrozen by the
                     method's ``before_training_exp``) are bit-identical after the task's
                     training and evaluation: frozen means frozen.
``features``         ``encode_images`` / ``encode_texts`` return finite floating ``[B, embed_dim]``
                     L2-normalised features, with ``task_ids=None`` (if "inferred" is supported)
                     and with per-sample task ids (if "given" is supported).
``evaluation``       ``evaluate_session`` runs after every session (and, at the end, under every
                     supported task identity and both galleries) and gives recalls in [0, 100].
``parameter-counts`` ``parameter_counts()`` gives ints ``total >= trainable``, with ``total``,
                     ``backbone``, ``trainable`` and ``added`` matching the live module.
``determinism``      a second run with the same seed gives identical losses and features.
``state-dict``       a fresh instance (same backbone, same seed), after the same
                     ``before_training_exp`` calls, loads the trained ``state_dict()`` strictly
                     and then gives the same features; so does one that loads only what a
                     checkpoint saves (the state without the unwritten frozen backbone).

Use it in a test::

    from benchmark.testing import check_method
    from my_package.my_method import MyMethod

    def test_my_method_conforms():
        check_method(MyMethod)                       # default Config
        check_method(MyMethod, MyMethod.Config(lr=1e-2))

:func:`tiny_setup` gives the same tiny backbone, scenario and strategy for tests of your own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor

from .method import Method, MethodConfig, TrainData

from . import checkpoint as ckpt
from .backbone import ClipBackbone, load_backbone
from .config import TrainingConfig
from .data.synthetic import TASK_ORDER
from .evaluation import DIRECTIONS, KS, Protocol, evaluate_session
from .run.factory import MethodSetup, build_method, build_strategy, train_data
from .scenarios import Scenario, build_scenario
from .strategy import ContrastiveStrategy

__all__ = ["CHECKS", "ConformanceError", "ConformanceReport", "TinySetup", "check_method", "single_thread",
           "tiny_scenario", "tiny_setup"]

#: The properties :func:`check_method` verifies, in the order it verifies them.
CHECKS = ("class-contract", "training", "frozen-backbone", "features", "evaluation", "parameter-counts",
          "determinism", "state-dict")

BACKBONE = "clvl-tiny"  # random weights: built in well under a second, no download, no pretraining
TRAIN_IMAGES, TEST_IMAGES, CAPTIONS_PER_IMAGE = 16, 8, 2
TRAIN_BATCH, EVAL_BATCH = 8, 8
PROBE_IMAGES_PER_TASK = 4  # images (and captions) per task in the fixed feature probe
NORM_TOLERANCE = 1e-3  # |‖f‖ - 1| allowed for "L2-normalised"
_IDENTITIES = frozenset({"inferred", "given"})
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")  # what methods.register_method accepts


class ConformanceError(AssertionError):
    """A method failed a conformance check; ``check`` names it (one of :data:`CHECKS`)."""

    def __init__(self, check: str, message: str):
        super().__init__(f"conformance check {check!r} failed: {message}")
        self.check = check


@dataclass
class ConformanceReport:
    """What :func:`check_method` verified.

    Attributes:
        method: the method's registry name; ``method_class``: ``module.QualName``.
        checks: the checks passed (all of :data:`CHECKS`, in order).
        skipped: checks that did not apply, with the reason (e.g. no training for ``trains=False``).
        timings: seconds spent per stage (``run``, ``determinism``, ``state-dict``, ``total``).
        parameter_counts: ``parameter_counts()`` after the last task of the first run.
        final_recall_at_1: ``{direction: [R@1 per task]}`` after the last session (random
            backbone: only a smoke value, not a result).
        losses: the training loss of every iteration of the first run.
    """

    method: str
    method_class: str
    num_tasks: int
    seed: int
    checks: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    parameter_counts: dict[str, int] = field(default_factory=dict)
    final_recall_at_1: dict[str, list[float | None]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v:,}" for k, v in self.parameter_counts.items())
        skipped = "".join(f"\n  skipped: {k} ({why})" for k, why in self.skipped.items())
        return (f"{self.method} ({self.method_class}): {len(self.checks)} checks passed in "
                f"{self.timings.get('total', 0.0):.1f} s: {', '.join(self.checks)}\n  parameters: {counts}{skipped}")


# ------------------------------------------------------------------------------------ tiny set-up
@functools.lru_cache(maxsize=None)
def tiny_scenario(num_tasks: int = 2) -> Scenario:
    """The tiny synthetic stream (16 train / 8 test images per task, 2 captions each); cached."""
    if not 1 <= num_tasks <= len(TASK_ORDER):
        raise ValueError(f"num_tasks must be between 1 and {len(TASK_ORDER)}, got {num_tasks}")
    return build_scenario("synthetic", {"tasks": list(TASK_ORDER[:num_tasks]), "train_images": TRAIN_IMAGES,
                                        "test_images": TEST_IMAGES, "captions_per_image": CAPTIONS_PER_IMAGE})


class TinySetup(MethodSetup):
    """A method built as the runner builds it (:mod:`benchmark.run.factory`), on the tiny
    backbone and scenario (CPU): ``method``, ``backbone``, ``scenario``, ``streams``, ``device``."""

    def make_strategy(self, plugins: Iterable = (), epochs: int = 1) -> ContrastiveStrategy:
        """The harness's training loop with the method's own plugins plus ``plugins``."""
        training = TrainingConfig(epochs=epochs, batch_size=TRAIN_BATCH, eval_batch_size=EVAL_BATCH)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No loggers specified")
            return build_strategy(self, training, plugins=[*self.method.plugins(), *plugins])

    def train_data(self, task: int) -> TrainData:
        """What the strategy hands to ``before_training_exp`` / ``after_training_exp`` for ``task``."""
        return train_data(self.streams.train_stream[task], self.scenario.task_names, encode_batch_size=EVAL_BATCH,
                          device=self.device)

    def probe_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """A fixed evaluation batch: the first test images and captions of every task, and their task ids."""
        images, tokens, tasks = [], [], []
        for task, gallery in enumerate(self.streams.galleries):
            n = min(PROBE_IMAGES_PER_TASK, len(gallery))
            # Fixed even if the method evaluates with random crops (lpi_released's reference preprocessing).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(task)
                images.append(torch.stack([gallery[i][0] for i in range(n)]))
            tokens.append(gallery.caption_tokens[:n])
            tasks.append(torch.full((n,), task, dtype=torch.long))
        return (torch.cat(images).to(self.device), torch.cat(tokens).to(self.device),
                torch.cat(tasks).to(self.device))


def tiny_setup(method_cls: type[Method], config: MethodConfig | None = None, *, num_tasks: int = 2,
               seed: int = 0) -> TinySetup:
    """Seed, load the random ``clvl-tiny`` backbone, wrap the tiny scenario and build the method,
    as the runner does (so the same seed gives the same model)."""
    config = copy.deepcopy(config) if config is not None else None
    setup = build_method(method_cls, config, tiny_scenario(num_tasks), torch.device("cpu"), seed=seed,
                         load_backbone=_quiet_load_backbone)
    return TinySetup(setup.method, setup.backbone, setup.scenario, setup.streams, setup.device)


def _quiet_load_backbone() -> ClipBackbone:
    import logging

    # "random weights" warnings are the point here; keep them out of the user's log.
    loggers = [logging.getLogger("benchmark.backbone.resolve"), logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return load_backbone(BACKBONE, device="cpu")
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------ the check
def check_method(method_cls: type[Method], config: MethodConfig | None = None, *, num_tasks: int = 2,
                 seed: int = 0) -> ConformanceReport:
    """Check that ``method_cls`` honours the :class:`~benchmark.method.Method` contract; see the module
    docstring for the properties. Raises :class:`ConformanceError` (an ``AssertionError``) naming
    the failed property; returns a :class:`ConformanceReport` when all pass.

    Example::

        from benchmark.testing import check_method
        check_method(MyMethod)
    """
    if not 1 <= num_tasks <= len(TASK_ORDER):
        raise ValueError(f"num_tasks must be between 1 and {len(TASK_ORDER)} (the synthetic tasks), got {num_tasks}")
    try:
        with single_thread():
            return _check_method(method_cls, config, num_tasks=num_tasks, seed=seed)
    except ConformanceError as error:  # say which class failed; keep the original traceback
        label = getattr(method_cls, "__qualname__", repr(method_cls))
        name = getattr(method_cls, "name", "")
        error.args = (f"{label}{f' ({name})' if isinstance(name, str) and name else ''}: {error.args[0]}",)
        raise


def _check_method(method_cls, config, *, num_tasks: int, seed: int) -> ConformanceReport:
    started = time.perf_counter()
    _check_class(method_cls, config)
    report = ConformanceReport(method=method_cls.name,
                               method_class=f"{method_cls.__module__}.{method_cls.__qualname__}",
                               num_tasks=num_tasks, seed=seed, checks=["class-contract"])
    if not method_cls.trains:
        report.skipped["training"] = "trains = False: the runner never trains it"

    tick = time.perf_counter()
    first = _run(method_cls, config, num_tasks=num_tasks, seed=seed)
    report.timings["run"] = time.perf_counter() - tick
    report.checks += [c for c in ("training", "frozen-backbone", "features", "evaluation", "parameter-counts")
                      if c not in report.skipped]
    report.parameter_counts = dict(first.counts)
    report.losses = list(first.losses)
    report.final_recall_at_1 = {d: list(first.rows[-1][d][1]) for d in DIRECTIONS}

    tick = time.perf_counter()
    second = _run(method_cls, config, num_tasks=num_tasks, seed=seed)
    _check_same_run(first, second, seed)
    report.timings["determinism"] = time.perf_counter() - tick
    report.checks.append("determinism")

    tick = time.perf_counter()
    _check_state_dict(method_cls, config, first, num_tasks=num_tasks, seed=seed)
    report.timings["state-dict"] = time.perf_counter() - tick
    report.checks.append("state-dict")
    report.timings["total"] = time.perf_counter() - started
    return report


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (restored after). The tiny model gains
    nothing from more threads, and on a busy machine they make it many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fail(check: str, message: str) -> None:
    raise ConformanceError(check, message)


@contextlib.contextmanager
def _stage(check: str, what: str) -> Iterator[None]:
    """Turn an exception raised by the method's code into a failure of ``check`` (traceback chained)."""
    try:
        yield
    except ConformanceError:
        raise
    except Exception as error:  # noqa: BLE001 — any error in the method's code fails the check
        raise ConformanceError(check, f"{what} raised {type(error).__name__}: {error}") from error


def _check_class(cls: Any, config: MethodConfig | None) -> None:
    check = "class-contract"
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        _fail(check, f"{cls!r} is not a subclass of benchmark.Method")
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(cls.name, str) or not cls.name:
        _fail(check, f"{where} has no `name`: set the class attribute name = 'my_method'")
    if not _NAME_PATTERN.match(cls.name):
        _fail(check, f"{where}.name = {cls.name!r}: use lower-case letters, digits, '_' or '-', starting with a "
                     "letter")
    config_cls = cls.Config
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        _fail(check, f"{where}.Config = {config_cls!r} is not a dataclass: decorate it with @dataclass")
    no_default = [f.name for f in dataclasses.fields(config_cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if no_default:
        _fail(check, f"{where}.Config field(s) {', '.join(no_default)} have no default: every hyperparameter "
                     "needs a default (use field(default_factory=...) for lists and dicts)")
    if not issubclass(config_cls, MethodConfig):
        _fail(check, f"{where}.Config must subclass benchmark.MethodConfig (the strategy reads its lr and "
                     "weight_decay)")
    identity = cls.task_identity
    if isinstance(identity, str) or not isinstance(identity, (set, frozenset, tuple, list)):
        _fail(check, f"{where}.task_identity = {identity!r}: give a frozenset such as frozenset({{'inferred'}})")
    if not identity or not set(identity) <= _IDENTITIES:
        _fail(check, f"{where}.task_identity = {set(identity)!r} must be a non-empty subset of "
                     "{'inferred', 'given'}")
    if not isinstance(cls.trains, bool):
        _fail(check, f"{where}.trains = {cls.trains!r} must be True or False")
    if config is not None and not isinstance(config, config_cls):
        _fail(check, f"the config passed is a {type(config).__name__}, not {where}.Config ({config_cls.__name__})")
    if config is None:
        with _stage(check, f"{where}.Config()"):
            config_cls()


# ------------------------------------------------------------------------------------ one run
@dataclass
class _RunResult:
    method: Method
    setup: TinySetup
    features: dict[str, tuple[Tensor, Tensor]]  # identity -> (image features, text features) of the probe
    losses: list[float]
    rows: list[dict]  # evaluation row after every session
    counts: dict[str, int]
    built: ckpt.FrozenWeights | None = None  # the backbone as built, as a run's checkpoints see it


class _TrainingProbe(SupervisedPlugin):
    """Watches the strategy: reachability of the optimised parameters, losses, features, gradients."""

    def __init__(self, method: Method, embed_dim: int):
        super().__init__()
        self.method, self.embed_dim = method, embed_dim
        self.losses: list[float] = []
        self.trained_ids: set[int] = set()
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._nonzero = False
        self._steps = 0

    def _task(self, strategy) -> str:
        return repr(strategy.task_names[int(strategy.experience.current_experience)])

    def before_training_exp(self, strategy, **kwargs):
        # Runs after the method's before_training_exp and after the optimizer was built.
        names = {id(p): n for n, p in self.method.named_parameters()}
        optimised = [p for group in strategy.optimizer.param_groups for p in group["params"]]
        stray = [tuple(p.shape) for p in optimised if id(p) not in names]
        if stray:
            _fail("training", f"trainable_parameters() gives {len(stray)} parameter(s) of shape(s) {stray[:3]} "
                              "that are not reachable from the module: keep them as nn.Parameter attributes or in "
                              "nn.ParameterList / nn.ParameterDict / nn.ModuleList, so that checkpoints and "
                              "parameter counts see them")
        self._params = [(names[id(p)], p) for p in optimised]
        self.trained_ids = {id(p) for p in self.method.backbone.parameters() if p.requires_grad}
        self._nonzero, self._steps = False, 0

    def after_forward(self, strategy, **kwargs):
        output = strategy.mb_output
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            _fail("training", "training_features must return (image_features, text_features), got "
                              f"{type(output).__name__}")
        batch = len(strategy.mb_x)
        for label, features in zip(("image", "text"), output):
            _check_features("training", f"training_features' {label} features", features, batch, self.embed_dim)

    def after_backward(self, strategy, **kwargs):
        loss = strategy.loss
        if not torch.isfinite(loss).all():
            _fail("training", f"the loss is {float(loss.detach())} at iteration {self._steps} of task "
                              f"{self._task(strategy)}")
        for name, param in self._params:
            grad = param.grad
            if grad is None:
                continue
            if not torch.isfinite(grad).all():
                _fail("training", f"parameter {name} got a non-finite gradient in task {self._task(strategy)}")
            if not self._nonzero and bool((grad != 0).any()):
                self._nonzero = True
        self.losses.append(float(loss.detach()))
        self._steps += 1

    def after_training_exp(self, strategy, **kwargs):
        if self._steps == 0:
            _fail("training", f"no training iteration ran on task {self._task(strategy)}")
        if not self._nonzero:
            names = ", ".join(n for n, _ in self._params[:5])
            _fail("training", f"no trainable parameter received a non-zero gradient in task {self._task(strategy)} "
                              f"(optimised: {names}{', ...' if len(self._params) > 5 else ''}): use the trainable "
                              "parameters in training_features, and do not detach them or run under no_grad")


def _check_features(check: str, what: str, features: Any, batch: int, embed_dim: int) -> None:
    if not isinstance(features, Tensor):
        _fail(check, f"{what} is a {type(features).__name__}, not a tensor")
    if tuple(features.shape) != (batch, embed_dim):
        _fail(check, f"{what} have shape {tuple(features.shape)}, expected [{batch}, {embed_dim}] ([B, embed_dim])")
    if not features.is_floating_point():
        _fail(check, f"{what} have dtype {features.dtype}, expected a floating dtype")
    if not bool(torch.isfinite(features).all()):
        _fail(check, f"{what} contain NaN or inf")
    norms = features.detach().float().norm(dim=-1)
    worst = float((norms - 1).abs().max())
    if worst > NORM_TOLERANCE:
        _fail(check, f"{what} are not L2-normalised: row norms lie in [{float(norms.min()):.4g}, "
                     f"{float(norms.max()):.4g}]; return F.normalize(x, dim=-1)")


def _supported(method_cls: type[Method]) -> list[str]:
    return [i for i in ("inferred", "given") if i in method_cls.task_identity]


@torch.no_grad()
def _probe_features(method: Method, setup: TinySetup, identities: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Probe-batch features under each task identity, checked; on the CPU, float32."""
    images, tokens, tasks = setup.probe_batch()
    embed_dim = setup.backbone.embed_dim
    was_training = method.training
    method.eval()
    out = {}
    try:
        for identity in identities:
            ids = None if identity == "inferred" else tasks
            how = "task_ids=None" if ids is None else "task_ids given"
            with _stage("features", f"encode_images(images, {how})"):
                image_features = method.encode_images(images, ids)
            _check_features("features", f"encode_images(..., {how})", image_features, len(images), embed_dim)
            with _stage("features", f"encode_texts(tokens, {how})"):
                text_features = method.encode_texts(tokens, ids)
            _check_features("features", f"encode_texts(..., {how})", text_features, len(tokens), embed_dim)
            out[identity] = (image_features.detach().float().cpu().clone(),
                             text_features.detach().float().cpu().clone())
    finally:
        method.train(was_training)
    return out


def _check_row(row: dict, after_task: int, protocol: Protocol) -> None:
    for direction in DIRECTIONS:
        for k in KS:
            for task, value in enumerate(row[direction][k][:after_task + 1]):
                if not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
                    _fail("evaluation", f"R@{k} {direction} of task {task} after session {after_task} is {value!r} "
                                        f"({protocol.describe()}); recalls must lie in [0, 100]")


def _evaluate(method: Method, setup: TinySetup, after_task: int, protocol: Protocol) -> dict:
    with _stage("evaluation", f"evaluate_session after session {after_task} ({protocol.describe()})"):
        result = evaluate_session(method, setup.streams.galleries, after_task, protocol, batch_size=EVAL_BATCH,
                                  device=setup.device)
    row = result.recall
    _check_row(row, after_task, protocol)
    for modality, values in (result.routing or {}).items():
        for task, value in enumerate(values[:after_task + 1]):
            if value is not None and not 0.0 <= value <= 100.0:
                _fail("evaluation", f"{modality} routing accuracy of task {task} is {value!r}; it must lie in [0, 100]")
    return row


def _run(method_cls: type[Method], config: MethodConfig | None, *, num_tasks: int, seed: int) -> _RunResult:
    with _stage("class-contract", f"building {method_cls.__qualname__}(backbone, config, num_tasks)"):
        setup = tiny_setup(method_cls, config, num_tasks=num_tasks, seed=seed)
    method = setup.method
    if method.backbone is not setup.backbone:
        _fail("class-contract", "the method must keep the backbone it was given as self.backbone")
    built = ckpt.FrozenWeights(method)  # as the runner takes it, right after building
    identities = _supported(method_cls)
    protocol = Protocol(gallery="union", task_identity=identities[0], tasks="seen")

    probe = _TrainingProbe(method, setup.backbone.embed_dim)
    strategy = None
    if method_cls.trains:
        with _stage("training", "plugins()"):
            plugins = method.plugins()
        if not isinstance(plugins, (list, tuple)):
            _fail("training", f"plugins() must return a list of Avalanche plugins, got {type(plugins).__name__}")
        with _stage("training", "building ContrastiveStrategy"):
            strategy = setup.make_strategy(plugins=[probe])

    rows = []
    for task, experience in enumerate(setup.streams.train_stream):
        frozen = {id(p): (name, p, p.detach().clone()) for name, p in setup.backbone.named_parameters()
                  if not p.requires_grad}
        probe.trained_ids = set()
        if strategy is not None:
            with _stage("training", f"training task {setup.scenario.task_names[task]!r}"):
                strategy.train(experience)
        rows.append(_evaluate(method, setup, task, protocol))
        for pid, (name, param, before) in frozen.items():
            if pid in probe.trained_ids:
                continue  # the method unfroze it for this task (in before_training_exp)
            if param.shape != before.shape or not torch.equal(param.detach(), before):
                _fail("frozen-backbone", f"backbone parameter {name} was frozen (requires_grad=False) when task "
                                         f"{setup.scenario.task_names[task]!r} started but changed during the task "
                                         "(training, after_training_exp or evaluation): a method may change only "
                                         "what it trains")

    features = _probe_features(method, setup, identities)
    last = len(rows) - 1
    for identity in identities:
        for gallery in ("union", "per_task"):
            if (identity, gallery) != (protocol.task_identity, protocol.gallery):
                _evaluate(method, setup, last, Protocol(gallery=gallery, task_identity=identity, tasks="seen"))
    counts = _check_counts(method)
    return _RunResult(method=method, setup=setup, features=features, losses=list(probe.losses), rows=rows,
                      counts=counts, built=built)


def _check_counts(method: Method) -> dict[str, int]:
    check = "parameter-counts"
    with _stage(check, "parameter_counts()"):
        counts = method.parameter_counts()
    if not isinstance(counts, dict):
        _fail(check, f"parameter_counts() must return a dict, got {type(counts).__name__}")
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
    if bad:
        _fail(check, f"parameter_counts() values must be non-negative ints, got {bad} (use int(...) on tensor sums)")
    injected = counts.get("injected", 0)  # the method's own parameters inside the backbone's modules
    live = {"total": sum(p.numel() for p in method.parameters()),
            "backbone": sum(p.numel() for p in method.backbone.parameters()) - injected,
            "trainable": sum(p.numel() for p in method.parameters() if p.requires_grad)}
    live["added"] = live["total"] - live["backbone"]
    missing = [k for k in live if k not in counts]
    if missing:
        _fail(check, f"parameter_counts() lacks {', '.join(missing)} (the run record needs total, backbone, "
                     "trainable and added)")
    if counts["total"] < counts["trainable"]:
        _fail(check, f"parameter_counts() gives total {counts['total']} < trainable {counts['trainable']}")
    wrong = {k: (counts[k], v) for k, v in live.items() if counts[k] != v}
    if wrong:
        detail = "; ".join(f"{k}: reported {r:,}, module has {v:,}" for k, (r, v) in wrong.items())
        _fail(check, f"parameter_counts() disagrees with the live module ({detail}); count from self.parameters()")
    return counts


# ------------------------------------------------------------------------------------ comparisons
def _max_diff(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"max abs difference {float((a - b).abs().max()):.3g}"


def _compare_features(check: str, reference: dict, other: dict, advice: str) -> None:
    for identity, (ref_images, ref_texts) in reference.items():
        images, texts = other[identity]
        for label, a, b in (("image", ref_images, images), ("text", ref_texts, texts)):
            if a.shape != b.shape or not torch.equal(a, b):
                _fail(check, f"{label} features (task identity {identity}) differ: {_max_diff(a, b)}; {advice}")


def _check_same_run(first: _RunResult, second: _RunResult, seed: int) -> None:
    advice = ("draw every random number from torch's global RNG (the harness seeds it), or from a generator "
              "seeded from it, and avoid nondeterministic operations")
    if first.losses != second.losses:
        step = next((i for i, (a, b) in enumerate(zip(first.losses, second.losses)) if a != b),
                    min(len(first.losses), len(second.losses)))
        _fail("determinism", f"two runs with seed {seed} give different training losses from iteration {step} on; "
                             f"{advice}")
    _compare_features("determinism", first.features, second.features, f"two runs with seed {seed}: {advice}")


def _check_state_dict(method_cls: type[Method], config: MethodConfig | None, trained: _RunResult, *,
                      num_tasks: int, seed: int) -> None:
    check = "state-dict"
    with _stage(check, "state_dict() of the trained method"):
        state = {k: v.detach().clone() for k, v in trained.method.state_dict().items()}
    with _stage(check, "building a fresh instance"):
        setup = tiny_setup(method_cls, config, num_tasks=num_tasks, seed=seed)
    fresh = setup.method
    if method_cls.trains:
        for task in range(setup.scenario.num_tasks):
            with _stage(check, f"before_training_exp(task {task}) on a fresh instance"):
                fresh.before_training_exp(setup.train_data(task))
    try:
        fresh.load_state_dict(state, strict=True)
    except Exception as error:  # noqa: BLE001
        raise ConformanceError(check, f"a fresh instance, after before_training_exp for every task, cannot load the "
                                      f"trained state_dict strictly: {error}; allocate every parameter and buffer a "
                                      "task needs in before_training_exp (not after_training_exp)") from error
    features = _probe_features(fresh, setup, _supported(method_cls))
    _compare_features(check, trained.features, features,
                      "a fresh instance that loaded the trained state_dict() does not reproduce the trained model: "
                      "keep all learned state (keys, statistics, counters) in parameters or registered buffers "
                      "(register_buffer), not in plain attributes")
    if trained.built is None:
        return
    # What a checkpoint keeps: the same, without the backbone entries that look unwritten.
    saved, left_out = trained.built.split(trained.method)
    slim = tiny_setup(method_cls, config, num_tasks=num_tasks, seed=seed).method
    if method_cls.trains:
        for task in range(setup.scenario.num_tasks):
            slim.before_training_exp(setup.train_data(task))
    ckpt.restore_module(slim, {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in saved.items()},
                        ckpt.trainable_names(trained.method), f"method {method_cls.__qualname__}", left_out)
    _compare_features(check, trained.features, _probe_features(slim, setup, _supported(method_cls)),
                      "a fresh instance that loaded what a checkpoint saves (the state_dict without the backbone "
                      "weights PyTorch saw no write to) does not reproduce the trained model: write backbone "
                      "weights with in-place ops on the parameter or load_state_dict, never through .data")
