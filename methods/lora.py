"""LoRA on both CLIP encoders through Hugging Face peft, shared or one adapter per task.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022: a frozen weight
``W`` is used as ``W + (alpha / r) * B A`` with trainable ``A`` (``r x in``, Kaiming-uniform)
and ``B`` (``out x r``, zeros), so training starts from the pretrained model exactly. Followed:
the paper (Sec. 4.2, Sec. 7.1) and the official code, microsoft/LoRA ``loralib/layers.py``
(``Linear``: scaling ``lora_alpha / r``, dropout on the input of the low-rank branch) and
``examples/NLG/src/model.py`` (GPT-2's fused q/k/v projection adapted with
``enable_lora=[True, False, True]``: query and value only, output projection frozen).

The adapters are peft's own ``lora.Linear`` layers (``peft.get_peft_model`` on the open_clip
model inside the backbone, ``LoraConfig`` with a ``target_modules`` regex), on every residual
block of the chosen encoders.

Attention is split first. open_clip's blocks use ``nn.MultiheadAttention``, whose packed
``in_proj_weight`` is not a layer, and whose ``out_proj`` is never called (PyTorch reads its
weight directly). peft's answer, ``lora.MultiheadAttention``, merges the delta into the weights
around each forward; in peft 0.21 that merge adds the output projection's delta twice (``W +
2 dW`` in the forward, autograd sees one ``dW``: the model trains a different function than it
reports, with half the gradient). Instead, :func:`split_attention` replaces each targeted
block's attention with :class:`SplitAttention`: the same attention with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` as plain ``nn.Linear`` layers holding the pretrained weights (the
names of Hugging Face's ``CLIPAttention``), computed with ``F.scaled_dot_product_attention`` as
PyTorch's attention does. Without adapters it gives open_clip's outputs (to float rounding,
checked in the tests); with adapters every targeted weight acts exactly as ``W + (alpha / r)
B A``, with the true gradient, through peft's ordinary Linear LoRA and nothing of peft's
internals.

* ``targets`` picks the adapted weights: ``q``, ``k``, ``v``, ``out`` (the attention
  projections), ``attn`` (all four), ``mlp`` (``mlp.c_fc`` and ``mlp.c_proj``). The default,
  ``[q, v]``, is the paper's choice (W_q and W_v; Sec. 7.1 finds it the best use of a fixed
  budget) and the official code's.
* ``rank``, ``alpha``, ``dropout`` (on the input of every adapter, as in ``loralib``) and
  ``encoders`` (``visual``, ``text``) are configurable.
* Prefix tuning (``benchmark.backbone.adapter.block_with_prefix``) needs packed attention and
  refuses a split block; LoRA encodes without prompts, so this never arises here.

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
  task of its nearest key (see :mod:`methods.sprompts`). One adapter is active per forward,
  so a batch whose items belong to several tasks is split by task and each group is encoded
  with its own adapter. Replayed pairs from earlier tasks (with ``replay_memory``) are encoded
  with the adapter being trained: rehearsal then regularises the new adapter instead of
  touching frozen ones.

Frozen weights stay bit-identical: peft's Linear LoRA adds ``B A x`` to the frozen layer's
output and never writes into ``W``.

Adapters are saved and loaded with peft (:meth:`LoRA.save_adapters` / :meth:`LoRA.load_adapters`:
``save_pretrained`` / ``load_adapter``). To use one outside the harness, split the attention of
a plain open_clip model with :func:`split_attention` first, then ``PeftModel.from_pretrained``.

Parameter counts: each adapted ``d_in -> d_out`` weight adds ``r (d_in + d_out)``: ``2 r d``
per attention projection of a ``d``-wide block (``4 r d`` for the default ``[q, v]``, ``8 r d``
for ``attn``), ``2 r (d + h)`` for its MLP (hidden ``h``). The adapters live inside the
backbone's modules (that is where peft puts them); ``parameter_counts`` reports them as
``injected`` (and ``adapters``), so ``backbone`` counts the pretrained weights only and
``added``, ``per_task`` and ``shared`` say what LoRA adds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.method import Method, MethodConfig, TrainData

from .common.routing import DISTANCES
from .sprompts import TaskKeys

MODES = ("shared", "per_task")
# Module names (inside a residual block) that each target adapts; the attention ones exist
# once split_attention has run.
TARGETS = {"q": [r"attn\.q_proj"], "k": [r"attn\.k_proj"], "v": [r"attn\.v_proj"], "out": [r"attn\.out_proj"],
           "mlp": [r"mlp\.c_fc", r"mlp\.c_proj"]}
TARGETS["attn"] = TARGETS["q"] + TARGETS["k"] + TARGETS["v"] + TARGETS["out"]
ATTENTION_TARGETS = ("q", "k", "v", "out", "attn")
ENCODERS = {"visual": r"visual\.transformer", "text": r"transformer"}
SHARED_ADAPTER = "shared"


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": (
        "AdamW learning rate; LoRA takes a larger step than full fine-tuning")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapters"})
    mode: str = field(default="shared", metadata={"help": (
        '"shared": one adapter for all tasks; "per_task": one peft adapter per task, routed')})
    rank: int = field(default=8, metadata={"help": "r: rank of every adapter"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha: the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": (
        "lora_dropout: dropout on the input of every adapter (loralib, peft)")})
    # Adapted weights, any of: q, k, v, out (attention projections), attn (all four), mlp (c_fc, c_proj).
    # Default W_q and W_v, as in the paper and the official code.
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": (
        "adapted weights, any of: q, k, v, out (attention projections), attn (all four), mlp (c_fc, c_proj); "
        "default W_q and W_v, as in the paper and the official code")})
    encoders: list[str] = field(default_factory=lambda: ["visual", "text"], metadata={"help": (
        "encoders that get adapters")})
    replay_memory: int = field(default=0, metadata={"help": (
        "image-caption pairs kept by Avalanche's ReplayPlugin (0 = no replay)")})
    keys_per_task: int = field(default=5, metadata={"help": (
        "per_task routing: K-means keys per task and modality (as S-Prompts)")})
    distance: str = field(default="l2", metadata={"help": 'per_task routing: key distance, "l2", "l1" or "cosine"'})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"lora.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("lora: rank must be >= 1, alpha > 0 and 0 <= dropout < 1")
        for name, given, known in (("targets", self.targets, TARGETS), ("encoders", self.encoders, ENCODERS)):
            unknown = set(given) - set(known)
            if unknown or not given:
                raise ValueError(f"lora.{name}: unknown or empty {sorted(unknown) or given}; use any of "
                                 f"{', '.join(known)}")
        if self.replay_memory < 0:
            raise ValueError("lora.replay_memory must be >= 0")
        if self.distance not in DISTANCES:
            raise ValueError(f"lora.distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.keys_per_task < 1:
            raise ValueError("lora.keys_per_task must be >= 1")


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed q/k/v, self- or cross-attention with equal widths) with
    separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` ``nn.Linear`` layers.

    Same computation as PyTorch's ``F.multi_head_attention_forward`` without its rarely used
    options: project, split into heads, ``F.scaled_dot_product_attention`` (scale
    ``1/sqrt(head_dim)``, additive float or boolean ``attn_mask`` with True = masked out as in
    PyTorch's attention, attention dropout in training), merge heads, project. It is called as
    open_clip's ``ResidualAttentionBlock`` calls its attention and returns ``(output, None)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        # skip_init: the weights are copied in by from_multihead, and initialising them would
        # draw random numbers that the seeded LoRA initialisation after it would then miss.
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.utils.skip_init(nn.Linear, embed_dim, embed_dim, bias=bias,
                                                   device=device, dtype=dtype))

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> "SplitAttention":
        """A copy of ``attention`` with its packed ``in_proj`` split into q/k/v layers."""
        unsupported = [what for what, present in (
            ("separate q/k/v widths", not attention._qkv_same_embed_dim),
            ("bias_k/bias_v", attention.bias_k is not None), ("add_zero_attn", attention.add_zero_attn))
            if present]
        if unsupported:
            raise ValueError(f"SplitAttention cannot copy an nn.MultiheadAttention with {', '.join(unsupported)}")
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        split = cls(attention.embed_dim, attention.num_heads, bias=bias is not None, dropout=attention.dropout,
                    batch_first=attention.batch_first, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for index, layer in enumerate((split.q_proj, split.k_proj, split.v_proj)):
                rows = slice(index * attention.embed_dim, (index + 1) * attention.embed_dim)
                layer.weight.copy_(weight[rows])
                if bias is not None:
                    layer.bias.copy_(bias[rows])
            split.out_proj.load_state_dict(attention.out_proj.state_dict())
        for layer, source in ((split.q_proj, weight), (split.k_proj, weight), (split.v_proj, weight),
                              (split.out_proj, attention.out_proj.weight)):
            layer.requires_grad_(source.requires_grad)
        return split

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        if need_weights or key_padding_mask is not None or kwargs.get("is_causal"):
            raise NotImplementedError("SplitAttention supports need_weights=False, attn_mask and no "
                                      "key_padding_mask/is_causal (as open_clip calls its attention)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length = query.shape[:2]

        def heads_first(t: Tensor) -> Tensor:  # [B, L, D] -> [B, heads, L, head_dim]
            return t.reshape(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads_first(self.q_proj(query)), heads_first(self.k_proj(key)), heads_first(self.v_proj(value))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:  # PyTorch's attention: True = may not attend; SDPA: the reverse
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if mask.dim() == 3:  # [B * heads, L, S], as nn.MultiheadAttention takes it
                mask = mask.reshape(batch, self.num_heads, length, mask.shape[-1])
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(model: nn.Module, encoders=("visual", "text")) -> int:
    """Replace the ``nn.MultiheadAttention`` of every residual block of an open_clip CLIP model's
    chosen encoders with an equal :class:`SplitAttention`, in place; returns how many.

    Run it on a plain open_clip model before loading an adapter saved by :class:`LoRA`.
    """
    towers = {"visual": lambda m: m.visual.transformer, "text": lambda m: m.transformer}
    count = 0
    for encoder in encoders:
        for index, block in enumerate(towers[encoder](model).resblocks):
            if isinstance(block.attn, SplitAttention):
                continue
            if type(block.attn) is not nn.MultiheadAttention:
                raise ValueError(f"lora: {encoder} block {index} has {type(block.attn).__name__} attention; "
                                 "LoRA on attention needs open_clip's nn.MultiheadAttention blocks")
            block.attn = SplitAttention.from_multihead(block.attn)
            count += 1
    return count


class LoRA(Method):
    """peft LoRA on the CLIP encoders, ``shared`` or ``per_task``; see the module docstring."""

    name = "lora"
    Config = LoraMethodConfig
    summary = "LoRA adapters via peft on both encoders: one shared adapter, or one per task with K-means routing"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        cfg = self.config
        if set(cfg.targets) & set(ATTENTION_TARGETS):
            # Before any adapter exists: peft then finds plain nn.Linear q/k/v/out layers.
            split_attention(backbone.model, cfg.encoders)
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
        targets = "|".join(dict.fromkeys(name for t in self.config.targets for name in TARGETS[t]))
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
        self._active = None
        self._activate(name)

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

    def frozen_image_features(self, images: Tensor) -> Tensor | None:
        """``per_task``: the routing query, from the model with every adapter off; else None."""
        return self.keys.frozen_features(self.backbone, "image", images) if self.per_task else None

    def frozen_text_features(self, tokens: Tensor) -> Tensor | None:
        return self.keys.frozen_features(self.backbone, "text", tokens) if self.per_task else None

    def evaluate_images(self, images: Tensor, task_ids: Tensor | None = None, frozen=None):
        if not self.per_task:
            return super().evaluate_images(images, task_ids, frozen)
        return self.keys.evaluate(self.backbone, "image", images, task_ids, frozen, lambda x, tasks: (
            self._encode_by_task(x, tasks, self.backbone.encode_image)))

    def evaluate_texts(self, tokens: Tensor, task_ids: Tensor | None = None, frozen=None):
        if not self.per_task:
            return super().evaluate_texts(tokens, task_ids, frozen)
        return self.keys.evaluate(self.backbone, "text", tokens, task_ids, frozen, lambda x, tasks: (
            self._encode_by_task(x, tasks, self.backbone.encode_text)))

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
