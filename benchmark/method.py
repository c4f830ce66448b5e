"""The contract between the harness and a continual-learning method, and the registry that names methods.

A method is one class. The harness builds it with the backbone, its config and the number of
tasks, then drives it through hooks named as in Avalanche's plugins:

* ``before_training_exp(data)`` — ``data`` is a :class:`TrainData`; before the optimizer for task
  ``data.task_id`` is built: allocate or unfreeze what this task trains (a new prompt, a LoRA adapter, ...).
* ``training_features(images, tokens, task_ids)`` — features for one training mini-batch; the
  strategy applies the symmetric InfoNCE loss to them and adds ``extra_loss()``.
* ``after_training_exp(data)`` — after training on task ``data.task_id``: fit routing keys,
  freeze what must not change any more.
* ``encode_images(images, task_ids)`` / ``encode_texts(tokens, task_ids)`` — evaluation
  features. ``task_ids`` is a ``[B]`` tensor when the protocol gives the task identity and
  ``None`` when the method must infer it (route) itself.
* ``route_images(images)`` / ``route_texts(tokens)`` — methods that pick a task themselves
  return the task they would route each item to (``None`` otherwise); the evaluator compares it
  with the truth and records routing accuracy per modality and session.
* ``evaluate_images(images, task_ids, frozen)`` / ``evaluate_texts(tokens, task_ids, frozen)`` —
  what the evaluator calls: a batch's test features and, when ``task_ids`` is None, its routes,
  from one pass. The default calls ``encode_*`` and then ``route_*``; a method whose routing or
  prompt query uses frozen, prompt-free features overrides it to take them from ``frozen()``.
* ``frozen_image_features(images)`` / ``frozen_text_features(tokens)`` — optional: features
  computed by the untouched pretrained backbone (no prompt, no adapter) that the method's
  routing or prompt query needs. They never change during a run, so the evaluator may compute
  them once per test item and cache them across sessions; ``frozen()`` returns them for the
  batch at hand (cached, or computed now). None (the default): the method has none.
* ``configure_optimizer(params, epochs, steps_per_epoch)`` — the optimizer (and optional
  per-epoch LR scheduler) for one task; AdamW with ``config.lr`` / ``config.weight_decay`` by
  default. Before calling it the harness sets ``train_batch_size`` (pairs per training step) on
  the method, for methods whose official code scales the learning rate with the batch.

Everything the method trains must be an ``nn.Parameter`` reachable from the module (so that
the optimizer, checkpoints and parameter counts see it); ``trainable_parameters()`` returns the
ones the current task updates. The backbone is ``self.backbone``; it starts frozen, and a method
unfreezes exactly what it trains.

A subclass sets ``name`` (the method's one name: in records, tables, run ids and
``method_params`` keys, however the method was selected), ``Config`` (a dataclass of its hyperparameters,
every field with a default and a ``metadata={"help": ...}`` text, whose ``__post_init__`` rejects
bad values so that a grid fails when it is planned, before anything trains) and
``task_identity`` (the protocols it supports).

Checkpoints (``run --resume``, :mod:`benchmark.checkpoint`): to continue an interrupted run the
harness builds a fresh method, calls ``before_training_exp`` for every completed task in order,
then loads the saved ``state_dict()`` strictly and restores which parameters required grad;
``after_training_exp`` is *not* replayed. So ``before_training_exp`` must recreate every
per-task parameter or buffer from the task id alone, and whatever the method learns or decides
(routing keys, counters, which prompts are frozen) must live in parameters, persistent buffers
or ``get_extra_state()`` returning plain data (dicts, lists, numbers, strings, tensors).
Plugins from ``plugins()``: Avalanche's ``ReplayPlugin`` is rebuilt by the harness; any other
plugin that keeps state across tasks needs ``state_dict()`` / ``load_state_dict()``.
A checkpoint leaves out the backbone weights that are still the tensors the method was built
with, unwritten (:class:`benchmark.checkpoint.FrozenWeights`): write a backbone weight the way
PyTorch counts (optimizer steps, in-place ops on the parameter, ``load_state_dict``, a new
``nn.Parameter``), never through ``weight.data``, which PyTorch does not count.

One run over several processes (``torchrun ... run --ddp``, :mod:`benchmark.distributed`): a
method runs there only if it sets ``supports_ddp = True``. The harness splits each batch,
sums the gradients of the whole batch's InfoNCE over processes and copies process 0's
parameters and buffers to the others when a task starts and ends; it does *not* synchronise
anything else a method computes from its own share of a batch (a replay memory, counts of the
prompts a batch selected, statistics of the batch). So declare it only when the training step
depends on the batch through ``training_features`` and a per-pair mean ``extra_loss`` alone,
and check it with a 2-process test that the gradients equal the single-process ones.
:meth:`ddp_refusal` says why a configuration cannot run split.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from .backbone import ClipBackbone
from .errors import ConfigError
from .registry import BrokenEntry, Registry, did_you_mean


def _plain(value: Any) -> Any:
    """A config value as JSON would hold it (tuples as lists), so asked and used compare fairly."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters (a method subclasses it and adds fields)."""

    lr: float = field(default=1e-3, metadata={"help": "learning rate of the optimizer built for each task"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of that optimizer"})


@dataclass
class TrainData:
    """What a method may look at when a task starts or ends.

    Attributes:
        task_id: index of the task in the stream (0-based).
        task_name: its human name.
        dataset: the task's training set (an Avalanche dataset of ``(image, tokens, index,
            task)`` items), e.g. to fit routing keys on frozen features.
        encode_batch_size: items per batch for the method's own passes over ``dataset`` (the
            evaluation batch size, ``training.eval_batch_size``; not the training batch size).
        device: where the model lives.
        num_workers: loader processes a method may use for its own passes over ``dataset``
            (``training.num_workers``).
        precision: the precision training runs at (``bf16``, ``fp16`` or ``fp32``:
            ``training.precision`` resolved for the device, :mod:`benchmark.precision`), for the
            method's own encoding passes, e.g. fitting routing keys.
    """

    task_id: int
    task_name: str
    dataset: Any
    encode_batch_size: int
    device: torch.device
    num_workers: int = 0
    precision: str = "auto"

    @property
    def batch_size(self) -> int:
        """The former name of :attr:`encode_batch_size` (it never was the training batch size)."""
        warnings.warn("TrainData.batch_size is now TrainData.encode_batch_size", DeprecationWarning, stacklevel=2)
        return self.encode_batch_size


class Method(nn.Module):
    """Base class of all methods; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Task-identity protocols the method can be evaluated under ("inferred", "given").
    task_identity: ClassVar[frozenset[str]] = frozenset({"inferred", "given"})
    #: False for methods that never train (the runner then skips the training loop).
    trains: ClassVar[bool] = True
    #: A one-line description for ``python -m benchmark methods``.
    summary: ClassVar[str] = ""
    #: Encoder passes per test query, as ``evaluate_images`` runs them without any cache (2 for
    #: query-then-prompt methods such as L2P: the frozen query pass, then the prompted pass). With
    #: the evaluation cache the frozen pass runs once per test item per run, not per session.
    forward_passes: ClassVar[int] = 1
    #: True if one run may be split over processes with ``--ddp`` (see the module docstring).
    supports_ddp: ClassVar[bool] = False
    #: Training pairs per step, set by the harness before ``configure_optimizer`` (None until then).
    train_batch_size: int | None = None

    def __init__(self, backbone: ClipBackbone, config: MethodConfig | None = None, num_tasks: int = 1):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.Config()
        self.num_tasks = num_tasks
        self.backbone.requires_grad_(False)
        #: Config fields the method could not use as asked on this backbone: field -> asked, used, why
        #: (see :meth:`adjust`). The run record keeps them beside the asked configuration.
        self.adjusted: dict[str, dict[str, Any]] = {}

    def adjust(self, field: str, used: Any, why: str) -> Any:
        """Use ``used`` instead of the configured value of ``field``, say so once, and return ``used``.

        For settings that only the backbone can decide (a prompt longer than the text context, a
        depth or layer list beyond the encoder's blocks). The asked value stays in the config, so the
        run's identity does not depend on the backbone's shape; the record and ``show`` report both.
        """
        asked = getattr(self.config, field)
        if _plain(used) != _plain(asked):
            self.adjusted[field] = {"asked": _plain(asked), "used": _plain(used), "why": why}
            logging.getLogger(type(self).__module__).warning(
                "%s: %s %s used as %s (%s)", self.name or type(self).__name__, field, _plain(asked), _plain(used), why)
        return used

    def effective_config(self) -> dict[str, Any]:
        """The configuration this instance really runs with: the config, with :attr:`adjusted` applied."""
        values = {f.name: _plain(getattr(self.config, f.name)) for f in dataclasses.fields(self.config)}
        values.update({name: change["used"] for name, change in self.adjusted.items()})
        return values

    @classmethod
    def ddp_refusal(cls, config: MethodConfig) -> str | None:
        """Why this method with ``config`` cannot run under ``--ddp`` (a phrase), or None if it can."""
        if cls.supports_ddp:
            return None
        return ("it does not declare supports_ddp (nothing checks that its state outside the gradients "
                "stays the same in every process)")

    # ---- lifecycle hooks (Avalanche plugin names) -------------------------------------------
    def before_training_exp(self, data: TrainData) -> None:
        """Prepare task ``data.task_id`` (runs before the optimizer is built)."""

    def after_training_exp(self, data: TrainData) -> None:
        """Finish task ``data.task_id`` (fit keys, freeze, ...)."""

    # ---- training ---------------------------------------------------------------------------
    def plugins(self) -> list:
        """Avalanche plugins the method needs in the training loop (e.g. ``ReplayPlugin``)."""
        return []

    def image_transforms(self) -> dict[str, Any]:
        """Image transforms the method needs instead of the backbone's open_clip ones, by stage:
        ``"train"`` (training pairs, also what routing keys are fitted on) and ``"eval"`` (test
        galleries). A missing stage keeps the backbone's (see :mod:`benchmark.data.preprocessing`)."""
        return {}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters updated while training the current task (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizer(self, params: list[nn.Parameter], epochs: int, steps_per_epoch: int):
        """Return ``(optimizer, scheduler_or_None)`` for one task; the scheduler steps once per epoch."""
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay), None

    def training_features(self, images: Tensor, tokens: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised (image, text) features of a training batch; the task is known here."""
        return self.encode_images(images, task_ids), self.encode_texts(tokens, task_ids)

    def extra_loss(self) -> Tensor | None:
        """A loss term added to InfoNCE for the last ``training_features`` call, or None."""
        return None

    def logit_scale(self) -> Tensor:
        """Temperature of the contrastive loss (the backbone's own, exp-ed)."""
        return self.backbone.logit_scale()

    # ---- evaluation -------------------------------------------------------------------------
    def encode_images(self, images: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return self.backbone.encode_image(images)

    def encode_texts(self, tokens: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return self.backbone.encode_text(tokens)

    def route_images(self, images: Tensor) -> Tensor | None:
        """The task each image would be routed to (``[B]`` long), or None if the method does not route."""
        return None

    def route_texts(self, tokens: Tensor) -> Tensor | None:
        """The task each caption would be routed to, or None."""
        return None

    def frozen_image_features(self, images: Tensor) -> Tensor | None:
        """``[B, D']`` float32 features of ``images`` from the frozen pretrained backbone that the
        method's routing / prompt query needs (None: it needs none). They must depend on nothing
        the method learns: the evaluator caches them per test image for the whole run."""
        return None

    def frozen_text_features(self, tokens: Tensor) -> Tensor | None:
        """The text counterpart of :meth:`frozen_image_features`."""
        return None

    def evaluate_images(self, images: Tensor, task_ids: Tensor | None = None,
                        frozen: Callable[[], Tensor | None] | None = None) -> tuple[Tensor, Tensor | None]:
        """Test features of ``images`` and, when ``task_ids`` is None, the task each is routed to.

        ``frozen()`` returns :meth:`frozen_image_features` of this batch, possibly from the
        evaluator's cache; a method that overrides this hook computes its routes and its
        prompted features from it in one pass. The default ignores it and calls
        :meth:`encode_images` then :meth:`route_images` (methods written before this hook work
        unchanged). The results must equal ``encode_images(images, task_ids)`` and
        ``route_images(images)``.
        """
        features = self.encode_images(images, task_ids)
        return features, (self.route_images(images) if task_ids is None else None)

    def evaluate_texts(self, tokens: Tensor, task_ids: Tensor | None = None,
                       frozen: Callable[[], Tensor | None] | None = None) -> tuple[Tensor, Tensor | None]:
        """The text counterpart of :meth:`evaluate_images`."""
        features = self.encode_texts(tokens, task_ids)
        return features, (self.route_texts(tokens) if task_ids is None else None)

    # ---- accounting -------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Counts from the live modules: ``total`` (all parameters, backbone included),
        ``backbone``, ``trainable`` (what requires grad now) and ``added`` (everything the
        method owns beyond the backbone). Methods that grow per task also report ``per_task``
        (parameters added for each new task) and ``shared`` (added once, used by all tasks).
        A method that places its parameters inside the backbone's modules (LoRA via peft)
        reports them as ``injected`` and counts them in ``added``, not in ``backbone``."""
        backbone = sum(p.numel() for p in self.backbone.parameters())
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "backbone": backbone, "trainable": trainable, "added": total - backbone}


# ============================================================================ the registry

ENTRY_POINT_GROUP = "benchmark.methods"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")
# The built-in methods, imported on first use so that `import benchmark` never imports `methods`.
BUILTIN_METHODS = {
    "coda": "methods.coda:CodaPrompt",
    "dualprompt": "methods.dualprompt:DualPrompt",
    "finetune": "methods.finetune:Finetune",
    "l2p": "methods.l2p:L2P",
    "sprompts": "methods.sprompts:SPrompts",
    "lora": "methods.lora:LoRA",
    "lpi": "methods.lpi.method:LPI",
    "lpi_released": "methods.lpi.method:LPIReleased",
    "zeroshot": "methods.zeroshot:ZeroShot",
}


def _check_method_class(cls, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise BrokenEntry(f"{origin} is not a subclass of benchmark.Method")
    if not cls.name:
        raise BrokenEntry(f"{origin} has no `name` class attribute")


METHODS = Registry("method", group=ENTRY_POINT_GROUP, check=_check_method_class, paths=True,
                   advice="; or give your own class as package.module:ClassName")
for _name, _path in BUILTIN_METHODS.items():
    METHODS.add_lazy(_name, _path)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a subclass of benchmark.Method")
    if not _NAME_PATTERN.match(cls.name or ""):
        raise ValueError(f"{cls.__name__}.name must be lower-case letters, digits, '_' or '-', got {cls.name!r}")
    return METHODS.register(cls.name, cls)


def get_method(name: str) -> type[Method]:
    """The method class for a registry name, a ``module:Class`` path or an entry point."""
    return METHODS.get(name)


def available_methods() -> dict[str, type[Method]]:
    """Registered methods (built-in first), plus those published through entry points."""
    return METHODS.available()


def select_methods(selectors: list[str], method_params: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, type[Method]], dict[str, dict[str, Any]]]:
    """The class of each selected method (by selector) and ``method_params`` keyed by each
    method's one name, its class's ``name``.

    A method may be selected by a registered name, an entry-point name or a ``module:Class``
    path; whichever way, records, tables and ``method_params`` call it by ``cls.name``. A
    ``method_params`` key may be that name or the selector itself; both are normalised to the
    name. Two selected methods with the same name, or a key that names no selected method, are
    configuration errors.
    """
    classes: dict[str, type[Method]] = {}
    selector_of: dict[str, str] = {}  # method name -> the selector that chose it
    for selector in selectors:
        cls = get_method(selector)
        earlier = selector_of.get(cls.name)
        if earlier is not None:
            if classes[earlier] is cls:
                raise ConfigError(f"method {cls.name!r} is selected twice (as {earlier!r} and {selector!r}); "
                                  "list it once in methods")
            raise ConfigError(
                f"methods {earlier!r} and {selector!r} are both named {cls.name!r} (their classes' `name`), and "
                "records, tables and method_params call a method by that name: give one of the classes another "
                "`name`, or run them in separate output folders")
        selector_of[cls.name] = selector
        classes[selector] = cls
    params: dict[str, dict[str, Any]] = {}
    for key, values in (method_params or {}).items():
        if key in selector_of:
            name = key
        elif key in classes:
            name = classes[key].name
        else:
            listed = ", ".join(name if name == sel else f"{name} ({sel})" for name, sel in selector_of.items())
            hint = did_you_mean(str(key), [*selector_of, *classes])
            raise ConfigError(f"method_params names {key!r}, which is not in methods ({listed}){hint}; a method's "
                              "parameters go under its name (its class's `name`), e.g. "
                              f"method_params.{next(iter(selector_of))}.lr")
        if not isinstance(values, Mapping):
            raise ConfigError(f"method_params.{key} must be a mapping of parameter: value, got {values!r}")
        merged = params.setdefault(name, {})
        for field_name, value in values.items():
            if field_name in merged and merged[field_name] != value:
                raise ConfigError(f"method_params gives {name}.{field_name} twice, as {merged[field_name]!r} and "
                                  f"{value!r} (under {name!r} and {key!r}); give it once, under {name!r}")
            merged[field_name] = value
    return classes, params
