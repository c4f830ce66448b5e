"""Evaluation after each training session, under a declared protocol.

After session ``t`` the method encodes the test sets of the evaluated tasks and every
evaluated task ``j`` gets one number per direction and K: ``R[t][j]``.

Protocol (recorded in every run record):

* ``gallery`` — ``union``: queries of task ``j`` are ranked against the images / captions of
  *all* evaluated tasks together (LPI's protocol: the gallery grows as tasks arrive);
  ``per_task``: against task ``j``'s own test set only.
* ``task_identity`` — ``inferred``: the method gets no task label and must route by itself
  (``task_ids=None``); ``given``: every test item is encoded with its true task label.
* ``tasks`` — ``seen``: tasks ``0..t``; ``all``: every task, including those not trained yet
  (gives forward transfer; the upper triangle of ``R`` is then filled and an extra evaluation
  before any training gives ``R_init``).

Recall follows :mod:`benchmark.retrieval`: image->text counts a hit when any caption of the
image is in the top K; text->image ranks the caption's single image; tied scores count as
the expected hit under a random order of the tied items (a collapsed model scores chance).
Test features that are NaN or infinite stop the run with
:class:`~benchmark.errors.BrokenFeatures` (exit status 3) instead of being ranked.

Speed (docs/performance.md): each batch is encoded by the method's one-pass
``evaluate_images`` / ``evaluate_texts`` (features and routes together); an
:class:`EvaluationCache` passed to every session of a run keeps the decoded test crops and the
methods' frozen features, which do not change from one session to the next; scores are ranked
on the evaluation device. None of this changes a result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed
from . import precision as amp
from .config import EVAL_TASKS, GALLERIES, TASK_IDENTITIES, Protocol
from .data.torch_datasets import GalleryImages, worker_errors_unwrapped
from .errors import BrokenFeatures
from .method import Method
from .retrieval import RetrievalRanks, non_finite_rows, retrieval_ranks

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
# Protocol (and GALLERIES, TASK_IDENTITIES, EVAL_TASKS) is declared once, with the run
# configuration in benchmark.config, and importable from here, where it is applied.


@dataclass
class TaskFeatures:
    images: torch.Tensor  # [N_img, D], L2-normalised, float32, on the evaluation device
    texts: torch.Tensor  # [N_txt, D]
    caption_image: torch.Tensor  # [N_txt] index into images
    image_routing: float | None = None  # % of images the method routed to this task (None: no routing)
    text_routing: float | None = None


@dataclass
class SessionResult:
    """One evaluation: a row of every recall matrix, and routing accuracy where the method routes."""

    recall: dict[str, dict[int, list[float | None]]]  # {direction: {K: [R[t][j] or None for j]}}
    routing: dict[str, list[float | None]] | None  # {"image"|"text": [% routed to the true task, per j]}
    # {direction: {j: [N_j, 3] long tensor}} (i2t: task j's images, t2i: its captions), per query
    # the columns (above, tied, tied_true) of benchmark.retrieval.RetrievalRanks, for
    # significance tests over queries (benchmark.stats).
    ranks: dict[str, dict[int, torch.Tensor]] | None = None


#: Host memory the cache may fill with decoded test crops by default (uint8): 4 GiB. COCO's
#: 5,000 test images at 224 x 224 take 3 x 224 x 224 bytes each, 750 MB in all.
DEFAULT_CROP_BYTES = 4 << 30


class EvaluationCache:
    """What stays the same from one evaluation session of a run to the next, kept once.

    The test sets are fixed for the whole run, and so is the pretrained backbone of the methods
    that keep it frozen. So the cache keeps:

    * **decoded test crops**: every test image decoded, resized and cropped, as ``[3, H, W]``
      uint8 on the host (:meth:`GalleryImages.crop`); each session only turns them into floats
      and normalises them, on the evaluation device. Only for a deterministic eval transform
      (:func:`benchmark.data.torch_datasets.split_eval_transform`): a random one (LPI's
      ``reference`` preprocessing) is drawn afresh every session, as without a cache. Memory
      rule: ``3 x H x W`` bytes per test image, up to ``max_crop_bytes`` in all (galleries that
      would pass the cap are decoded every session instead); 0 turns crop caching off.
    * **frozen features**: a method's :meth:`~benchmark.method.Method.frozen_image_features` /
      ``frozen_text_features`` per test item (the prompt-free routing or query features), on the
      evaluation device (``N x D'`` float32: 10 MB for 5,000 images at width 512). They belong to
      one method object: binding the cache to another method drops them. Frozen image features
      are kept only where the crops are deterministic.

    Results with a cache are identical to results without one (tests/test_eval_speed.py). The
    counters ``decoded`` (test images decoded) and ``frozen_computed`` (items whose frozen features
    were computed) let ``bench`` and tests see what was skipped.
    """

    def __init__(self, max_crop_bytes: int = DEFAULT_CROP_BYTES):
        if max_crop_bytes < 0:
            raise ValueError(f"max_crop_bytes must be >= 0, got {max_crop_bytes}")
        self.max_crop_bytes = max_crop_bytes
        self._crops: dict[int, tuple[GalleryImages, object, torch.Tensor]] = {}  # id -> (gallery, transform, crops)
        # (id, modality) -> (gallery, transform, features, filled rows)
        self._frozen: dict[tuple[int, str], tuple[GalleryImages, object, torch.Tensor, torch.Tensor]] = {}
        self._method: Method | None = None
        self.decoded = 0
        self.frozen_computed = 0

    @property
    def crop_bytes(self) -> int:
        """Host memory held by decoded crops."""
        return sum(crops.numel() for _, _, crops in self._crops.values())

    def bind(self, method: Method) -> None:
        """Use the cache for ``method``'s evaluations (frozen features of another method are dropped)."""
        if method is not self._method:
            self._frozen.clear()
            self._method = method

    def crops(self, gallery: GalleryImages, *, loader_options: dict) -> torch.Tensor | None:
        """All of ``gallery``'s decoded crops ``[N, 3, H, W]`` uint8, decoding them the first time;
        None when the transform cannot be split or the cap leaves no room for them."""
        kept = self._crops.get(id(gallery))
        if kept is not None and kept[0] is gallery and kept[1] is gallery.transform:
            return kept[2]
        parts = gallery.transform_parts()
        if parts is None or self.max_crop_bytes == 0:
            return None
        first = gallery.crop(0)
        if self.crop_bytes + first.numel() * len(gallery) > self.max_crop_bytes:
            return None
        # A private generator: decoding once must not move the run's global RNG (see _draw_like_a_loader).
        loader = DataLoader(_Crops(gallery), batch_size=64, shuffle=False, generator=torch.Generator(),
                            **loader_options)
        crops = torch.cat(list(worker_errors_unwrapped(loader)))
        if loader_options.get("pin_memory"):
            crops = crops.pin_memory()  # page-locked: each session's copies to the GPU are asynchronous
        self.decoded += len(gallery)
        self._crops[id(gallery)] = (gallery, gallery.transform, crops)
        return crops

    def frozen(self, gallery: GalleryImages, modality: str, rows: slice,
               compute: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """Frozen features of items ``rows`` of ``gallery`` (``modality`` "image" or "text"), from
        the cache, or ``compute()`` now and kept."""
        size = len(gallery) if modality == "image" else len(gallery.caption_tokens)
        key = (id(gallery), modality)
        kept = self._frozen.get(key)
        if kept is not None and (kept[0] is not gallery or kept[1] is not gallery.transform):
            kept = None  # another gallery under a reused id, or new image transforms: start afresh
        if kept is not None and bool(kept[3][rows].all()):
            return kept[2][rows]
        features = compute()
        if features is None:
            return None
        self.frozen_computed += len(features)
        if kept is None:
            kept = (gallery, gallery.transform, features.new_zeros((size, *features.shape[1:])),
                    torch.zeros(size, dtype=torch.bool))
            self._frozen[key] = kept
        kept[2][rows] = features
        kept[3][rows] = True
        return features


class _Crops(Dataset):
    """A gallery's images as uint8 crops (what :class:`EvaluationCache` keeps)."""

    def __init__(self, gallery: GalleryImages):
        self.gallery = gallery

    def __len__(self) -> int:
        return len(self.gallery)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.gallery.crop(index)


def _loader_options(device: torch.device, num_workers: int) -> dict:
    """DataLoader options of the evaluation: workers, and pinned memory on CUDA (for the
    asynchronous copies of ``non_blocking=True``)."""
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}


@torch.no_grad()
def encode_task(method: Method, gallery: GalleryImages, task: int, *, given: bool, batch_size: int,
                device: torch.device, progress: Callable[[int], None] | None = None,
                cache: EvaluationCache | None = None, num_workers: int = 0, precision: str = "auto") -> TaskFeatures:
    """Encode one task's test images and captions with the method (in eval mode); ``progress``
    is called with the number of items (images or captions) of each batch once it is encoded.

    Each batch goes through :meth:`~benchmark.method.Method.evaluate_images` (features and
    routes from one pass). With ``cache``, decoded crops and frozen features come from it (see
    :class:`EvaluationCache`). ``num_workers`` loader processes decode the test images where the
    eval transform is deterministic; a random one is drawn in this process, as before, so that
    its draws do not depend on the number of workers.

    Under ``--ddp`` each process encodes its shard (the same shard object every session, so the
    cache serves it too) and every process gets the whole task's features
    (:func:`benchmark.distributed.encode_in_shards`).
    """
    if distributed.wants_shards(gallery):
        return distributed.encode_in_shards(
            lambda shard: encode_task(method, shard, task, given=given, batch_size=batch_size, device=device,
                                      progress=progress, cache=cache, num_workers=num_workers,
                                      precision=precision), gallery)
    progress = progress or (lambda items: None)
    autocast = amp.autocast(device, precision)  # training.precision: bf16 on CUDA by default, fp32 on the CPU
    deterministic = gallery.transform_parts() is not None
    options = _loader_options(device, num_workers if deterministic else 0)
    image_parts, text_parts, image_routes, text_routes = [], [], [], []
    crops = cache.crops(gallery, loader_options=options) if cache is not None else None
    if crops is not None:
        _draw_like_a_loader()
        finish = gallery.finish
        batches = ((finish(crops[start:start + batch_size].to(device, non_blocking=True)))
                   for start in range(0, len(crops), batch_size))
    else:
        batches = (images.to(device, non_blocking=True)
                   for images, _ in worker_errors_unwrapped(
                       DataLoader(gallery, batch_size=batch_size, shuffle=False, **options)))
    image_cache = cache if deterministic else None
    # Captions cut to the batch's longest on the host (exact for CLIP's causal text tower, see
    # ClipBackbone.trim_tokens); a method without a harness backbone gets the ids as they are.
    trim = getattr(getattr(method, "backbone", None), "trim_tokens", None) or (lambda ids: ids)
    with autocast:
        start = 0
        for images in batches:
            rows = slice(start, start + len(images))
            ids = torch.full((len(images),), task, device=device) if given else None
            frozen = _frozen_thunk(image_cache, gallery, "image", rows, lambda: method.frozen_image_features(images))
            features, routes = method.evaluate_images(images, ids, frozen)
            image_parts.append(features.float())
            image_routes.append(None if given else routes)
            progress(len(images))
            start += len(images)
        for start in range(0, len(gallery.caption_tokens), batch_size):
            tokens = trim(gallery.caption_tokens[start:start + batch_size]).to(device, non_blocking=True)
            rows = slice(start, start + len(tokens))
            ids = torch.full((len(tokens),), task, device=device) if given else None
            frozen = _frozen_thunk(cache, gallery, "text", rows, lambda: method.frozen_text_features(tokens))
            features, routes = method.evaluate_texts(tokens, ids, frozen)
            text_parts.append(features.float())
            text_routes.append(None if given else routes)
            progress(len(tokens))
    return TaskFeatures(torch.cat(image_parts), torch.cat(text_parts), gallery.caption_image.to(device),
                        _routing_accuracy(image_routes, task), _routing_accuracy(text_routes, task))


def _draw_like_a_loader() -> None:
    """Draw from the global RNG what iterating the gallery's DataLoader draws (one int64, its
    workers' base seed, torch.utils.data.dataloader._BaseDataLoaderIter), so that the run's later
    random draws (training crops, shuffles) are the same with or without cached crops, and a
    resumed run (whose cache starts empty) draws what the uninterrupted one drew."""
    torch.empty((), dtype=torch.int64).random_()


def _frozen_thunk(cache: EvaluationCache | None, gallery: GalleryImages, modality: str, rows: slice,
                  compute: Callable[[], torch.Tensor | None]) -> Callable[[], torch.Tensor | None]:
    """``frozen()`` for one batch: computed when the method asks for it, through the cache if any."""
    if cache is None:
        return compute
    return lambda: cache.frozen(gallery, modality, rows, compute)


def _routing_accuracy(routes: list, task: int) -> float | None:
    """% of items routed to ``task``; None when the method does not route."""
    if not routes or any(r is None for r in routes):
        return None
    routed = torch.cat([r.cpu() for r in routes])
    return 100.0 * float((routed == task).float().mean())


def evaluated_tasks(after_task: int, num_tasks: int, protocol: Protocol) -> list[int]:
    """Tasks evaluated once task ``after_task`` is trained (``-1``: before any training)."""
    return list(range(num_tasks)) if protocol.tasks == "all" else list(range(after_task + 1))


def items_to_encode(galleries: list[GalleryImages], after_task: int, protocol: Protocol) -> int:
    """Test images and captions the evaluation after task ``after_task`` encodes (a progress bar's total)."""
    return sum(len(galleries[j]) + len(galleries[j].caption_tokens)
               for j in evaluated_tasks(after_task, len(galleries), protocol))


def evaluate_session(method: Method, galleries: list[GalleryImages], after_task: int, protocol: Protocol, *,
                     batch_size: int, device: torch.device, task_names: list[str] | None = None,
                     progress: Callable[[int], None] | None = None, cache: EvaluationCache | None = None,
                     num_workers: int = 0, precision: str = "auto") -> SessionResult:
    """Evaluate once task ``after_task`` is trained: one row of every recall matrix, plus routing accuracy.

    ``progress`` (optional) is called with the number of test items of each encoded batch (see
    :func:`items_to_encode` for their total); it only watches, results do not depend on it.
    ``cache`` (optional, one :class:`EvaluationCache` per run, passed to every session) keeps
    decoded test crops and frozen features across sessions; results are identical without it.
    ``num_workers``: loader processes decoding the test images (see :func:`encode_task`).
    Scores are ranked on ``device`` (:func:`benchmark.retrieval.retrieval_ranks`).

    Raises:
        BrokenFeatures: the method encoded some test item to a NaN or infinite feature.
    """
    was_training = method.training
    method.eval()
    try:
        tasks = evaluated_tasks(after_task, len(galleries), protocol)
        if cache is not None:
            cache.bind(method)
        features = {j: encode_task(method, galleries[j], j, given=protocol.task_identity == "given",
                                   batch_size=batch_size, device=device, progress=progress, cache=cache,
                                   num_workers=num_workers, precision=precision) for j in tasks}
    finally:
        method.train(was_training)
    for j, f in features.items():
        _require_finite(f, method, after_task, task_names[j] if task_names else f"task {j}")

    ranks: dict[str, dict[int, torch.Tensor]] = {d: {} for d in DIRECTIONS}
    return SessionResult(recall=_recall_row(features, len(galleries), protocol, ranks),
                         routing=_routing_row(features, len(galleries)), ranks=ranks)


def _require_finite(features: TaskFeatures, method: Method, after_task: int, task: str) -> None:
    """Broken features must not be ranked: a NaN compares false with everything and would
    give every query a perfect rank."""
    for modality, values in (("image", features.images), ("text", features.texts)):
        bad = non_finite_rows(values)
        if bad:
            when = "before training" if after_task < 0 else f"after session {after_task + 1}"
            raise BrokenFeatures(
                f"method {method.name!r} encoded {bad} of {len(values)} {modality} test items of task {task!r} "
                f"to NaN or infinite features ({when}); no recall was computed. Lower the learning rate "
                "(method_params.<method>.lr) or check the method's encode_images / encode_texts")


def _routing_row(features: dict[int, TaskFeatures], num_tasks: int) -> dict[str, list[float | None]] | None:
    if all(f.image_routing is None and f.text_routing is None for f in features.values()):
        return None
    row = {"image": [None] * num_tasks, "text": [None] * num_tasks}
    for j, f in features.items():
        row["image"][j], row["text"][j] = f.image_routing, f.text_routing
    return row


def _recall_row(features: dict[int, TaskFeatures], num_tasks: int, protocol: Protocol,
                query_ranks: dict[str, dict[int, torch.Tensor]]) -> dict[str, dict[int, list[float | None]]]:
    """One row of every recall matrix; fills ``query_ranks`` with each task's per-query ranks."""
    tasks = list(features)
    row = {d: {k: [None] * num_tasks for k in KS} for d in DIRECTIONS}
    if protocol.gallery == "per_task":
        for j, f in features.items():
            ranks = retrieval_ranks(f.images, f.texts, f.caption_image)
            for direction in DIRECTIONS:
                query_ranks[direction][j] = _rank_columns(ranks, direction)
                for k, value in ranks.recall(direction, KS).items():
                    row[direction][k][j] = value
        return row

    # Union gallery: rank once against everything, then group queries by their true task.
    image_task, text_task, offset = [], [], 0
    for j, f in features.items():
        image_task.append(torch.full((len(f.images),), j))  # on the CPU, like the ranks
        text_task.append(torch.full((len(f.texts),), j))
    caption_image = []
    for f in features.values():
        caption_image.append(f.caption_image.cpu() + offset)
        offset += len(f.images)
    ranks = retrieval_ranks(torch.cat([f.images for f in features.values()]),
                            torch.cat([f.texts for f in features.values()]), torch.cat(caption_image))
    image_task, text_task = torch.cat(image_task), torch.cat(text_task)
    for j in tasks:
        for direction, owner in (("i2t", image_task), ("t2i", text_task)):
            query_ranks[direction][j] = _rank_columns(ranks, direction)[owner == j]
            for k, value in ranks.recall(direction, KS, mask=owner == j).items():
                row[direction][k][j] = value
    return row


def _rank_columns(ranks: RetrievalRanks, direction: str) -> torch.Tensor:
    """``[N, 3]``: (above, tied, tied_true) per query of one direction."""
    tied, tied_true = ranks.ties(direction)
    return torch.stack([getattr(ranks, direction), tied, tied_true], dim=1)
