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
image is in the top K; text->image ranks the caption's single image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from methods.base import Method

from .data.torch_datasets import GalleryImages
from .retrieval import recall_at_k, retrieval_ranks

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
GALLERIES = ("union", "per_task")
TASK_IDENTITIES = ("inferred", "given")
EVAL_TASKS = ("seen", "all")


@dataclass(frozen=True)
class Protocol:
    gallery: str = "union"
    task_identity: str = "inferred"
    tasks: str = "seen"

    def __post_init__(self):
        for value, allowed, name in ((self.gallery, GALLERIES, "gallery"),
                                     (self.task_identity, TASK_IDENTITIES, "task_identity"),
                                     (self.tasks, EVAL_TASKS, "tasks")):
            if value not in allowed:
                raise ValueError(f"protocol.{name} must be one of {', '.join(allowed)}, got {value!r}")

    def describe(self) -> str:
        return f"gallery={self.gallery}, task identity={self.task_identity}, tasks={self.tasks}"


@dataclass
class TaskFeatures:
    images: torch.Tensor  # [N_img, D], L2-normalised, float32, CPU
    texts: torch.Tensor  # [N_txt, D]
    caption_image: torch.Tensor  # [N_txt] index into images


@torch.no_grad()
def encode_task(method: Method, gallery: GalleryImages, task: int, *, given: bool, batch_size: int,
                device: torch.device) -> TaskFeatures:
    """Encode one task's test images and captions with the method (in eval mode)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    image_parts, text_parts = [], []
    loader = DataLoader(gallery, batch_size=batch_size, shuffle=False)
    with autocast:
        for images, _ in loader:
            ids = torch.full((len(images),), task, device=device) if given else None
            image_parts.append(method.encode_images(images.to(device), ids).float().cpu())
        for start in range(0, len(gallery.caption_tokens), batch_size):
            tokens = gallery.caption_tokens[start:start + batch_size].to(device)
            ids = torch.full((len(tokens),), task, device=device) if given else None
            text_parts.append(method.encode_texts(tokens, ids).float().cpu())
    return TaskFeatures(torch.cat(image_parts), torch.cat(text_parts), gallery.caption_image)


def evaluated_tasks(session: int, num_tasks: int, protocol: Protocol) -> list[int]:
    """Tasks evaluated after ``session`` (``session=-1``: before any training)."""
    return list(range(num_tasks)) if protocol.tasks == "all" else list(range(session + 1))


def evaluate_session(method: Method, galleries: list[GalleryImages], session: int, protocol: Protocol, *,
                     batch_size: int, device: torch.device) -> dict[str, dict[int, list[float | None]]]:
    """One row of every recall matrix: ``{direction: {K: [R[session][j] or None for j]}}``."""
    was_training = method.training
    method.eval()
    try:
        tasks = evaluated_tasks(session, len(galleries), protocol)
        features = {j: encode_task(method, galleries[j], j, given=protocol.task_identity == "given",
                                   batch_size=batch_size, device=device) for j in tasks}
    finally:
        method.train(was_training)

    row = {d: {k: [None] * len(galleries) for k in KS} for d in DIRECTIONS}
    if protocol.gallery == "per_task":
        for j, f in features.items():
            ranks = retrieval_ranks(f.images, f.texts, f.caption_image)
            for direction in DIRECTIONS:
                for k, value in recall_at_k(getattr(ranks, direction), KS).items():
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
            for k, value in recall_at_k(getattr(ranks, direction), KS, mask=owner == j).items():
                row[direction][k][j] = value
    return row
