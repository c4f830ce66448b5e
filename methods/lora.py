"""LoRA on both CLIP encoders through Hugging Face peft, shared or one adapter per task.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022: a frozen weight
``W`` is used as ``W + (alpha / r) * B A`` with trainable ``A`` (``r x in``, Kaiming-uniform)
and ``B`` (``out x r``, zeros), so training starts from the pretrained model exactly.

The adapters are peft's own (``peft.get_peft_model`` on the open_clip model inside the
backbone, ``LoraConfig`` with a ``target_modules`` regex), on every residual block of the
chosen encoders:

* ``targets: [attn]`` wraps each block's ``nn.MultiheadAttention`` in peft's
  ``lora.MultiheadAttention``, which adapts the packed q/k/v projection (``in_proj_weight``) and
  the output projection together. Targeting ``attn.out_proj`` alone would do nothing: PyTorch's
  attention reads ``out_proj.weight`` directly and never calls that layer, so peft's LoRA on it
  is silently ignored (checked in the tests).
* ``targets: [attn, mlp]`` also adapts each block's MLP (``mlp.c_fc``, ``mlp.c_proj``; plain
  ``nn.Linear`` layers, wrapped in ``lora.Linear``).
* ``rank``, ``alpha``, ``dropout`` and ``encoders`` (``visual``, ``text``) are configurable.
  peft's attention LoRA merges its delta into the weights for each forward, so it has no place
  for input dropout: ``dropout`` acts on the MLP adapters only.

Modes:

* ``shared`` — one adapter trained through all tasks: sequential fine-tuning in LoRA form, the
  parameter-efficient counterpart of ``finetune`` (optionally with Avalanche's ``ReplayPlugin``,
  ``replay_memory`` pairs). No task identity needed.
* ``per_task`` — one named peft adapter per task (``task0``, ``task1``, ...), added with
  ``PeftModel.add_adapter`` when the task starts and switched with ``PeftModel.set_adapter``.
  Each adapter trains on its task only; earlier adapters stay frozen (bit-identical). At test
  time the task comes from the protocol (``given``) or from the S-Prompts routing
  (``inferred``): K-means keys (``keys_per_task``, ``distance``) on features of the task's
  training images and captions computed by the pretrained model with all adapters disabled
  (``PeftModel.disable_adapter()``), each test image and caption routed independently to the
  task of its nearest key (see :mod:`methods.sprompts`). peft cannot mix adapters within one
  attention forward, so a batch whose items belong to several tasks is split by task and each
  group is encoded with its own adapter. Replayed pairs from earlier tasks (with
  ``replay_memory``) are encoded with the adapter being trained: rehearsal then regularises the
  new adapter instead of touching frozen ones.

Frozen weights stay bit-identical: peft's attention LoRA merges ``W + BA`` into the module
before each forward and subtracts it afterwards, which leaves ``W`` off by float rounding
(~1e-8 per step) and re-creates the ``nn.Parameter`` objects. Hooks installed here put the
original, untouched parameters back after every forward; gradients are unaffected (the merged
weight the forward used is already in the autograd graph).

Adapters are saved and loaded with peft (:meth:`LoRA.save_adapters` / :meth:`LoRA.load_adapters`:
``save_pretrained`` / ``load_adapter``), so a trained adapter can be used outside the harness.

Parameter counts: LoRA on a ``d``-wide block's attention adds ``r * (d + 3d)`` (q/k/v) ``+
r * (d + d)`` (output) ``= 6 r d``; on its MLP (hidden ``h``) ``2 r (d + h)``. The adapters live
inside the backbone's modules (that is where peft puts them); ``parameter_counts`` reports them
as ``injected`` (and ``adapters``), so ``backbone`` counts the pretrained weights only and
``added``, ``per_task`` and ``shared`` say what LoRA adds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from . import register_method
from .base import Method, MethodConfig, TrainData
from .common.routing import DISTANCES
from .sprompts import TaskKeys

MODES = ("shared", "per_task")
TARGETS = {"attn": "attn", "mlp": r"mlp\.c_fc|mlp\.c_proj"}
ENCODERS = {"visual": r"visual\.transformer", "text": r"transformer"}
SHARED_ADAPTER = "shared"


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = 5e-4  # AdamW; LoRA takes a larger step than full fine-tuning
    weight_decay: float = 0.0  # AdamW weight decay on the adapters
    mode: str = "shared"  # "shared": one adapter for all tasks; "per_task": one peft adapter per task, routed
    rank: int = 8  # r: rank of every adapter
    alpha: float = 16.0  # lora_alpha: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora_dropout (acts on MLP adapters; peft's attention LoRA has no dropout)
    targets: list[str] = field(default_factory=lambda: ["attn"])  # any of: attn (q/k/v/out), mlp (c_fc, c_proj)
    encoders: list[str] = field(default_factory=lambda: ["visual", "text"])  # encoders that get adapters
    replay_memory: int = 0  # image-caption pairs kept by Avalanche's ReplayPlugin (0 = no replay)
    keys_per_task: int = 5  # per_task routing: K-means keys per task and modality (as S-Prompts)
    distance: str = "l2"  # per_task routing: key distance, "l2", "l1" or "cosine"


def _keep_frozen_weights_exact(layer: nn.Module) -> None:
    """Make a peft ``lora.MultiheadAttention`` leave its frozen weights bit-identical.

    peft merges the LoRA delta into ``in_proj_weight`` / ``out_proj.weight`` before the forward
    and unmerges it afterwards by subtraction, registering fresh ``nn.Parameter`` objects that
    differ from the originals by rounding. The pre-hook remembers the registered parameters and
    the post-hook (also run when the forward raises) registers them again.
    """
    if getattr(layer, "_clvl_exact_weights", False):
        return

    def owners(module):
        base = module.get_base_layer()
        return base, base.out_proj.get_base_layer()

    def remember(module, args):
        attention, out_proj = owners(module)
        module._clvl_saved = (attention.in_proj_weight, out_proj.weight)

    def restore(module, args, output):
        saved = module.__dict__.pop("_clvl_saved", None)
        if saved is None:
            return
        for owner, name, original in zip(owners(module), ("in_proj_weight", "weight"), saved):
            if getattr(owner, name) is not original:
                delattr(owner, name)
                owner.register_parameter(name, original)

    layer.register_forward_pre_hook(remember)
    layer.register_forward_hook(restore, always_call=True)
    layer._clvl_exact_weights = True


@register_method
class LoRA(Method):
    """peft LoRA on the CLIP encoders, ``shared`` or ``per_task``; see the module docstring."""

    name = "lora"
    Config = LoraMethodConfig
    summary = "LoRA adapters via peft on both encoders: one shared adapter, or one per task with K-means routing"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        cfg = self.config
        if cfg.mode not in MODES:
            raise ValueError(f"lora.mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
        if cfg.rank < 1 or cfg.alpha <= 0 or not 0.0 <= cfg.dropout < 1.0:
            raise ValueError("lora: rank must be >= 1, alpha > 0 and 0 <= dropout < 1")
        for name, given, known in (("targets", cfg.targets, TARGETS), ("encoders", cfg.encoders, ENCODERS)):
            unknown = set(given) - set(known)
            if unknown or not given:
                raise ValueError(f"lora.{name}: unknown or empty {sorted(unknown) or given}; use any of "
                                 f"{', '.join(known)}")
        if cfg.replay_memory < 0:
            raise ValueError("lora.replay_memory must be >= 0")
        if cfg.distance not in DISTANCES:
            raise ValueError(f"lora.distance must be one of {', '.join(DISTANCES)}, got {cfg.distance!r}")
        if cfg.keys_per_task < 1:
            raise ValueError("lora.keys_per_task must be >= 1")
        self.per_task = cfg.mode == "per_task"
        if self.per_task:
            self.forward_passes = 2  # inferred identity: a pass without adapters for the key search
        self.keys = (TaskKeys(num_tasks, backbone.embed_dim, cfg.keys_per_task, cfg.distance,
                              frozen=self._adapters_disabled) if self.per_task else None)
        # The PeftModel wraps backbone.model in place (the LoRA layers live in the backbone's
        # modules). It is kept out of the module tree: registering it would list every backbone
        # weight twice in the state_dict.
        self.__dict__["_peft"] = None
        self._active: str | None = None  # adapter peft has active
        self._training: str | None = None  # adapter of the latest task started (the one that trains)
        if not self.per_task:
            self._add_adapter(SHARED_ADAPTER)

    # ---- peft plumbing ------------------------------------------------------------------------
    @property
    def peft_model(self):
        """The ``peft.PeftModel`` around ``backbone.model`` (None before the first adapter exists)."""
        return self.__dict__["_peft"]

    def lora_config(self):
        """A fresh ``peft.LoraConfig`` for one adapter (peft keeps one config per adapter)."""
        from peft import LoraConfig

        encoders = "|".join(ENCODERS[e] for e in self.config.encoders)
        targets = "|".join(TARGETS[t] for t in self.config.targets)
        # A string target_modules is matched by peft against whole module names.
        pattern = rf"^({encoders})\.resblocks\.\d+\.({targets})$"
        return LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                          target_modules=pattern, bias="none")

    def adapter_name(self, task: int) -> str:
        return SHARED_ADAPTER if not self.per_task else f"task{task}"

    def _add_adapter(self, name: str) -> None:
        if self.peft_model is None:
            from peft import get_peft_model

            self.__dict__["_peft"] = get_peft_model(self.backbone.model, self.lora_config(), adapter_name=name)
        else:
            self.peft_model.add_adapter(name, self.lora_config())
        self._after_peft_change(name)

    def _after_peft_change(self, active: str) -> None:
        from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

        for module in self.backbone.model.modules():
            if isinstance(module, LoraMultiheadAttention):
                _keep_frozen_weights_exact(module)
        self._active = None
        self._activate(active)

    def _activate(self, name: str) -> None:
        """Make ``name`` peft's active adapter; only the training adapter keeps requires_grad."""
        if self._active != name:
            self.peft_model.set_adapter(name)
            self._active = name
            self._sync_trainable()

    def _sync_trainable(self) -> None:
        # peft's set_adapter / enable_adapter_layers mark the active adapter trainable; here only
        # the adapter of the current task may train, whatever is active for encoding.
        for adapter in self.adapters():
            self.peft_model.set_requires_grad(adapter, requires_grad=adapter == self._training)

    @contextlib.contextmanager
    def _adapters_disabled(self):
        """The pretrained model: every adapter off (routing keys and unseen tasks)."""
        if self.peft_model is None:
            yield
            return
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            self._sync_trainable()  # leaving the context re-enables grads on the active adapter

    def adapters(self) -> list[str]:
        """Names of the peft adapters that exist, in task order."""
        return [] if self.peft_model is None else list(self.peft_model.peft_config)

    # ---- lifecycle ----------------------------------------------------------------------------
    def plugins(self) -> list:
        if self.config.replay_memory == 0:
            return []
        from avalanche.training.plugins import ReplayPlugin

        return [ReplayPlugin(mem_size=self.config.replay_memory)]

    def before_training_exp(self, data: TrainData) -> None:
        name = self.adapter_name(data.task_id)
        if name not in self.adapters():
            self._add_adapter(name)
        self._training = name
        self._activate(name)
        self._sync_trainable()

    def after_training_exp(self, data: TrainData) -> None:
        if self.per_task:
            self.keys.fit(self.backbone, data)

    # ---- encoding -----------------------------------------------------------------------------
    def training_features(self, images: Tensor, tokens: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_task:  # everything in the batch (replayed pairs too) goes through the adapter that trains
            self._activate(self._training)
        return self.backbone.encode_image(images), self.backbone.encode_text(tokens)

    def encode_images(self, images: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if not self.per_task:
            return self.backbone.encode_image(images)
        if task_ids is None:
            task_ids = self.route_images(images)
        return self._encode_by_task(images, task_ids, self.backbone.encode_image)

    def encode_texts(self, tokens: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if not self.per_task:
            return self.backbone.encode_text(tokens)
        if task_ids is None:
            task_ids = self.route_texts(tokens)
        return self._encode_by_task(tokens, task_ids, self.backbone.encode_text)

    def route_images(self, images: Tensor) -> Tensor | None:
        return self.keys.route(self.backbone, "image", images) if self.per_task else None

    def route_texts(self, tokens: Tensor) -> Tensor | None:
        return self.keys.route(self.backbone, "text", tokens) if self.per_task else None

    def _encode_by_task(self, batch: Tensor, task_ids: Tensor | None, encode) -> Tensor:
        """Group items by task and encode each group with its task's adapter (none: pretrained)."""
        existing = set(self.adapters())
        if task_ids is None:
            with self._adapters_disabled():
                return encode(batch)
        task_ids = task_ids.to(batch.device).long()
        features = None
        for task in task_ids.unique().tolist():
            mask = task_ids == task
            group = batch if bool(mask.all()) else batch[mask]
            name = self.adapter_name(task)
            if name in existing:
                self._activate(name)
                part = encode(group)
            else:
                with self._adapters_disabled():
                    part = encode(group)
            if bool(mask.all()):
                return part
            if features is None:
                features = part.new_empty(len(batch), part.shape[-1])
            features[mask] = part
        return features

    # ---- saving through peft ------------------------------------------------------------------
    def save_adapters(self, directory: str | Path) -> None:
        """Write every adapter with peft's ``save_pretrained`` (``<dir>/<adapter>/adapter_model.safetensors``)."""
        if self.peft_model is None:
            raise RuntimeError("lora: no adapter to save yet")
        self.peft_model.save_pretrained(str(directory), selected_adapters=self.adapters())

    def load_adapters(self, directory: str | Path) -> None:
        """Load adapters written by :meth:`save_adapters` (peft's ``load_peft_weights`` and
        ``set_peft_model_state_dict``), creating any that do not exist yet; their saved
        ``LoraConfig`` must match this method's."""
        from peft import LoraConfig
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        folders = sorted((p for p in Path(directory).iterdir() if (p / "adapter_config.json").is_file()),
                         key=lambda p: (len(p.name), p.name))  # task2 before task10
        if not folders:
            raise FileNotFoundError(f"no peft adapter folders (with adapter_config.json) in {directory}")
        mine = self.lora_config()
        for folder in folders:
            saved = LoraConfig.from_pretrained(str(folder))
            if (saved.r, saved.lora_alpha, saved.target_modules) != (mine.r, mine.lora_alpha, mine.target_modules):
                raise ValueError(f"adapter {folder} was saved with r={saved.r}, alpha={saved.lora_alpha}, targets "
                                 f"{saved.target_modules!r}; this method uses r={mine.r}, alpha={mine.lora_alpha}, "
                                 f"targets {mine.target_modules!r}")
            if folder.name not in self.adapters():
                self._add_adapter(folder.name)
            result = set_peft_model_state_dict(self.peft_model, load_peft_weights(str(folder)),
                                               adapter_name=folder.name)
            if result.unexpected_keys:
                raise ValueError(f"adapter {folder} has weights this model lacks: {result.unexpected_keys[:3]}")
        self._active = None
        self._activate(self._training or self.adapters()[-1])

    # ---- accounting ---------------------------------------------------------------------------
    def adapter_parameter_counts(self) -> dict[str, int]:
        """Parameters of each peft adapter, counted from the live LoRA layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        counts = {name: 0 for name in self.adapters()}
        for module in self.backbone.model.modules():
            if isinstance(module, BaseTunerLayer):
                for layer_name in module.adapter_layer_names:
                    for adapter, sub in getattr(module, layer_name).items():
                        parameters = sub.parameters() if isinstance(sub, nn.Module) else [sub]
                        counts[adapter] = counts.get(adapter, 0) + sum(p.numel() for p in parameters)
        return counts

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        sizes = self.adapter_parameter_counts()
        counts["adapters"] = int(sum(sizes.values()))
        # peft puts the adapters inside the backbone's modules; they are the method's own.
        counts["injected"] = counts["adapters"]
        counts["backbone"] -= counts["injected"]
        counts["added"] += counts["injected"]
        counts["per_task"] = int(max(sizes.values(), default=0)) if self.per_task else 0
        counts["shared"] = 0 if self.per_task else counts["adapters"]
        return counts
