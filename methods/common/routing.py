"""Task routing by K-means keys on frozen features (S-Prompts, LPI).

After training task ``t`` the method encodes the task's training images (or captions) with the
*frozen* backbone, runs K-means with ``k`` centroids and stores them as task ``t``'s keys. At
test time an item goes to the task owning its nearest key. Only fitted tasks take part, so a
model never routes to a task it has not seen.

Distances: ``l2`` (Euclidean, what S-Prompts' paper describes), ``l1`` (what the LPI reference
code uses), ``cosine`` (1 - cosine similarity).

Precision: keys are fitted on float32 features, so routing compares in float32 too. Distances
(:func:`pairwise_distance`), the fitting pass (:func:`frozen_features`) and the routing pass
(:func:`route_features`, :meth:`KMeansRouter.route_inputs`) run with autocast switched off
(:func:`methods.common.precision.full_precision`): under the harness's bf16 autocast on CUDA an
item goes to exactly the task the float32 model would send it to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .precision import full_precision

DISTANCES = ("l2", "l1", "cosine")


def kmeans(points: Tensor, k: int, *, iterations: int = 50, seed: int = 0) -> Tensor:
    """Lloyd's K-means with k-means++ seeding (Euclidean), deterministic for a seed.

    Returns ``[k, D]`` centroids. With fewer points than ``k``, the points themselves are
    returned padded by repetition, so every task always owns exactly ``k`` keys.
    """
    points = points.float()
    n = points.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        return points[torch.arange(k) % n].clone()
    generator = torch.Generator().manual_seed(seed)
    centroids = [points[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):  # k-means++: next centroid drawn proportionally to squared distance
        d2 = torch.cdist(points, torch.stack(centroids)).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        centroids.append(points[torch.multinomial(probs, 1, generator=generator)].squeeze(0))
    centroids = torch.stack(centroids)
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(dim=1)
        updated = centroids.clone()
        for c in range(k):
            members = points[assign == c]
            if len(members):
                updated[c] = members.mean(dim=0)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def pairwise_distance(x: Tensor, keys: Tensor, distance: str) -> Tensor:
    """``[N, M]`` distances between rows of ``x`` ``[N, D]`` and ``keys`` ``[M, D]``, in float32
    with autocast off."""
    with full_precision(x.device):
        if distance == "l2":
            return torch.cdist(x.float(), keys.float())
        if distance == "l1":
            return torch.cdist(x.float(), keys.float(), p=1)
        if distance == "cosine":
            return 1 - nn.functional.normalize(x.float(), dim=-1) @ nn.functional.normalize(keys.float(), dim=-1).T
    raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


class KMeansRouter(nn.Module):
    """``k`` keys per task, kept as buffers (so they are saved with the method's state).

    Attributes:
        keys: ``[num_tasks, k, dim]`` centroids (zeros until fitted).
        fitted: ``[num_tasks]`` bool, which tasks have keys.
    """

    def __init__(self, num_tasks: int, dim: int, k: int = 5, distance: str = "l2"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k, self.distance = k, distance
        self.register_buffer("keys", torch.zeros(num_tasks, k, dim))
        self.register_buffer("fitted", torch.zeros(num_tasks, dtype=torch.bool))

    def fit_task(self, task: int, features: Tensor, seed: int = 0) -> None:
        """Store the K-means centroids of ``features`` ``[N, dim]`` as task ``task``'s keys."""
        self.keys[task] = kmeans(features.detach().cpu(), self.k, seed=seed).to(self.keys)
        self.fitted[task] = True

    def route(self, features: Tensor) -> Tensor:
        """``[B]`` task index of the nearest key among fitted tasks."""
        tasks = torch.nonzero(self.fitted).flatten()
        if len(tasks) == 0:
            raise RuntimeError("no task has routing keys yet: fit_task() runs after each task's training")
        keys = self.keys[tasks].reshape(-1, self.keys.shape[-1])
        nearest = pairwise_distance(features, keys.to(features.device), self.distance).argmin(dim=1)
        return tasks.to(features.device)[nearest // self.k]

    def route_inputs(self, encode, batch: Tensor) -> Tensor:
        """``[B]`` routed task of raw inputs: ``encode(batch)`` (a frozen, prompt-free encoder)
        computed in float32 by :func:`route_features`, then :meth:`route`."""
        return self.route(route_features(encode, batch))


@torch.no_grad()
def route_features(encode, batch: Tensor) -> Tensor:
    """``encode(batch)`` as float32 features, with autocast off: the routing query is computed
    at the precision the keys were fitted at, whatever autocast the caller runs under."""
    with full_precision(batch.device):
        return encode(batch).float()


@torch.no_grad()
def frozen_features(backbone, dataset, *, modality: str, batch_size: int, device: torch.device,
                    limit: int | None = None) -> Tensor:
    """Features of a training dataset's images (``modality="image"``) or captions (``"text"``)
    from the backbone *without* prompts. Items are ``(image, tokens, index, task)``."""
    from torch.utils.data import DataLoader

    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    parts, seen = [], 0
    # Eval mode: keys must come from the deterministic model that routes at test time (the
    # caller is usually mid-training, and e.g. patch dropout would otherwise perturb them).
    was_training = backbone.training
    backbone.eval()
    try:
        for images, tokens, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            batch = images if modality == "image" else tokens
            encode = backbone.encode_image if modality == "image" else backbone.encode_text
            parts.append(route_features(encode, batch.to(device)).cpu())
            seen += len(batch)
            if limit is not None and seen >= limit:
                break
    finally:
        backbone.train(was_training)
    if not parts:
        raise ValueError("frozen_features got an empty dataset")
    return torch.cat(parts)[:limit]
