"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al., ECCV
2022), for CLIP retrieval.

The method (as in the paper)
    Two kinds of prompts enter a frozen ViT by *prefix tuning* — learned key and value vectors
    concatenated to the keys and values of a block's self-attention:

    * a **G-prompt** (general), shared by all tasks and trained on every task, in the first
      blocks;
    * one **E-prompt** (expert) per task, with a learnable key, in the next blocks. At training
      time the E-prompt of the task being trained is used (the task is known) and a matching loss
      ``λ (1 - cos(q, k_t))`` pulls task ``t``'s key towards the queries of its images; at test
      time the E-prompt whose key is most cosine-similar to the query is used. The query is the
      frozen encoder's ``[CLS]`` feature without prompts.

Defaults and where they come from
    G-prompt length 5 in blocks 0-1, E-prompt length 20 in blocks 2-4 (the paper's L_g, L_e and
    positions; its 1-based "layers 1-2" and "3-5"). ``match_weight`` λ = 1, the matching-loss
    coefficient (``pull_constraint_coeff``) of the PyTorch port of the authors' code (JH-LEE-KR/
    dualprompt-pytorch). The E-prompt pool has one prompt per task, as in the paper. Prompts and
    keys are drawn uniform in [-1, 1], as in that code (``prompt.py``).

    Optimisation and initialisation follow the official code (google-research/l2p
    ``train_continual.py`` and ``configs/imr_dualprompt.py``; dualprompt-pytorch ``main.py``,
    ``engine.py`` and ``configs/imr_dualprompt.py``):

    * Adam (AdamW with zero weight decay), constant learning rate. ``lr`` 0.005 is the
      configured rate *at batch 256* (the ImageNet-R config, the one with L_e = 20); both
      codebases multiply it by ``batch / 256`` (``lr_scaling="linear_256"``), so at the harness's
      batch 64 the optimiser runs at 0.00125. ``lr_scaling="none"`` uses ``lr`` as it is. The
      rate used is ``effective_lr()`` and is shown by ``python -m benchmark show``.
    * The global gradient norm is clipped at ``clip_grad_norm`` 1.0 before every step
      (``--clip-grad`` / ``grad_clip_max_norm``); ``None`` switches clipping off.
    * ``shared_prompt_pool`` (on in every official config): task ``t``'s E-prompt starts as a
      copy of task ``t-1``'s trained E-prompt (dualprompt-pytorch ``engine.py``,
      ``train_and_evaluate``); its key starts fresh (``shared_prompt_key`` is off). Task 0's
      E-prompt, and every E-prompt when the option is off, is drawn uniform in [-1, 1].
      The port's prefix reshape, which mixes the batch and key/value axes when it gathers
      E-prompts (dualprompt-pytorch issue #8), is not copied: here every image gets the key
      and value prefixes of its own E-prompt.

    Prefix layout: a prompt of length ``L`` gives ``L`` key *and* ``L`` value vectors in each of
    its blocks, the layout of the authors' released code (a ``[2, L, D]`` tensor per block; the
    paper's notation splits one ``[L, D]`` prompt into halves, which an odd L_g = 5 does not
    allow). CODA-Prompt's own code splits its length-8 prompts in halves; see
    :mod:`methods.coda`.

How it is adapted to image-text retrieval
    * Query: the frozen image tower's final-LayerNorm ``[CLS]`` feature before the projection
      (width ``vision_width``), shared with L2P and CODA-Prompt
      (:func:`methods.common.selection.frozen_cls_query`).
    * Prefixes enter through the backbone's ``Prompts(prefix={block: (key, value)})`` hook, in the
      projected key/value space of the block's attention, as the paper does.
    * Layers beyond the backbone's depth are dropped (``clip_layers``): on the 3-block test
      backbone ``clvl-tiny`` the G-prompt stays in blocks 0-1 and the E-prompt keeps block 2
      only. At least one E-prompt block must remain.
    * Output and loss: the image feature is CLIP's own projected ``[CLS]``; the strategy's
      symmetric InfoNCE replaces the classification loss; the matching loss is ``extra_loss()``.
    * Text side: frozen and unprompted (as in :mod:`methods.l2p`): keys and queries are image
      features, and a fixed text tower keeps the joint space and earlier tasks' captions as they
      were, while the image prompts move images towards it.
    * Task identity: ``inferred`` matches keys (``route_images`` reports the matched task);
      ``given`` uses the given task's E-prompt. A task whose E-prompt does not exist yet (the
      ``tasks=all`` protocol evaluates tasks before they are trained) is matched by key among the
      trained ones; before the first task there are no E-prompts and only the G-prompt is used.
    * E-prompts are created task by task (in ``before_training_exp``), so the parameter count
      grows as in the paper's accounting; an earlier task's E-prompt and key are frozen
      (``requires_grad=False``) once a later task starts, so they stay bit-identical.

Cost: two image-tower passes per test image; ``parameter_counts()`` reports the G-prompt as
``shared`` and one E-prompt plus its key as ``per_task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts
from benchmark.method import Method, MethodConfig

from .common.routing import use_frozen
from .common.selection import clip_layers, cosine_similarity, frozen_cls_query, pull_loss
from .common.training import (check_clip_grad_norm, check_lr_scaling, clip_grad_norm_before_step,
                              scaled_lr)


@dataclass
class DualPromptConfig(MethodConfig):
    lr: float = field(default=0.005, metadata={"help": (
        "Adam learning rate, constant; the rate at batch 256 (official ImageNet-R config), scaled by lr_scaling")})
    lr_scaling: str = field(default="linear_256", metadata={"help": (
        '"linear_256": lr * batch / 256 as the official code; "none": lr as it is')})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (official code: plain Adam, none)"})
    clip_grad_norm: float | None = field(default=1.0, metadata={"help": (
        "max global gradient norm before each step (official 1.0); None: off")})
    g_length: int = field(default=5, metadata={"help": (
        "L_g: G-prompt prefix length (key and value vectors each), paper")})
    g_layers: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": (
        "blocks with the G-prompt (paper: 1-2, 1-based)")})
    e_length: int = field(default=20, metadata={"help": (
        "L_e: E-prompt prefix length (key and value vectors each), paper")})
    e_layers: list[int] = field(default_factory=lambda: [2, 3, 4], metadata={"help": (
        "blocks with the E-prompt (paper: 3-5)")})
    match_weight: float = field(default=1.0, metadata={"help": (
        "λ of the matching loss 1 - cos(query, true task's key) (dualprompt-pytorch)")})
    shared_prompt_pool: bool = field(default=True, metadata={"help": (
        "task t's E-prompt starts from task t-1's trained one (official); False: U(-1, 1)")})

    def __post_init__(self):
        check_lr_scaling("dualprompt", self.lr_scaling)
        check_clip_grad_norm("dualprompt", self.clip_grad_norm)
        if self.g_length < 1 or self.e_length < 1:
            raise ValueError("dualprompt: g_length and e_length must be >= 1")
        if self.match_weight < 0:
            raise ValueError("dualprompt: match_weight must be >= 0")


class DualPrompt(Method):
    """Shared G-prompt plus per-task E-prompts (prefix tuning), E-prompt chosen by key matching."""

    name = "dualprompt"
    Config = DualPromptConfig
    summary = "DualPrompt (ECCV'22): shared G-prompt + per-task E-prompts by prefix tuning, matched by key"
    forward_passes = 2  # the frozen query pass, then the prompted pass

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        c = self.config
        depth = len(backbone.vision_blocks)
        fits = f"the blocks that exist in backbone {backbone.spec} ({depth})"
        self.g_layers = self.adjust("g_layers", clip_layers(c.g_layers, depth), fits)
        self.e_layers = self.adjust("e_layers", clip_layers(c.e_layers, depth), fits)
        if not self.e_layers:
            raise ValueError(f"dualprompt: none of e_layers {list(c.e_layers)} exists in backbone {backbone.spec} "
                             f"({depth} blocks); E-prompts need at least one block")
        self.width = backbone.vision_width
        # [layer, key/value, L_g, D]; an empty tensor if no G layer fits the backbone.
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, c.g_length, self.width).uniform_(-1, 1))
        self.e_prompts = nn.ParameterList()  # task t: [layer, key/value, L_e, D]
        self.e_keys = nn.ParameterList()  # task t: [D]
        self._match: Tensor | None = None  # matching loss of the last training batch

    # ---- lifecycle ----------------------------------------------------------------------------
    def before_training_exp(self, data):
        task = data.task_id
        device = self.g_prompt.device
        while len(self.e_prompts) <= task:  # one E-prompt and key per task, created when it arrives
            # Drawn on the CPU (the same values on every device), then moved.
            prompt = torch.empty(len(self.e_layers), 2, self.config.e_length, self.width).uniform_(-1, 1)
            key = torch.empty(self.width).uniform_(-1, 1)  # keys always start fresh (shared_prompt_key off)
            if self.config.shared_prompt_pool and len(self.e_prompts):
                # Official shared_prompt_pool: start from the previous task's trained E-prompt.
                prompt = self.e_prompts[-1].detach().cpu().clone()
            self.e_prompts.append(nn.Parameter(prompt.to(device)))
            self.e_keys.append(nn.Parameter(key.to(device)))
        # Train the G-prompt and this task's E-prompt and key; earlier (and later) tasks' stay fixed.
        for t, (prompt, key) in enumerate(zip(self.e_prompts, self.e_keys)):
            prompt.requires_grad_(t == task)
            key.requires_grad_(t == task)
        self.g_prompt.requires_grad_(self.g_prompt.numel() > 0)

    # ---- selection ----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.e_prompts)

    def match(self, query: Tensor) -> Tensor:
        """``[B]`` index of the E-prompt whose key is most cosine-similar to each query."""
        keys = torch.stack(list(self.e_keys))
        return cosine_similarity(query, keys).argmax(dim=-1)

    def _prompts(self, experts: Tensor | None, batch: int) -> Prompts:
        """Prefixes for the G-prompt and, per image, the E-prompt of ``experts`` ``[B]`` (None: G only)."""
        per_layer: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for i, layer in enumerate(self.g_layers):
            g = self.g_prompt[i].unsqueeze(1).expand(-1, batch, -1, -1)  # [2, B, L_g, D]
            per_layer.setdefault(layer, []).append((g[0], g[1]))
        if experts is not None:
            e = torch.stack(list(self.e_prompts))[experts]  # [B, layer, 2, L_e, D]
            for i, layer in enumerate(self.e_layers):
                per_layer.setdefault(layer, []).append((e[:, i, 0], e[:, i, 1]))
        prefix = {layer: (torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1))
                  for layer, parts in per_layer.items()}
        return Prompts(prefix=prefix)

    def _experts_for(self, query: Tensor, task_ids: Tensor | None) -> Tensor | None:
        """E-prompt per image: the given task's where it exists, else the matched one."""
        if self.num_experts == 0:
            return None
        matched = self.match(query)
        if task_ids is None:
            return matched
        task_ids = task_ids.to(matched.device).long()
        return torch.where(task_ids < self.num_experts, task_ids, matched)

    # ---- training -----------------------------------------------------------------------------
    def training_features(self, images, tokens, task_ids):
        task_ids = task_ids.long()
        message = ("dualprompt: a training batch names a task whose E-prompt was not created; "
                   "before_training_exp(task) must run first")
        if self.num_experts == 0:
            raise RuntimeError(message)
        torch._assert_async(task_ids.max() < self.num_experts, message)  # on the device: no wait in the step
        query = frozen_cls_query(self.backbone, images)
        similarity = cosine_similarity(query, torch.stack(list(self.e_keys)))
        self._match = self.config.match_weight * pull_loss(similarity, task_ids)  # key of the true task
        image_features = self.backbone.encode_image(images, self._prompts(task_ids, len(images)))
        with torch.no_grad():  # the text tower is frozen and unprompted
            text_features = self.backbone.encode_text(tokens)
        return image_features, text_features

    def extra_loss(self):
        return self._match

    def effective_lr(self) -> float:
        """The learning rate the optimiser runs at: ``lr`` scaled to the training batch by ``lr_scaling``."""
        return scaled_lr(self.config.lr, self.config.lr_scaling, self.train_batch_size)

    def configure_optimizer(self, params, epochs, steps_per_epoch):
        optimizer = torch.optim.AdamW(params, lr=self.effective_lr(), weight_decay=self.config.weight_decay)
        return clip_grad_norm_before_step(optimizer, self.config.clip_grad_norm), None

    # ---- evaluation ---------------------------------------------------------------------------
    def encode_images(self, images, task_ids=None):
        experts = self._experts_for(frozen_cls_query(self.backbone, images), task_ids)
        return self.backbone.encode_image(images, self._prompts(experts, len(images)))

    def route_images(self, images):
        if self.num_experts == 0:
            return None
        return self.match(frozen_cls_query(self.backbone, images))

    def frozen_image_features(self, images):
        """The query: the frozen tower's pre-projection [CLS] feature (:func:`frozen_cls_query`)."""
        return frozen_cls_query(self.backbone, images)

    def evaluate_images(self, images, task_ids=None, frozen=None):
        """One query for the E-prompt choice and the reported route, then the prompted pass."""
        if self.num_experts == 0:  # no E-prompt yet: no query needed
            return self.backbone.encode_image(images, self._prompts(None, len(images))), None
        query = use_frozen(frozen, lambda: self.frozen_image_features(images))
        experts = self._experts_for(query, task_ids)
        features = self.backbone.encode_image(images, self._prompts(experts, len(images)))
        return features, (self.match(query) if task_ids is None else None)

    # ---- accounting ---------------------------------------------------------------------------
    def parameter_counts(self):
        """Base counts plus ``shared`` (the G-prompt) and ``per_task`` (one E-prompt and its key,
        counted on the most recent task's live tensors; 0 before the first task)."""
        counts = super().parameter_counts()
        counts["shared"] = self.g_prompt.numel()
        counts["per_task"] = (self.e_prompts[-1].numel() + self.e_keys[-1].numel()) if self.num_experts else 0
        return counts
