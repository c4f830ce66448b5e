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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader

from . import distributed
from .config import EVAL_TASKS, GALLERIES, TASK_IDENTITIES, Protocol
from .data.torch_datasets import GalleryImages
from .errors import BrokenFeatures
from .method import Method
from .retrieval import RetrievalRanks, non_finite_rows, retrieval_ranks

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
# Protocol (and GALLERIES, TASK_IDENTITIES, EVAL_TASKS) is declared once, with the run
# configuration in benchmark.config, and importable from here, where it is applied.


@dataclass
class TaskFeatures:
    images: torch.Tensor  # [N_img, D], L2-normalised, float32, CPU
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


@torch.no_grad()
def encode_task(method: Method, gallery: GalleryImages, task: int, *, given: bool, batch_size: int,
                device: torch.device, progress: Callable[[int], None] | None = None) -> TaskFeatures:
    """Encode one task's test images and captions with the method (in eval mode); ``progress``
    is called with the number of items (images or captions) of each batch once it is encoded.
    Under ``--ddp`` each process encodes its shard and every process gets the whole task's
    features (:func:`benchmark.distributed.encode_in_shards`)."""
    if distributed.wants_shards(gallery):
        return distributed.encode_in_shards(
            lambda shard: encode_task(method, shard, task, given=given, batch_size=batch_size, device=device,
                                      progress=progress), gallery)
    progress = progress or (lambda items: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    image_parts, text_parts, image_routes, text_routes = [], [], [], []
    loader = DataLoader(gallery, batch_size=batch_size, shuffle=False)
    with autocast:
        for images, _ in loader:
            images = images.to(device)
            ids = torch.full((len(images),), task, device=device) if given else None
            image_parts.append(method.encode_images(images, ids).float().cpu())
            if not given:
                image_routes.append(method.route_images(images))
            progress(len(images))
        for start in range(0, len(gallery.caption_tokens), batch_size):
            tokens = gallery.caption_tokens[start:start + batch_size].to(device)
            ids = torch.full((len(tokens),), task, device=device) if given else None
            text_parts.append(method.encode_texts(tokens, ids).float().cpu())
            if not given:
                text_routes.append(method.route_texts(tokens))
            progress(len(tokens))
    return TaskFeatures(torch.cat(image_parts), torch.cat(text_parts), gallery.caption_image,
                        _routing_accuracy(image_routes, task), _routing_accuracy(text_routes, task))


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
                     progress: Callable[[int], None] | None = None) -> SessionResult:
    """Evaluate once task ``after_task`` is trained: one row of every recall matrix, plus routing accuracy.

    ``progress`` (optional) is called with the number of test items of each encoded batch (see
    :func:`items_to_encode` for their total); it only watches, results do not depend on it.

    Raises:
        BrokenFeatures: the method encoded some test item to a NaN or infinite feature.
    """
    was_training = method.training
    method.eval()
    try:
        tasks = evaluated_tasks(after_task, len(galleries), protocol)
        features = {j: encode_task(method, galleries[j], j, given=protocol.task_identity == "given",
                                   batch_size=batch_size, device=device, progress=progress) for j in tasks}
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
        image_task.append(torch.full((len(f.images),), j))
        text_task.append(torch.full((len(f.texts),), j))
    caption_image = []
    for f in features.values():
        caption_image.append(f.caption_image + offset)
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
