"""LPI (ACM MM 2024) as two registered presets sharing one implementation.

* ``lpi_released`` — the reference retrieval code as it behaves (§8): input-level prompts
  only (``depth = 1``), no interaction module, the unnormalised layer alignment, the
  double-sigmoid task loss, SGD (momentum 0.9, lr 0.05, weight decay 2e-4) with a per-epoch
  cosine schedule, rebuilt for every task. Batch 64 and 10 epochs per task are run settings
  (``training.batch_size`` / ``training.epochs``), set in ``configs/lpi_coco_supercat.yaml``.
* ``lpi`` — the harness's recommendation, not the paper's text (which was not available): the
  pieces the retrieval code lacks taken from the authors' grounding code (deep prompts in blocks
  1..8, ``depth = 9``; the interaction module, adapted to a dual encoder; the normalised layer
  alignment), the task loss corrected (no double sigmoid) at the retrieval temperature 0.001,
  the retrieval optimiser, and the harness's CLIP image preprocessing. ``lpi_released`` also
  preprocesses images as the reference does (``reference`` at every stage, see
  :mod:`benchmark.data.preprocessing`). docs/methods/lpi.md tabulates the source of each choice.

Per task (§3, §4): a :class:`~methods.lpi.prompts.DecomposedPrompt` (and, with
``interaction``, an :class:`~methods.lpi.interaction.InteractionModule`); only the current
task's modules train, earlier ones stay bit-for-bit unchanged. The loss is the strategy's
InfoNCE plus :meth:`LPI.extra_loss` = ``hlc_weight * L_layer + task_loss_weight * L_task``.
After each task, K-means keys on frozen features route images and captions independently at test
time (§3.4); the evaluator records the routing accuracy.

Sizes come from the backbone: widths (768 / 512 on ViT-B/16, 96 / 64 on ``clvl-tiny``), block
counts (``depth`` is clipped to the encoders' blocks) and the context length (``prompt_length``
is clipped to what the adapter accepts in front of a caption: 16 fits CLIP's 77 positions,
``clvl-tiny``'s 32 take 15, and the synthetic captions need at most 10 of the 17 left). Both
clips are logged as warnings; ``self.depth`` and ``self.prompt_length`` hold the values used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts
from benchmark.data.preprocessing import PREPROCESSING, KeyFittingTransform, image_transform
from benchmark.method import Method, MethodConfig, TrainData

from ..common.routing import DISTANCES, KMeansRouter, frozen_features, route_features, use_frozen
from ..common.training import assert_one_task
from . import similarity
from .interaction import InteractionModule, mix_states, prompt_state_hooks
from .losses import HLC_VARIANTS, TASK_LOSS_FORMS, layer_alignment_loss, task_contrastive_loss
from .prompts import DecomposedPrompt, encoder_prompts

log = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adamw")
INTERACTION_NEEDS_DEPTH = ("interaction acts in the deep-prompt blocks 1..depth-1, so it needs depth >= 2; "
                           "set interaction=false for depth=1")


@dataclass
class LPIConfig(MethodConfig):
    """Hyperparameters of the [harness] preset ``lpi`` (``lpi_released`` changes seven defaults)."""

    method: ClassVar[str] = "lpi"  # the registry name, in messages

    # Optimiser [released] (coco_lpi.json): SGD, rebuilt per task, cosine to 0 per epoch.
    lr: float = field(default=0.05, metadata={"help": "SGD learning rate"})
    weight_decay: float = field(default=2e-4, metadata={"help": (
        "weight decay, applied to the prompt factors too, as in the reference")})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adamw"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    cosine_schedule: bool = field(default=True, metadata={"help": (
        "CosineAnnealingLR(T_max=epochs), stepped once per epoch")})
    # Decomposed prompts (§3.1).
    rank: int = field(default=4, metadata={"help": "r, CP rank of every task's prompt tensor"})
    num_layers: int = field(default=9, metadata={"help": (
        "L, prompt slices (all enter the losses; `depth` of them the encoders)")})
    prompt_length: int = field(default=16, metadata={"help": "P, prompt tokens per slice"})
    init_std: float = field(default=0.5, metadata={"help": "every CP factor starts from N(0, init_std^2)"})
    depth: int = field(default=9, metadata={"help": (
        "slices reaching the encoders: 1 = input only [released]; 9 deep [grounding]")})
    # Interaction module (§3.2 [REC]); acts in blocks 1..depth-1, so it needs depth > 1.
    interaction: bool = field(default=True, metadata={"help": (
        "per-task cross-modal CP maps + LayerNorms at the prompt positions")})
    interaction_rank: int = field(default=4, metadata={"help": "CP rank of the cross-modal maps"})
    interaction_mix: float = field(default=0.1, metadata={"help": (
        "cross-term weight (own state keeps 1 - mix); 0 = LayerNorm-only control")})
    # Hierarchical low-rank contrastive learning = layer-level prompt alignment (§4.2).
    hlc_weight: float = field(default=0.1, metadata={"help": "weight of L_layer (0 switches it off)"})
    hlc_variant: str = field(default="normalized", metadata={"help": (
        "released (unnormalised, /0.01 each side) | normalized (cos x100)")})
    # Task contrastive constraint from task semantic distances (§4.3).
    task_loss_weight: float = field(default=0.1, metadata={"help": (
        "weight of L_task (0 switches it off); used from the 2nd task on")})
    task_loss_form: str = field(default="corrected", metadata={"help": (
        "released (double sigmoid, diagonal as positive) | corrected")})
    task_temperature: float = field(default=0.001, metadata={"help": (
        "tau of the task loss (retrieval code; grounding uses 0.01)")})
    sim_threshold: float = field(default=0.4, metadata={"help": "task pairs with similarity > threshold are positives"})
    task_similarity: str = field(default="auto", metadata={"help": (
        "auto (CSV if it names every task, else text) | csv | text")})
    task_similarity_file: str = field(default="", metadata={"help": (
        'CSV with a `task` header; "" = the shipped coco_supercat matrix')})
    # Routing (§3.4).
    k: int = field(default=5, metadata={"help": "K-means keys per task and modality"})
    routing_distance: str = field(default="l1", metadata={"help": "l1 (the reference code) | l2 | cosine"})
    routing_fit_limit: int = field(default=0, metadata={"help": (
        "fit image keys on at most this many training images, text keys on as many captions (0 = all)")})
    # Image preprocessing per stage: clip (open_clip's eval transform) | clip_train (open_clip's
    # train transform) | reference (RandomResizedCrop(scale 0.08-1) + flip + ImageNet mean/std).
    train_preprocess: str = field(default="clip_train", metadata={"help": (
        "training pairs: what every harness method trains on")})
    key_preprocess: str = field(default="clip_train", metadata={"help": (
        "routing-key fitting on the training images (each once; default: as they train)")})
    eval_preprocess: str = field(default="clip", metadata={"help": "test galleries: deterministic CLIP preprocessing"})

    def __post_init__(self):
        name = self.method
        for key in ("rank", "num_layers", "prompt_length", "depth", "interaction_rank", "k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}")
        if self.depth > self.num_layers:
            raise ValueError(f"{name}.depth ({self.depth}) exceeds num_layers ({self.num_layers}): "
                             "each block past the input needs its own prompt slice")
        choices = {"hlc_variant": HLC_VARIANTS, "task_loss_form": TASK_LOSS_FORMS, "optimizer": OPTIMIZERS,
                   "task_similarity": similarity.SOURCES, "routing_distance": DISTANCES,
                   "train_preprocess": PREPROCESSING, "key_preprocess": PREPROCESSING,
                   "eval_preprocess": PREPROCESSING}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{name}.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not 0.0 <= self.interaction_mix <= 1.0:
            raise ValueError(f"{name}.interaction_mix must lie in [0, 1], got {self.interaction_mix}")
        if self.hlc_weight < 0 or self.task_loss_weight < 0:
            raise ValueError(f"{name}: loss weights must be >= 0")
        if self.task_temperature <= 0:
            raise ValueError(f"{name}.task_temperature must be > 0")
        if self.routing_fit_limit < 0:
            raise ValueError(f"{name}.routing_fit_limit must be >= 0 (0 = all)")
        if self.interaction and self.depth < 2:
            raise ValueError(INTERACTION_NEEDS_DEPTH)


@dataclass
class LPIReleasedConfig(LPIConfig):
    """The reference code's behaviour (§8): only what differs from :class:`LPIConfig`."""

    method: ClassVar[str] = "lpi_released"
    depth: int = field(default=1, metadata={"help": (
        "slices reaching the encoders; 1 = input only: the reference code's deep-prompt branch is guarded by "
        "`layer_id < 0` and never runs")})
    interaction: bool = field(default=False, metadata={"help": (
        "per-task cross-modal CP maps + LayerNorms; off: the retrieval code has no interaction module")})
    hlc_variant: str = field(default="released", metadata={"help": (
        "released (unnormalised, /0.01 each side: the reference code) | normalized (cos x100)")})
    task_loss_form: str = field(default="released", metadata={"help": (
        "released (double sigmoid, diagonal as positive: the reference code) | corrected")})
    # retrieval/utils/data.py: Coco and CocoEval default to the training augmentation with
    # ImageNet statistics, and the keys are fitted on the training loader.
    train_preprocess: str = field(default="reference", metadata={"help": (
        "training pairs: reference = RandomResizedCrop(scale 0.08-1) + flip + ImageNet mean/std, as the "
        "reference code's Coco loader")})
    key_preprocess: str = field(default="reference", metadata={"help": (
        "routing-key fitting: reference, as the reference code fits its keys on the training loader")})
    eval_preprocess: str = field(default="reference", metadata={"help": (
        "test galleries: reference, as the reference code's CocoEval uses the training augmentation")})


def max_text_prompt_length(context_length: int) -> int:
    """The most prompt tokens the backbone adapter accepts in front of a caption.

    The caption keeps ``context_length - P`` positions (at least SOT, one word, EOT), and the
    adapter's ``_insert_tokens`` also requires ``P`` to be smaller than that kept length, so
    ``P <= (context_length - 1) // 2``: 38 for CLIP's 77 (LPI's 16 fits), 15 for ``clvl-tiny``'s 32.
    """
    return min(context_length - 3, (context_length - 1) // 2)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class LPI(Method):
    """Low-rank Prompt Interaction, the harness's recommended preset; see the module docstring."""

    name = "lpi"
    Config = LPIConfig
    summary = "LPI: per-task low-rank CP multi-modal prompts, interaction, layer/task contrast, K-means routing"
    # A routed query is encoded twice: once frozen (routing), once with its task's prompts.
    forward_passes = 2

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)  # freezes the backbone
        cfg = self.config
        vision_width, text_width = backbone.vision_width, backbone.text_width
        blocks = min(len(backbone.vision_blocks), len(backbone.text_blocks))
        self.prompt_length = self.adjust(
            "prompt_length", min(cfg.prompt_length, max_text_prompt_length(backbone.context_length)),
            f"the most the backbone's {backbone.context_length} text positions take")
        self.depth = self.adjust("depth", min(cfg.depth, blocks),  # the depth actually used
                                 f"the encoders' block count (backbone {backbone.spec})")
        if cfg.interaction and self.depth < 2:  # the depth clipped to a shallow backbone
            raise ValueError(INTERACTION_NEEDS_DEPTH)

        self.prompts = nn.ModuleList(
            DecomposedPrompt(cfg.num_layers, self.prompt_length, vision_width, text_width, cfg.rank, cfg.init_std)
            for _ in range(num_tasks))
        self.interactions = nn.ModuleList(
            InteractionModule(blocks, vision_width, text_width, cfg.interaction_rank, cfg.interaction_mix)
            for _ in range(num_tasks)) if cfg.interaction else None
        self.prompts.requires_grad_(False)  # each task's modules are unfrozen when the task starts
        if self.interactions is not None:
            self.interactions.requires_grad_(False)

        self.image_router = KMeansRouter(num_tasks, backbone.embed_dim, cfg.k, cfg.routing_distance)
        self.text_router = KMeansRouter(num_tasks, backbone.embed_dim, cfg.k, cfg.routing_distance)
        # Task similarity, filled as tasks arrive (only tasks 0..t are ever needed).
        self.register_buffer("task_similarity", torch.zeros(num_tasks, num_tasks))
        self.register_buffer("task_name_features", torch.zeros(num_tasks, backbone.embed_dim))
        self.task_names: list[str | None] = [None] * num_tasks
        self.similarity_source: str | None = None
        self._similarity_table = self._load_similarity_table(cfg)
        # Which tasks have started (persistent, so a resumed run and a loaded state agree): a task
        # not started yet has only its random initial prompt, and is encoded by the plain backbone.
        self.register_buffer("task_started", torch.zeros(num_tasks, dtype=torch.bool))
        self.current_task = -1
        self.loss_terms: dict[str, Tensor] = {}  # the last extra_loss() terms (detached), for logging
        self._train_transform = image_transform(cfg.train_preprocess, backbone)
        if cfg.key_preprocess != cfg.train_preprocess:  # keys are fitted on the training set: switch it
            self._train_transform = KeyFittingTransform(self._train_transform,
                                                        image_transform(cfg.key_preprocess, backbone))
        self._eval_transform = image_transform(cfg.eval_preprocess, backbone)

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _load_similarity_table(cfg: LPIConfig):
        if cfg.task_similarity == "text":
            return None
        path = cfg.task_similarity_file or similarity.SHIPPED_CSV
        try:
            return similarity.read_similarity_csv(path)
        except FileNotFoundError:
            if cfg.task_similarity == "csv":
                raise ValueError(f"task_similarity=csv but {path} does not exist") from None
            log.warning("task-similarity file %s not found: task similarities come from the text encoder", path)
            return None

    def configure_optimizer(self, params, epochs, steps_per_epoch):
        cfg = self.config
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)) \
            if cfg.cosine_schedule else None
        return optimizer, scheduler

    # ------------------------------------------------------------------ lifecycle
    def _task_modules(self, task: int) -> list[nn.Module]:
        modules = [self.prompts[task]]
        if self.interactions is not None:
            modules.append(self.interactions[task])
        return modules

    def before_training_exp(self, data: TrainData) -> None:
        task = data.task_id
        self.current_task = task
        self.task_started[task] = True
        for other in range(self.num_tasks):  # only the current task trains; earlier ones stay as they are
            for module in self._task_modules(other):
                module.requires_grad_(other == task)
        self._add_task_name(task, data.task_name)

    def image_transforms(self) -> dict:
        """``train_preprocess`` / ``eval_preprocess`` (and ``key_preprocess`` through the training
        transform, see :class:`~benchmark.data.preprocessing.KeyFittingTransform`)."""
        return {"train": self._train_transform, "eval": self._eval_transform}

    def after_training_exp(self, data: TrainData) -> None:
        limit = self.config.routing_fit_limit or None
        switch = self._train_transform.fitting_keys() if isinstance(self._train_transform, KeyFittingTransform) \
            else contextlib.nullcontext()
        with switch:
            for modality, router in (("image", self.image_router), ("text", self.text_router)):
                features = frozen_features(self.backbone, data.dataset, modality=modality,
                                           batch_size=data.encode_batch_size, device=data.device, limit=limit,
                                           num_workers=data.num_workers, precision=data.precision)
                router.fit_task(data.task_id, features, seed=0)  # KMeans(random_state=0) in the reference

    # ------------------------------------------------------------------ task similarity
    def _add_task_name(self, task: int, name: str) -> None:
        """Record task ``task``'s name and refresh the similarity block of tasks 0..task."""
        self.task_names[task] = name
        self.task_name_features[task] = similarity.name_features(self.backbone, name).to(self.task_name_features)
        names = [n if n is not None else "" for n in self.task_names[:task + 1]]
        table = self._similarity_table
        use_csv = table is not None and similarity.covers(table, names)
        if self.config.task_similarity == "csv" and not use_csv:
            missing = [n for n in names if table is None or n.strip().lower() not in table]
            raise ValueError(f"task_similarity=csv, but the similarity file does not name task(s) {missing}")
        block = (similarity.csv_block(table, names) if use_csv
                 else similarity.cosine_block(self.task_name_features[:task + 1]))
        self.task_similarity[:task + 1, :task + 1] = block.to(self.task_similarity)
        source = "csv" if use_csv else "text"
        if source != self.similarity_source:
            log.info("%s: task similarities from %s", self.name,
                     f"the CSV {self.config.task_similarity_file or similarity.SHIPPED_CSV}" if use_csv
                     else "the backbone's text encoder on the task names")
        self.similarity_source = source
        if task > 0:
            off = block[task, :task]
            log.info("%s: task %r similarity to earlier tasks %s; positives (> %.2f): %d of %d", self.name, name,
                     [round(float(v), 3) for v in off], self.config.sim_threshold,
                     int((off > self.config.sim_threshold).sum()), task)

    # ------------------------------------------------------------------ prompts into the encoders
    def _prompt_slices(self, tasks: Tensor) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
        """Prompts of the distinct tasks in ``tasks``: ``(Pv [G, L, P, Dv], Pt [G, L, P, Dt],
        inverse [B] or None when G == 1, task list)``."""
        unique, inverse = torch.unique(tasks, return_inverse=True)
        task_list = [int(t) for t in unique.tolist()]
        return self._task_slices(task_list, inverse)

    def _task_slices(self, task_list: list[int], inverse: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None,
                                                                                 list[int]]:
        """:meth:`_prompt_slices` for a task list known on the host (``inverse`` maps samples to it)."""
        pairs = [self.prompts[t]() for t in task_list]
        vision = torch.stack([v for v, _ in pairs])
        text = torch.stack([t for _, t in pairs])
        return vision, text, (inverse if len(task_list) > 1 else None), task_list

    @staticmethod
    def _per_sample(values: Tensor, inverse: Tensor | None) -> Tensor:
        return values if inverse is None else values[inverse]  # [1, ...] broadcasts over the batch

    def _interaction_transforms(self, modality: str, vision: Tensor, text: Tensor, inverse: Tensor | None,
                                task_list: list[int]) -> dict:
        """Per deep block ``l``, the map of the prompt-position states of ``modality`` (§3.2)."""
        if self.interactions is None:
            return {}
        modules = [self.interactions[t] for t in task_list]
        norms = [m.vision_norm if modality == "vision" else m.text_norm for m in modules]
        # The LayerNorm affine is the same in every block: stacked (and spread over the batch) once.
        weight = self._per_sample(torch.stack([n.weight for n in norms])[:, None, :], inverse)  # [G|B, 1, D]
        bias = self._per_sample(torch.stack([n.bias for n in norms])[:, None, :], inverse)
        transforms = {}
        for layer in range(1, self.depth):
            # Cross-modal input: the other modality's slice `layer` of the same task. It depends on
            # the task's parameters only (a constant per task and block; see interaction.py).
            if modality == "vision":
                cross = torch.stack([m.cross_to_vision(text[g, layer], layer) for g, m in enumerate(modules)])
            else:
                cross = torch.stack([m.cross_to_text(vision[g, layer], layer) for g, m in enumerate(modules)])
            if cross.dim() > 1:  # [G, P, D]; the LayerNorm-only control (mix 0) gives zeros [G]
                cross = self._per_sample(cross, inverse)
            else:
                cross = cross.new_zeros(())
            transforms[layer] = functools.partial(
                mix_states, cross=cross, norm_weight=weight, norm_bias=bias, mix=self.config.interaction_mix,
                eps=norms[0].eps)
        return transforms

    def _encode(self, modality: str, x: Tensor, tasks: Tensor | int) -> Tensor:
        """``x`` encoded with the prompts of ``tasks`` (``[B]``, one per sample, or one task for all)."""
        if isinstance(tasks, int):
            vision, text, inverse, task_list = self._task_slices([tasks], None)
        else:
            vision, text, inverse, task_list = self._prompt_slices(tasks)
        own = vision if modality == "vision" else text
        prompts: Prompts = encoder_prompts(self._per_sample(own, inverse), self.depth)
        transforms = self._interaction_transforms(modality, vision, text, inverse, task_list)
        if modality == "vision":
            blocks, transformer, encode = self.backbone.vision_blocks, self.backbone.visual.transformer, \
                self.backbone.encode_image
        else:
            blocks, transformer, encode = self.backbone.text_blocks, self.backbone.model.transformer, \
                self.backbone.encode_text
        with prompt_state_hooks(blocks, transforms, self.prompt_length,
                                batch_first=getattr(transformer, "batch_first", True)):
            return encode(x, prompts)

    def _tasks_for(self, x: Tensor, task_ids: Tensor | None, modality: str) -> Tensor | None:
        if task_ids is not None:
            return task_ids.to(x.device).long()
        return self.route_images(x) if modality == "vision" else self.route_texts(x)

    def _features(self, modality: str, x: Tensor, task_ids: Tensor | None) -> Tensor:
        return self._features_of_tasks(modality, x, self._tasks_for(x, task_ids, modality))

    def _features_of_tasks(self, modality: str, x: Tensor, tasks: Tensor | None) -> Tensor:
        plain = self.backbone.encode_image if modality == "vision" else self.backbone.encode_text
        if tasks is None:  # nothing trained and routed yet: the frozen backbone
            return plain(x)
        started = self.task_started.to(tasks.device)[tasks]
        if bool(started.all()):
            return self._encode(modality, x, tasks)
        if not bool(started.any()):  # only given task ids can name a task not started yet
            return plain(x)
        features = plain(x)
        features[started] = self._encode(modality, x[started], tasks[started]).to(features.dtype)
        return features

    def training_features(self, images: Tensor, tokens: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The batch encoded with the prompts of the task being trained.

        Every pair of a training batch belongs to that task (the strategy trains one experience
        at a time and LPI keeps no replay memory), so the features are those of
        :meth:`encode_images` / :meth:`encode_texts` with ``task_ids``, computed without reading
        the task labels back to the host (which would make it wait for the device every step);
        the assumption is checked on the device (:func:`~methods.common.training.assert_one_task`)."""
        task = self.current_task
        assert_one_task(task_ids.to(images.device), task, self.name)
        return self._encode("vision", images, task), self._encode("text", tokens, task)

    def encode_images(self, images: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return self._features("vision", images, task_ids)

    def encode_texts(self, tokens: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return self._features("text", tokens, task_ids)

    # ------------------------------------------------------------------ evaluation in one pass
    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """The routing query: prompt-free image features in float32 (what the keys were fitted on)."""
        return route_features(self.backbone.encode_image, images)

    @torch.no_grad()
    def frozen_text_features(self, tokens: Tensor) -> Tensor:
        return route_features(self.backbone.encode_text, tokens)

    def evaluate_images(self, images: Tensor, task_ids: Tensor | None = None, frozen=None):
        """Routes from ``frozen()`` (one frozen pass, or none when cached), then the prompted pass."""
        return self._evaluate("vision", images, task_ids, frozen)

    def evaluate_texts(self, tokens: Tensor, task_ids: Tensor | None = None, frozen=None):
        return self._evaluate("text", tokens, task_ids, frozen)

    def _evaluate(self, modality: str, x: Tensor, task_ids: Tensor | None, frozen):
        router, compute = ((self.image_router, self.frozen_image_features) if modality == "vision"
                           else (self.text_router, self.frozen_text_features))
        routes = None
        if task_ids is None and bool(router.fitted.any()):
            routes = router.route(use_frozen(frozen, lambda: compute(x)))
        tasks = task_ids.to(x.device).long() if task_ids is not None else routes
        return self._features_of_tasks(modality, x, tasks), routes

    # ------------------------------------------------------------------ routing (§3.4)
    @torch.no_grad()
    def route_images(self, images: Tensor) -> Tensor | None:
        if not bool(self.image_router.fitted.any()):
            return None
        # The frozen query is computed in float32 even under bf16 autocast: the keys were fitted in it.
        return self.image_router.route_inputs(self.backbone.encode_image, images)

    @torch.no_grad()
    def route_texts(self, tokens: Tensor) -> Tensor | None:
        if not bool(self.text_router.fitted.any()):
            return None
        return self.text_router.route_inputs(self.backbone.encode_text, tokens)

    # ------------------------------------------------------------------ losses (§4)
    def extra_loss(self) -> Tensor | None:
        """``hlc_weight * L_layer + task_loss_weight * L_task`` for the current task's prompts."""
        cfg, task = self.config, self.current_task
        if task < 0:
            return None
        terms: dict[str, Tensor] = {}
        vision, text = self.prompts[task]()
        if cfg.hlc_weight > 0:
            terms["layer"] = cfg.hlc_weight * layer_alignment_loss(vision, text, cfg.hlc_variant)
        if cfg.task_loss_weight > 0 and task > 0:
            earlier = [self.prompts[j]() for j in range(task)]  # frozen: constants in the loss
            all_vision = torch.stack([v.flatten() for v, _ in earlier] + [vision.flatten()])
            all_text = torch.stack([t.flatten() for _, t in earlier] + [text.flatten()])
            positives = self.task_similarity[:task + 1, :task + 1] > cfg.sim_threshold
            terms["task"] = cfg.task_loss_weight * 0.5 * (
                task_contrastive_loss(all_vision, positives, cfg.task_temperature, cfg.task_loss_form)
                + task_contrastive_loss(all_text, positives, cfg.task_temperature, cfg.task_loss_form))
        self.loss_terms = {name: value.detach() for name, value in terms.items()}
        return sum(terms.values()) if terms else None

    # ------------------------------------------------------------------ accounting
    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["per_task"] = _count(self.prompts[0]) + (_count(self.interactions[0]) if self.interactions else 0)
        counts["shared"] = 0  # nothing is shared across tasks (§3.1)
        return counts


class LPIReleased(LPI):
    """LPI as the reference retrieval code behaves (§8); see the module docstring."""

    name = "lpi_released"
    Config = LPIReleasedConfig
    summary = "LPI as released: input-level CP prompts, no interaction, released losses, SGD recipe"
