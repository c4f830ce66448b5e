"""S-Prompts (S-liPrompts): independent prompts per task, chosen at test time by K-means keys.

Wang, Huang & Hong, "S-Prompts Learning with Pre-trained Transformers: An Occam's Razor for
Domain Incremental Learning", NeurIPS 2022 (arXiv:2207.12819; code: iamwangyabin/S-Prompts).
This is the paper's language-image variant, S-liPrompts, for a frozen CLIP:

* **Per task, independently trained prompts.** Task ``t`` owns an image prompt of
  ``image_prompt_length`` tokens (10 in the paper's configs, ``prompt_length: 10``) inserted in
  the ViT input right after the class token, after the positional embedding and before
  ``ln_pre`` (the reference ``VisionTransformer.forward``), and a learnable CoOp text context of
  ``text_context_length`` tokens (``NCTX = 16`` in the reference ``cfgc``) placed right after the
  start-of-text token. Both are trained on task ``t`` only; the backbone and every other task's
  prompts stay frozen (the reference code re-freezes everything but ``prompt_pool.{t}`` and
  ``classifier_pool.{t}`` at the start of each task), so earlier prompts never change. A
  backbone with a short text context takes at most ``(context_length - 1) // 2`` context tokens
  (15 for ``clvl-tiny``); a longer setting is clipped with a warning (``self.text_context_length``).
  Initialisation as in the reference: image tokens ``U(-1/sqrt(D), 1/sqrt(D))`` (they are the
  weight of an ``nn.Linear(D, P)``), text context ``N(0, 0.02^2)`` (CoOp).
* **Task keys.** After training on task ``t``, the *frozen, prompt-free* model encodes the
  task's training images and K-means (``k = 5``) turns them into task ``t``'s keys. At test
  time an image goes to the task owning its nearest key. ``distance="l2"`` is the Euclidean
  nearest-centroid search the paper describes; ``distance="l1"`` is what the released S-Prompts
  and LPI code actually compute (``(((f - c) ** 2) ** 0.5).sum()`` is a Manhattan distance).
* **Optimisation** as in the reference (``methods/sprompt.py``, ``configs/domainnet_slip.json``,
  ``configs/core50_slip.json``): SGD with momentum 0.9, lr 0.01, cosine annealing over the task's
  epochs, rebuilt per task. Weight decay is ``first_task_weight_decay`` 5e-4 on the first task
  (their ``init_weight_decay``) and ``weight_decay`` 2e-4 on every later one (their
  ``weight_decay``); ``first_task_weight_decay=None`` uses ``weight_decay`` throughout. (Their
  first-task ``init_lr`` and ``init_epoch`` equal ``lrate`` and ``epochs`` in both configs, so
  the harness's one ``lr`` and epoch count cover them.)
* **Precision**: routing queries are encoded, and distances computed, in float32 with
  autocast off (:mod:`methods.common.routing`), as the keys were fitted.

**Adaptation to image-text retrieval** (the paper classifies: its text side is a per-domain
CoOp classifier over class names, selected by the image's routed domain):

* The loss is the harness's symmetric InfoNCE between a task's images (with its image prompt)
  and its captions (with its text context), instead of cross-entropy over class-name prompts.
* A caption has no image to borrow a route from, so captions get their own keys: K-means
  (``k``) on the frozen, prompt-free features of the task's training captions, and each test
  caption is routed independently to the task of its nearest caption key; its features use that
  task's text context. This is what LPI's retrieval fork of S-Prompts does (docs/methods/lpi.md, §3.4). An
  image and its caption can therefore be routed to different tasks; ``route_images`` /
  ``route_texts`` report both so the harness records routing accuracy per modality.
* Image keys are fitted on each training image once (with the training transform), as the
  reference's training loader holds each image once; caption keys on the training captions'
  token ids (:func:`methods.common.routing.frozen_features`). Captions are encoded as they are, without the
  literal ``"X X ... X"`` placeholder prefix LPI's code embeds.
* With the task identity given, item ``i`` uses task ``task_ids[i]``'s prompts. A task with no
  prompts yet (``tasks: all`` evaluates tasks before training them) is encoded by the plain
  backbone, and so is everything before the first keys exist.

Parameters: ``P_img * D_vision + P_txt * D_text`` per task (15,872 for ViT-B/16 with 10 and 16
tokens), nothing shared. Inference costs two encoder passes per query (a prompt-free pass for
the key search, then the prompted pass).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts
from benchmark.method import Method, MethodConfig, TrainData

from .common.routing import DISTANCES, KMeansRouter, frozen_features, route_features, use_frozen
from .common.training import assert_one_task

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
OPTIMIZERS = ("sgd", "adamw")


class TaskKeys(nn.Module):
    """K-means task keys for images and for captions, and the routing of test items by them.

    Used by S-Prompts and by LoRA's ``per_task`` mode. The keys are buffers (saved with the
    method). ``frozen`` is a context manager factory under which the backbone is the plain
    pretrained model (LoRA disables its adapters there; S-Prompts needs nothing, since it
    simply passes no prompts).

    Routing a batch costs a full prompt-free encoder pass, and the harness asks for it twice per
    test batch (``encode_*(x, None)`` routes, then ``route_*(x)`` reports the routes), so the
    result for the last batch of each modality is kept and reused while it is the very same,
    unmodified tensor and the keys have not changed since.
    """

    def __init__(self, num_tasks: int, dim: int, k: int, distance: str,
                 frozen: Callable[[], ContextManager] = contextlib.nullcontext):
        super().__init__()
        self.image = KMeansRouter(num_tasks, dim, k, distance)
        self.text = KMeansRouter(num_tasks, dim, k, distance)
        self._frozen = frozen
        self._last: dict[str, tuple[Tensor, int, int, Tensor]] = {}  # modality -> (batch, version, generation, routes)
        self._generation = 0  # bumped whenever the keys change

    def router(self, modality: str) -> KMeansRouter:
        return self.image if modality == "image" else self.text

    def any_fitted(self) -> bool:
        return bool(self.image.fitted.any())

    @torch.no_grad()
    def fit(self, backbone, data: TrainData) -> None:
        """Fit task ``data.task_id``'s image and caption keys on frozen features of its training set."""
        with self._frozen():
            for modality in MODALITIES:
                features = frozen_features(backbone, data.dataset, modality=modality,
                                           batch_size=data.encode_batch_size, device=data.device,
                                           num_workers=data.num_workers, precision=data.precision)
                self.router(modality).fit_task(data.task_id, features)
        self._changed()

    @torch.no_grad()
    def route(self, backbone, modality: str, batch: Tensor) -> Tensor | None:
        """``[B]`` routed task per item, or None while no task has keys."""
        if not self.router(modality).fitted.any():
            return None
        last = self._last.get(modality)
        if last is not None and last[0] is batch and last[1] == batch._version and last[2] == self._generation:
            return last[3]
        with self._frozen():  # the query in float32 even under autocast, as the keys were fitted
            encode = backbone.encode_image if modality == "image" else backbone.encode_text
            routes = self.router(modality).route_inputs(encode, batch)
        # Holding `batch` keeps its id from being reused by another tensor while it is cached.
        self._last[modality] = (batch, batch._version, self._generation, routes)
        return routes

    @torch.no_grad()
    def frozen_features(self, backbone, modality: str, batch: Tensor) -> Tensor:
        """The routing query of ``batch``: float32 features of the plain pretrained model."""
        with self._frozen():
            return route_features(backbone.encode_image if modality == "image" else backbone.encode_text, batch)

    def evaluate(self, backbone, modality: str, batch: Tensor, task_ids: Tensor | None, frozen,
                 encode: Callable[[Tensor, Tensor | None], Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(encode(batch, tasks), routes)``: with ``task_ids`` None the tasks are the routes,
        found from ``frozen()`` (the evaluator's, possibly cached) or one frozen pass now."""
        routes = None
        if task_ids is None and bool(self.router(modality).fitted.any()):
            routes = self.router(modality).route(use_frozen(frozen, lambda: self.frozen_features(backbone, modality,
                                                                                                 batch)))
        return encode(batch, task_ids if task_ids is not None else routes), routes

    def _changed(self) -> None:
        self._generation += 1
        self._last.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._changed()  # loaded keys invalidate cached routes
        super()._load_from_state_dict(*args, **kwargs)


@dataclass
class SPromptsConfig(MethodConfig):
    lr: float = field(default=0.01, metadata={"help": "learning rate (reference configs: SGD, 0.01)"})
    weight_decay: float = field(default=2e-4, metadata={"help": (
        "weight decay of the tasks after the first (reference configs' weight_decay: 2e-4)")})
    first_task_weight_decay: float | None = field(default=5e-4, metadata={"help": (
        "the first task (reference init_weight_decay); None: weight_decay")})
    optimizer: str = field(default="sgd", metadata={"help": (
        '"sgd" (reference: momentum, cosine annealing per epoch) or "adamw" (constant lr)')})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (reference: 0.9)"})
    image_prompt_length: int = field(default=10, metadata={"help": (
        "image prompt tokens per task (reference prompt_length: 10)")})
    text_context_length: int = field(default=16, metadata={"help": (
        "learnable CoOp text context tokens per task (reference NCTX: 16)")})
    keys_per_task: int = field(default=5, metadata={"help": (
        "K-means keys per task and modality (reference: KMeans(n_clusters=5))")})
    distance: str = field(default="l2", metadata={"help": (
        'key distance: "l2" (paper), "l1" (released S-Prompts/LPI code) or "cosine"')})

    def __post_init__(self):
        if self.first_task_weight_decay is not None and self.first_task_weight_decay < 0:
            raise ValueError("sprompts.first_task_weight_decay must be >= 0, or null to use weight_decay")
        if self.image_prompt_length < 1 or self.text_context_length < 1:
            raise ValueError("sprompts: image_prompt_length and text_context_length must be >= 1")
        if self.distance not in DISTANCES:
            raise ValueError(f"sprompts.distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"sprompts.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.keys_per_task < 1:
            raise ValueError("sprompts.keys_per_task must be >= 1")


class SPrompts(Method):
    """S-liPrompts for CLIP retrieval; see the module docstring."""

    name = "sprompts"
    Config = SPromptsConfig
    summary = "S-Prompts (S-liPrompts): per-task image+text prompts, routed by K-means keys (NeurIPS 2022)"
    forward_passes = 2  # a prompt-free pass for the key search, then the prompted pass
    # --ddp: the loss is the harness's InfoNCE alone, and the keys are fitted on the whole task's
    # training set in every process (then copied from process 0), so nothing is per-process.
    supports_ddp = True

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        cfg = self.config
        # The backbone's text hook takes at most (context_length - 1) // 2 prompt tokens (the
        # caption keeps the rest): 38 for CLIP's 77 positions (16 fits), 15 for clvl-tiny's 32.
        self.text_context_length = self.adjust(
            "text_context_length", min(cfg.text_context_length, (backbone.context_length - 1) // 2),
            f"the most the backbone's {backbone.context_length} text positions take")
        self.current_task = 0  # the task being trained (set by before_training_exp)
        # Grown one entry per task in before_training_exp, so that the module holds (and counts)
        # exactly the prompts of the tasks met so far.
        self.image_prompts = nn.ParameterList()  # task t: [P_img, D_vision]
        self.text_prompts = nn.ParameterList()  # task t: [P_txt, D_text]
        self.keys = TaskKeys(num_tasks, backbone.embed_dim, cfg.keys_per_task, cfg.distance)

    # ---- lifecycle ----------------------------------------------------------------------------
    def before_training_exp(self, data: TrainData) -> None:
        task = data.task_id
        self.current_task = task  # for the first task's own weight decay in configure_optimizer
        device = next(self.backbone.parameters()).device
        while len(self.image_prompts) <= task:
            width_v, width_t = self.backbone.vision_width, self.backbone.text_width
            bound = 1 / math.sqrt(width_v)  # nn.Linear(D, P).weight's default init, as in the reference
            image = torch.empty(self.config.image_prompt_length, width_v, device=device).uniform_(-bound, bound)
            text = torch.empty(self.text_context_length, width_t, device=device).normal_(0, 0.02)
            self.image_prompts.append(nn.Parameter(image))
            self.text_prompts.append(nn.Parameter(text))
        # Only task t's prompts train; everything learned for earlier tasks is frozen for good.
        for index, (image, text) in enumerate(zip(self.image_prompts, self.text_prompts)):
            image.requires_grad_(index == task)
            text.requires_grad_(index == task)

    def after_training_exp(self, data: TrainData) -> None:
        self.keys.fit(self.backbone, data)

    def configure_optimizer(self, params, epochs: int, steps_per_epoch: int):
        cfg = self.config
        first = cfg.first_task_weight_decay is not None and self.current_task == 0
        weight_decay = cfg.first_task_weight_decay if first else cfg.weight_decay
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay), None
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))

    # ---- encoding -----------------------------------------------------------------------------
    def training_features(self, images: Tensor, tokens: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """What :meth:`encode_images` / :meth:`encode_texts` give with ``task_ids``, for a batch of
        the task being trained (every training pair belongs to it; no replay memory): its prompts,
        broadcast over the batch, without reading the labels back to the host (a wait for the
        device every step); the assumption is checked on the device."""
        task = self.current_task
        assert_one_task(task_ids.to(images.device).long(), task, self.name)
        return (self.backbone.encode_image(images, Prompts(tokens=self.image_prompts[task].unsqueeze(0))),
                self.backbone.encode_text(tokens, Prompts(tokens=self.text_prompts[task].unsqueeze(0))))

    def encode_images(self, images: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if task_ids is None:
            task_ids = self.route_images(images)
        return self._encode(images, task_ids, self.image_prompts, self.backbone.encode_image)

    def encode_texts(self, tokens: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if task_ids is None:
            task_ids = self.route_texts(tokens)
        return self._encode(tokens, task_ids, self.text_prompts, self.backbone.encode_text)

    def route_images(self, images: Tensor) -> Tensor | None:
        return self.keys.route(self.backbone, "image", images)

    def frozen_image_features(self, images: Tensor) -> Tensor:
        return self.keys.frozen_features(self.backbone, "image", images)

    def frozen_text_features(self, tokens: Tensor) -> Tensor:
        return self.keys.frozen_features(self.backbone, "text", tokens)

    def evaluate_images(self, images: Tensor, task_ids: Tensor | None = None, frozen=None):
        return self.keys.evaluate(self.backbone, "image", images, task_ids, frozen, lambda x, tasks: self._encode(
            x, tasks, self.image_prompts, self.backbone.encode_image))

    def evaluate_texts(self, tokens: Tensor, task_ids: Tensor | None = None, frozen=None):
        return self.keys.evaluate(self.backbone, "text", tokens, task_ids, frozen, lambda x, tasks: self._encode(
            x, tasks, self.text_prompts, self.backbone.encode_text))

    def route_texts(self, tokens: Tensor) -> Tensor | None:
        return self.keys.route(self.backbone, "text", tokens)

    def _encode(self, batch: Tensor, task_ids: Tensor | None, bank: nn.ParameterList, encode) -> Tensor:
        """Encode every item with the prompts of its task (plain backbone where a task has none)."""
        if task_ids is None or len(bank) == 0:
            return encode(batch)
        task_ids = task_ids.to(batch.device).long()
        has_prompt = task_ids < len(bank)
        if bool(has_prompt.all()):
            if bool((task_ids == task_ids[0]).all()):  # one task: broadcast its prompt over the batch
                return encode(batch, Prompts(tokens=bank[int(task_ids[0])].unsqueeze(0)))
            return encode(batch, Prompts(tokens=torch.stack(list(bank))[task_ids]))
        features = None
        for mask in (has_prompt, ~has_prompt):
            if not bool(mask.any()):
                continue
            part = self._encode(batch[mask], task_ids[mask], bank, encode) if mask is has_prompt else encode(batch[mask])
            if features is None:
                features = part.new_empty(len(batch), part.shape[-1])
            features[mask] = part
        return features

    # ---- accounting ---------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        per_task = [self.image_prompts[t].numel() + self.text_prompts[t].numel() for t in range(len(self.image_prompts))]
        counts["per_task"] = int(max(per_task, default=0))
        counts["shared"] = 0
        return counts
