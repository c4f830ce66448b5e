"""L2P: Learning to Prompt for Continual Learning (Wang et al., CVPR 2022), for CLIP retrieval.

The method (as in the paper)
    A pool of ``M`` prompts, each ``Lp`` tokens of the image tower's width, every prompt with a
    learnable key. For an image, the *query* is the frozen encoder's ``[CLS]`` feature computed
    without prompts; the ``N`` prompts whose keys are most cosine-similar to the query are
    concatenated (most similar first) and prepended to the image's tokens, and the prompted image
    is encoded again. A surrogate loss ``λ Σ_i (1 - cos(q, k_si))`` pulls the chosen keys towards
    the query. The backbone stays frozen; one pool serves every task (no task identity).

Defaults and where they come from
    ``pool_size`` 10, ``prompt_length`` 5, ``top_k`` 5 — the paper's M, Lp, N and the defaults of
    the PyTorch port of the authors' code (JH-LEE-KR/l2p-pytorch ``main.py``; the google-research
    ``configs/cifar100_l2p.py`` now ships length 10, top-4). ``pull_weight`` 0.1 — that port's
    ``pull_constraint_coeff``; the paper only names it λ. Prompts and keys are initialised
    uniform in [-1, 1] (dualprompt-pytorch's range; l2p-pytorch ``prompt.py`` calls
    ``nn.init.uniform_`` with its default range [0, 1), a difference not adopted here).
    Optimisation follows the official code (google-research/l2p ``train_continual.py`` and
    ``configs/cifar100_l2p.py``; l2p-pytorch ``main.py`` and ``engine.py``):

    * Adam (AdamW with zero weight decay is Adam), constant learning rate.
    * ``lr`` 0.03 is the configured rate *at batch 256*: both codebases multiply it by
      ``batch / 256`` (``lr_scaling="linear_256"``), so at the harness's batch 64 the optimiser
      runs at 0.0075 and at the paper's batch 128 at 0.015. ``lr_scaling="none"`` uses ``lr`` as
      it is. The rate used is ``effective_lr()`` and is shown by ``python -m benchmark show``.
    * The global gradient norm is clipped at ``clip_grad_norm`` 1.0 before every step
      (``grad_clip_max_norm`` / ``--clip-grad``); ``None`` switches clipping off.
    * ``batchwise_prompt`` (default on, as in both codebases): at *training* time every image of
      a batch uses the ``top_k`` prompts chosen most often across the batch's instance-wise
      top-k sets (ties to the lower prompt index), and the key-pull loss pulls those keys. At
      *test* time selection is always per image, whatever the option: the batch-wise vote would
      let the other test images of a batch decide an image's prompts, so a result would depend
      on the test batch (google-research/l2p issue #28). ``batchwise_prompt=False`` selects per
      image at training as well.

How it is adapted to image-text retrieval
    * Query: the output of the frozen image tower's final LayerNorm at ``[CLS]``, before the
      projection into the joint space (width ``vision_width``: 768 for ViT-B/16, so a 10×5 pool
      has 10·5·768 + 10·768 = 46,080 parameters, the paper's count). Shared with DualPrompt and
      CODA-Prompt in :mod:`methods.common.selection`.
    * Where prompts go: the backbone's ``Prompts(tokens=...)`` hook, right after the image
      ``[CLS]`` token, after the positional embedding and before ``ln_pre`` (L2P prepends them to
      the patch embeddings, which carry their positions already).
    * Output: the paper feeds the average of the prompt positions' outputs to a new classifier.
      Retrieval has no classifier: the image feature stays CLIP's own — the ``[CLS]`` output,
      pooled and projected as in the pretrained model (the prompt positions are excluded from
      pooling by the backbone) — so it lives in the space the frozen text tower was trained for.
    * Loss: the strategy's symmetric InfoNCE on (prompted image, caption) features replaces the
      cross-entropy; the surrogate loss is added through ``extra_loss()``.
    * Text side: frozen and unprompted. L2P's query and keys are defined on images; a prompt pool
      for captions would need a query of its own, which the paper does not have. Keeping the
      text tower fixed also keeps the joint space anchored: the image prompts learn to move
      images towards the frozen caption features, and captions of earlier tasks are encoded
      exactly as before (no forgetting on the text side).
    * Selection: batch-wise at training (``batchwise_prompt``, official default) and per image at
      test time, see above. The released code's diversity-by-frequency penalty is not used.
    * Precision: the query pass and the key scoring run in float32 with autocast off
      (:mod:`methods.common.selection`), so under bf16 autocast on CUDA the chosen prompts are
      the float32 ones.
    * Task identity: none is needed; under the ``given`` protocol the label is ignored (L2P is
      task-agnostic), so both protocols give the same features. ``route_images`` returns None:
      the pool is shared, no prompt belongs to a task.

Cost: two image-tower passes per test image (query, then prompted); ``parameter_counts()`` reports
the pool and keys as ``shared`` and 0 ``per_task``.

Small backbones take the paper's 25 prompt tokens too: the image sequence simply grows (the tiny
synthetic backbone's 17 image tokens become 42).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts
from benchmark.method import Method, MethodConfig

from .common.routing import use_frozen
from .common.selection import batchwise_top_k, frozen_cls_query, pull_loss, select_top_k
from .common.training import (check_clip_grad_norm, check_lr_scaling, clip_grad_norm_before_step,
                              scaled_lr)


@dataclass
class L2PConfig(MethodConfig):
    lr: float = field(default=0.03, metadata={"help": (
        "Adam learning rate, constant; the rate at batch 256 (official configs), scaled by lr_scaling")})
    lr_scaling: str = field(default="linear_256", metadata={"help": (
        '"linear_256": lr * batch / 256 as the official code; "none": lr as it is')})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (official code: plain Adam, none)"})
    clip_grad_norm: float | None = field(default=1.0, metadata={"help": (
        "max global gradient norm before each step (official 1.0); None: off")})
    pool_size: int = field(default=10, metadata={"help": "M: prompts in the pool (paper)"})
    prompt_length: int = field(default=5, metadata={"help": "Lp: tokens per prompt (paper)"})
    top_k: int = field(default=5, metadata={"help": (
        "N: prompts chosen per image (paper); top_k * prompt_length tokens are prepended")})
    pull_weight: float = field(default=0.1, metadata={"help": (
        "λ of the surrogate key-pull loss (l2p-pytorch's pull_constraint_coeff)")})
    batchwise_prompt: bool = field(default=True, metadata={"help": (
        "training only: the batch's most frequent top_k prompts (official default)")})

    def __post_init__(self):
        check_lr_scaling("l2p", self.lr_scaling)
        check_clip_grad_norm("l2p", self.clip_grad_norm)
        if self.pool_size < 1 or self.prompt_length < 1:
            raise ValueError("l2p: pool_size and prompt_length must be >= 1")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"l2p: top_k must be between 1 and pool_size ({self.pool_size}), got {self.top_k}")
        if self.pull_weight < 0:
            raise ValueError("l2p: pull_weight must be >= 0")


class L2P(Method):
    """Prompt pool with learnable keys, instance-wise top-N selection by a frozen query."""

    name = "l2p"
    Config = L2PConfig
    summary = "L2P (CVPR'22): prompt pool with learnable keys, top-N prompts prepended to image tokens"
    forward_passes = 2  # the frozen query pass, then the prompted pass

    @classmethod
    def ddp_refusal(cls, config):
        if config.batchwise_prompt:
            return ("its batch-wise prompt selection counts the prompts chosen in each process's part of the batch, "
                    "not in the whole batch")
        return super().ddp_refusal(config)

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        c = self.config
        width = backbone.vision_width
        self.prompts = nn.Parameter(torch.empty(c.pool_size, c.prompt_length, width).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(c.pool_size, width).uniform_(-1, 1))
        self._pull: Tensor | None = None  # surrogate loss of the last training batch

    # ---- selection ----------------------------------------------------------------------------
    def select(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices [B, top_k], similarity [B, pool_size])`` of the prompts chosen for ``query``."""
        return select_top_k(query, self.keys, self.config.top_k)

    def _encode_prompted(self, images: Tensor, indices: Tensor) -> Tensor:
        tokens = self.prompts[indices].flatten(1, 2)  # [B, top_k * Lp, D], most similar prompt first
        return self.backbone.encode_image(images, Prompts(tokens=tokens))

    # ---- training -----------------------------------------------------------------------------
    def training_features(self, images, tokens, task_ids):
        indices, similarity = self.select(frozen_cls_query(self.backbone, images))
        if self.config.batchwise_prompt:  # the batch's most frequent prompts, for every image (official)
            indices = batchwise_top_k(indices, self.config.pool_size)
        self._pull = self.config.pull_weight * pull_loss(similarity, indices)
        image_features = self._encode_prompted(images, indices)
        with torch.no_grad():  # the text tower is frozen and unprompted: no gradient to compute
            text_features = self.backbone.encode_text(tokens)
        return image_features, text_features

    def effective_lr(self) -> float:
        """The learning rate the optimiser runs at: ``lr`` scaled to the training batch by ``lr_scaling``."""
        return scaled_lr(self.config.lr, self.config.lr_scaling, self.train_batch_size)

    def configure_optimizer(self, params, epochs, steps_per_epoch):
        optimizer = torch.optim.AdamW(params, lr=self.effective_lr(), weight_decay=self.config.weight_decay)
        return clip_grad_norm_before_step(optimizer, self.config.clip_grad_norm), None

    def extra_loss(self):
        return self._pull

    # ---- evaluation ---------------------------------------------------------------------------
    def encode_images(self, images, task_ids=None):
        # Task-agnostic: a given task label is ignored. Always per image at test time (never
        # batch-wise: an image's features must not depend on the other images of its batch).
        indices, _ = self.select(frozen_cls_query(self.backbone, images))
        return self._encode_prompted(images, indices)

    def frozen_image_features(self, images):
        """The query: the frozen tower's pre-projection [CLS] feature (:func:`frozen_cls_query`)."""
        return frozen_cls_query(self.backbone, images)

    def evaluate_images(self, images, task_ids=None, frozen=None):
        indices, _ = self.select(use_frozen(frozen, lambda: self.frozen_image_features(images)))
        return self._encode_prompted(images, indices), None  # L2P does not route to tasks

    # ---- accounting ---------------------------------------------------------------------------
    def parameter_counts(self):
        counts = super().parameter_counts()
        counts["shared"] = self.prompts.numel() + self.keys.numel()  # one pool for all tasks
        counts["per_task"] = 0
        return counts
