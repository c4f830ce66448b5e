"""Task routing by K-means keys on frozen features (S-Prompts, LPI).

After training task ``t`` the method encodes the task's training images (or captions) with the
*frozen* backbone, runs K-means with ``k`` centroids and stores them as task ``t``'s keys. At
test time an item goes to the task owning its nearest key. Only fitted tasks take part, so a
model never routes to a task it has not seen.

Distances: ``l2`` (Euclidean, what S-Prompts' paper describes), ``l1`` (what the LPI reference
code uses), ``cosine`` (1 - cosine similarity).

Precision: keys are float32 and routing compares in float32. Distances
(:func:`pairwise_distance`) and the routing pass (:func:`route_features`,
:meth:`KMeansRouter.route_inputs`) run with autocast switched off
(:func:`methods.common.precision.full_precision`). The key-fitting pass (:func:`frozen_features`)
encodes under bf16 autocast on CUDA (it is a pass over the whole training set) and turns the
features to float32 before K-means; on the CPU it runs in float32, as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark import precision as amp
from benchmark.data.torch_datasets import split_eval_transform, worker_errors_unwrapped

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


def use_frozen(frozen, compute):
    """The frozen features the evaluator handed over (``frozen()``, possibly cached across
    sessions; see :meth:`benchmark.method.Method.evaluate_images`), or ``compute()`` when there
    are none (no evaluator, or it has none for this batch)."""
    features = frozen() if frozen is not None else None
    return compute() if features is None else features


@torch.no_grad()
def route_features(encode, batch: Tensor) -> Tensor:
    """``encode(batch)`` as float32 features, with autocast off: the routing query is computed
    at the precision the keys were fitted at, whatever autocast the caller runs under."""
    with full_precision(batch.device):
        return encode(batch).float()


@torch.no_grad()
def frozen_features(backbone, dataset, *, modality: str, batch_size: int, device: torch.device,
                    limit: int | None = None, num_workers: int = 0, precision: str = "auto") -> Tensor:
    """Features of a training set's images (``modality="image"``) or captions (``"text"``) from
    the backbone *without* prompts, the points routing keys are fitted on. Items are
    ``(image, tokens, index, task)``.

    When ``dataset`` is (a plain wrapper of) the harness's
    :class:`~benchmark.data.torch_datasets.CaptionPairs`:

    * image keys use every training image **once** (through the set's transform), not once per
      caption: a COCO image has 5 captions, so the pair stream would decode and encode it 5 times.
      This changes the keys wherever an image has several captions: K-means on 5 copies of a
      point (5 augmented crops of it, with a random training transform) weighs it 5 times.
      S-Prompts' own code fits on its training loader, where every image is one entry; LPI's
      retrieval code fits on its pairs (see docs/performance.md).
    * text keys use the token ids alone: no image is decoded for them. Identical to before.

    Otherwise every item of ``dataset`` is used, as before. ``limit`` keeps the first ``limit``
    points. The pass runs in eval mode, ``num_workers`` loader processes decode the images (when
    the transform is deterministic, see :func:`~benchmark.data.torch_datasets.split_eval_transform`), captions are
    cut to the batch's longest on the host (``ClipBackbone.trim_tokens``, exact), and the encoder
    runs at ``precision`` (training's, :mod:`benchmark.precision`: ``auto`` is bf16 autocast on CUDA);
    its features are returned in float32, so K-means and every key comparison stay in float32.
    At ``fp32`` the pass runs with autocast off.
    """
    from torch.utils.data import DataLoader

    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    pairs = _caption_pairs(dataset)
    if pairs is not None and modality == "text":
        batches = (tokens for tokens in pairs.tokens[:limit].split(batch_size))
    else:
        source = _UniqueImages(pairs) if pairs is not None else dataset
        # A random transform is drawn in this process, so the keys do not depend on the workers.
        transform = getattr(pairs if pairs is not None else dataset, "transform", None)
        if split_eval_transform(transform) is None:
            num_workers = 0
        loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=torch.device(device).type == "cuda")
        batches = (_modality_of(batch, modality) for batch in worker_errors_unwrapped(loader))
    encode = backbone.encode_image if modality == "image" else backbone.encode_text
    trim = getattr(backbone, "trim_tokens", None) if modality == "text" else None
    reduced = amp.resolve(precision, device) != "fp32"
    parts, seen = [], 0
    # Eval mode: keys must come from the deterministic model that routes at test time (the
    # caller is usually mid-training, and e.g. patch dropout would otherwise perturb them).
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in batches:
            if trim is not None:
                batch = trim(batch)  # on the host: finding the length there costs no device wait
            batch = batch.to(device, non_blocking=True)
            if reduced:
                with amp.autocast(device, precision):
                    parts.append(encode(batch).float())
            else:
                parts.append(route_features(encode, batch))
            seen += len(batch)
            if limit is not None and seen >= limit:
                break
    finally:
        backbone.train(was_training)
    if not parts:
        raise ValueError("frozen_features got an empty dataset")
    return torch.cat(parts)[:limit].cpu()


def _modality_of(batch, modality: str) -> Tensor:
    """The images (first field) or tokens (second field) of a loader batch; a bare tensor is images."""
    if isinstance(batch, Tensor):
        return batch
    return batch[0] if modality == "image" else batch[1]


def _caption_pairs(dataset):
    """The :class:`CaptionPairs` behind ``dataset`` when it is that set or wraps it item for item
    (an Avalanche dataset of one set, no re-indexing); else None."""
    from benchmark.data.torch_datasets import CaptionPairs

    current = dataset
    for _ in range(4):  # experience dataset -> task-labelled dataset -> CaptionPairs
        if isinstance(current, CaptionPairs):
            return current
        inner = getattr(current, "_datasets", None)
        if (not inner or len(inner) != 1 or len(inner[0]) != len(current)
                or getattr(current, "_indices", None) is not None):
            return None
        current = inner[0]
    return current if isinstance(current, CaptionPairs) else None


class _UniqueImages(torch.utils.data.Dataset):
    """Each training image of a :class:`CaptionPairs` once, through the set's current transform."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.items)

    def __getitem__(self, index: int) -> Tensor:
        from benchmark.data.torch_datasets import load_image

        return self.pairs.transform(load_image(self.pairs.items[index]))
