"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023), for
CLIP retrieval.

The method (as in the paper)
    Instead of choosing prompts, CODA-Prompt *assembles* one prompt per image from a pool of
    prompt components. In every prompted block ``l``, component ``m`` has a prompt ``P_m``
    (``Lp × D``), a key ``K_m`` and an attention vector ``A_m`` (both ``D``). For the query ``q``
    (the frozen encoder's ``[CLS]`` feature without prompts) the weight of a component is the
    cosine similarity of the attended query with its key, ``α_m = cos(q ⊙ A_m, K_m)``, and the
    prompt is ``p = Σ_m α_m P_m`` — end-to-end differentiable, so keys and attention vectors are
    trained by the task loss itself (no matching loss). ``p`` enters the block by prefix tuning:
    its first ``Lp/2`` rows are key prefixes and the last ``Lp/2`` value prefixes. The pool is
    split evenly among the tasks: each task adds ``pool_size // num_tasks`` new components,
    initialised orthogonal (Gram-Schmidt) to the earlier ones, and trains only those; earlier
    components are used but frozen. An orthogonality penalty on K, A and P is optional.

Defaults and where they come from
    ``pool_size`` 100 components, ``prompt_length`` 8, prefix tuning in blocks 0-4 (the paper's
    M, Lp and layers 1-5, 1-based). ``lr`` 1e-3 with Adam (the paper's optimiser, batch 128;
    the authors' ``configs/*_prompt.yaml``), decayed by the authors' own cosine schedule (see
    ``lr_schedule`` below). ``ortho_weight`` 0: the authors' released run scripts pass
    ``--prompt_param 100 8 0.0`` (pool, length, orthogonality-penalty weight), so the released
    results use the orthogonal initialisation only; set it > 0 to add the penalty.

How it is adapted to image-text retrieval
    * Query: the frozen image tower's final-LayerNorm ``[CLS]`` feature before the projection
      (width ``vision_width``), shared with L2P and DualPrompt
      (:func:`methods.common.selection.frozen_cls_query`).
    * Prefixes enter through the backbone's ``Prompts(prefix=...)`` hook, in the projected
      key/value space of the block's attention. Prefix layout: the prompt is split in halves
      (``Lp/2`` keys, ``Lp/2`` values), as in the authors' code; ``prompt_length`` must be even.
    * Layers beyond the backbone's depth are dropped (``clip_layers``): the 3-block test backbone
      ``clvl-tiny`` keeps blocks 0-2.
    * Components per task: ``pool_size // num_tasks`` (at least 1); the remainder of the pool is
      never allocated. Gram-Schmidt makes new K, A and (flattened) P rows orthogonal to all
      earlier ones of the same block while the width allows; beyond that (more components than
      dimensions, e.g. 100 components on a 96-wide test backbone) new rows are random unit
      vectors (see :func:`methods.common.selection.gram_schmidt`).
    * Components are created task by task in ``before_training_exp`` (so ``per_task`` is the
      real increment) and earlier tasks' are frozen with ``requires_grad=False``: they stay
      bit-identical. Training and test both use every component created so far, as the
      authors' code does (the current task's trainable, the earlier ones detached).
    * Learning-rate schedule (``lr_schedule``), stepped once per epoch and restarted every task:
      ``"coda"`` (default) is the authors' ``CosineSchedule`` (GT-RIPL/CODA-Prompt
      ``utils/schedulers.py``, used by ``learners/default.py``, which steps it at the start of
      every epoch after the first, after its constructor left the counter at -1): epochs 0 and 1
      run at ``lr`` and epoch ``e >= 1`` of ``K`` (0-based) at ``lr · cos(0.495 π (e - 1) / (K - 1))``
      (their ``99 π e' / (200 (K - 1))`` with the counter ``e' = e - 1``), so the last epoch runs at
      ``lr · cos(0.495 π (K - 2) / (K - 1))`` (0.71 lr for K = 3, 0.39 lr for K = 5). With ``K = 1``
      their constructor divides 0 by 0 and fails; here the single epoch runs at ``lr``. ``"cosine"`` is torch's ``CosineAnnealingLR``
      over the task's epochs (the half cosine from ``lr`` towards 0, which this port used
      before), ``"constant"`` no schedule.
    * Precision: the query pass and the weights ``α`` are computed in float32 with autocast
      off, so under bf16 autocast on CUDA ``α`` is the float32 one.
    * Output and loss: CLIP's own projected ``[CLS]`` feature; the strategy's symmetric InfoNCE
      replaces the classification loss; the optional penalty is ``extra_loss()``.
    * Text side: frozen and unprompted (as in :mod:`methods.l2p`).
    * Task identity: CODA-Prompt is task-agnostic (the prompt is a weighted sum over all
      components), so a given task label is ignored and ``route_images`` returns None.

Cost: two image-tower passes per test image; ``parameter_counts()`` reports one task's components
(P, K, A in every prompted block) as ``per_task`` and 0 ``shared``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts
from benchmark.method import Method, MethodConfig

from .common.precision import full_precision
from .common.routing import use_frozen
from .common.selection import clip_layers, frozen_cls_query, gram_schmidt, ortho_penalty

LR_SCHEDULES = ("coda", "cosine", "constant")


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """The learning-rate factor of 0-based ``epoch`` of ``epochs`` as the authors' training loop
    applies their ``CosineSchedule``: 1 for epochs 0 *and* 1, then ``cos(0.495 π (epoch - 1) /
    (epochs - 1))``.

    Why the shift: the scheduler's constructor steps it to 0 and then resets its counter to -1
    (``utils/schedulers.py``), and ``learners/default.py`` steps it only at the start of every
    epoch after the first, so the first step lands on factor cos(0) again. The last epoch runs at
    ``cos(0.495 π (K - 2) / (K - 1))``, never at the formula's end point cos(0.495 π). With a
    single epoch their constructor divides 0 by 0 and fails; here that epoch runs at ``lr``."""
    if epochs <= 1 or epoch <= 0:
        return 1.0
    return math.cos(0.495 * math.pi * (epoch - 1) / (epochs - 1))


@dataclass
class CodaPromptConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": (
        "Adam learning rate, decayed per epoch by lr_schedule (paper: 1e-3 with cosine decay, batch 128)")})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (paper: plain Adam, none)"})
    pool_size: int = field(default=100, metadata={"help": (
        "M: prompt components in all, split evenly among the tasks (paper)")})
    prompt_length: int = field(default=8, metadata={"help": (
        "Lp: rows per component, half key prefixes and half value prefixes (paper)")})
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": (
        "prompted blocks (paper: 1-5, 1-based)")})
    ortho_weight: float = field(default=0.0, metadata={"help": (
        "μ of the optional orthogonality penalty (authors' run scripts: 0.0)")})
    lr_schedule: str = field(default="coda", metadata={"help": (
        "per epoch: \"coda\" lr·cos(0.495π·e/(K-1)) (authors'), \"cosine\" (half), \"constant\"")})

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"coda.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.prompt_length < 2 or self.prompt_length % 2:
            raise ValueError("coda: prompt_length must be even and >= 2 (half keys, half values), "
                             f"got {self.prompt_length}")
        if self.ortho_weight < 0:
            raise ValueError("coda: ortho_weight must be >= 0")


class CodaPrompt(Method):
    """Attention-weighted sums of prompt components (prefix tuning), new components per task."""

    name = "coda"
    Config = CodaPromptConfig
    summary = "CODA-Prompt (CVPR'23): attention-weighted prompt components by prefix tuning, new ones per task"
    forward_passes = 2  # the frozen query pass, then the prompted pass

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        c = self.config
        # Depends on the stream's length, so it can only be checked here.
        self.per_task = c.pool_size // max(1, num_tasks)
        if self.per_task < 1:
            raise ValueError(f"coda: pool_size {c.pool_size} gives no component to each of {num_tasks} tasks")
        self.layers = self.adjust("layers", clip_layers(c.layers, len(backbone.vision_blocks)),
                                  f"the blocks that exist in backbone {backbone.spec} ({len(backbone.vision_blocks)})")
        if not self.layers:
            raise ValueError(f"coda: none of layers {list(c.layers)} exists in backbone {backbone.spec}")
        self.width = backbone.vision_width
        # Task t's components, per prompted block: P [layer, n, Lp, D], K and A [layer, n, D].
        self.prompts = nn.ParameterList()
        self.keys = nn.ParameterList()
        self.attention = nn.ParameterList()
        self._ortho: Tensor | None = None  # orthogonality penalty of the last training batch

    # ---- lifecycle ----------------------------------------------------------------------------
    def before_training_exp(self, data):
        while len(self.prompts) <= data.task_id:
            self._add_task_components()
        for t in range(len(self.prompts)):  # only the current task's components train
            for params in (self.prompts, self.keys, self.attention):
                params[t].requires_grad_(t == data.task_id)

    @torch.no_grad()
    def _add_task_components(self) -> None:
        """New components for the next task, Gram-Schmidt-orthogonal to the earlier ones per block."""
        n, length, width = self.per_task, self.config.prompt_length, self.width
        device = next(self.backbone.parameters()).device

        def orthogonal(earlier: nn.ParameterList, dim: int) -> Tensor:
            rows = []
            for i in range(len(self.layers)):  # drawn on the CPU: the same values on every device
                old = torch.cat([e[i].reshape(-1, dim).cpu() for e in earlier]) if len(earlier) else None
                rows.append(gram_schmidt(n, dim, old))
            return torch.stack(rows)  # [layer, n, dim]

        self.prompts.append(nn.Parameter(orthogonal(self.prompts, length * width).reshape(
            len(self.layers), n, length, width).to(device)))
        self.keys.append(nn.Parameter(orthogonal(self.keys, width).to(device)))
        self.attention.append(nn.Parameter(orthogonal(self.attention, width).to(device)))

    # ---- the prompt ---------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return sum(k.shape[1] for k in self.keys)

    def _components(self) -> tuple[Tensor, Tensor, Tensor]:
        """All components so far: P ``[layer, M, Lp, D]``, K and A ``[layer, M, D]``."""
        return (torch.cat(list(self.prompts), dim=1), torch.cat(list(self.keys), dim=1),
                torch.cat(list(self.attention), dim=1))

    def attention_weights(self, query: Tensor) -> Tensor:
        """``α [B, layer, M]``: ``cos(q ⊙ A_m, K_m)`` of every query with every component of every block.

        Computed without materialising ``q ⊙ A`` (``[B, layer, M, D]``):
        ``(q ⊙ A)·K = q·(A ⊙ K)`` and ``‖q ⊙ A‖² = q²·A²``.
        """
        _, keys, attention = self._components()
        with full_precision(query.device):  # float32 even under autocast (see the module docstring)
            query, keys, attention = query.float(), keys.float(), attention.float()
            dot = torch.einsum("bd,lmd->blm", query, attention * keys)
            attended_norm = torch.einsum("bd,lmd->blm", query ** 2, attention ** 2).sqrt().clamp_min(1e-12)
            return dot / (attended_norm * keys.norm(dim=-1).clamp_min(1e-12))

    def _prompts(self, query: Tensor) -> Prompts:
        if not len(self.prompts):  # before the first task: nothing to add (the pretrained model)
            return Prompts()
        prompts = self._components()[0]
        mixed = torch.einsum("blm,lmpd->blpd", self.attention_weights(query), prompts)  # [B, layer, Lp, D]
        half = self.config.prompt_length // 2
        return Prompts(prefix={layer: (mixed[:, i, :half], mixed[:, i, half:]) for i, layer in enumerate(self.layers)})

    # ---- training -----------------------------------------------------------------------------
    def training_features(self, images, tokens, task_ids):
        query = frozen_cls_query(self.backbone, images)
        image_features = self.backbone.encode_image(images, self._prompts(query))
        self._ortho = None
        if self.config.ortho_weight > 0:  # penalty on all components so far (earlier ones are frozen)
            prompts, keys, attention = self._components()
            penalty = sum(ortho_penalty(t[i]) for i in range(len(self.layers)) for t in (prompts, keys, attention))
            self._ortho = self.config.ortho_weight * penalty
        with torch.no_grad():  # the text tower is frozen and unprompted
            text_features = self.backbone.encode_text(tokens)
        return image_features, text_features

    def extra_loss(self):
        return self._ortho

    def configure_optimizer(self, params, epochs, steps_per_epoch):
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        if self.config.lr_schedule == "constant":
            return optimizer, None
        if self.config.lr_schedule == "cosine":
            return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: coda_cosine_factor(epoch, epochs))

    # ---- evaluation ---------------------------------------------------------------------------
    def encode_images(self, images, task_ids=None):
        # Task-agnostic: a given task label is ignored.
        return self.backbone.encode_image(images, self._prompts(frozen_cls_query(self.backbone, images)))

    def frozen_image_features(self, images):
        """The query: the frozen tower's pre-projection [CLS] feature (:func:`frozen_cls_query`)."""
        return frozen_cls_query(self.backbone, images)

    def evaluate_images(self, images, task_ids=None, frozen=None):
        if not len(self.prompts):  # before the first task: the pretrained model, no query needed
            return self.backbone.encode_image(images, Prompts()), None
        query = use_frozen(frozen, lambda: self.frozen_image_features(images))
        return self.backbone.encode_image(images, self._prompts(query)), None  # CODA does not route

    # ---- accounting ---------------------------------------------------------------------------
    def parameter_counts(self):
        """Base counts plus ``per_task`` (one task's P, K and A in every prompted block, counted on
        the most recent task's live tensors; 0 before the first task) and ``shared`` (0)."""
        counts = super().parameter_counts()
        counts["per_task"] = (self.prompts[-1].numel() + self.keys[-1].numel() + self.attention[-1].numel()
                              if len(self.prompts) else 0)
        counts["shared"] = 0
        return counts
