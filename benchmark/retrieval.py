"""Recall@K for image-text retrieval with several captions per image.

Conventions (also in docs/metrics.md):

* Similarity is the dot product of the features. The caller L2-normalises them, so this
  is the cosine similarity CLIP is trained with. Scores are always computed in float32,
  whatever the feature dtype, so fp16/bf16 features do not lose ranking resolution in the
  matrix product's accumulation.
* Ranks are 0-based: rank 0 means the ground truth is at the top of the ranking.
* **Tie rule.** The rank of a ground-truth item is the number of gallery items whose score
  is *strictly greater* than the ground-truth item's score. Gallery items that tie with the
  ground truth therefore count in the query's favour (the optimistic convention). When all
  scores are distinct this is exactly the position obtained by sorting.
* **Multi-caption semantics.** An image may have any number (>= 1) of captions.

  - text -> image: a caption has exactly one true image; its rank is the number of images
    that score strictly higher than that image.
  - image -> text: an image is retrieved correctly as soon as *any* of its captions is
    ranked high enough, so its rank is the minimum over its captions of each caption's
    rank.

Recall@K is then the percentage of queries whose rank is < K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["RetrievalRanks", "retrieval_ranks", "recall_at_k"]


@dataclass(frozen=True)
class RetrievalRanks:
    """0-based ranks of the ground truth for every query, on the CPU.

    ``i2t[x]`` is the rank of the best-ranked caption of image ``x`` among all captions;
    ``t2i[c]`` is the rank of caption ``c``'s image among all images.
    """

    i2t: Tensor  # long, [N_img]
    t2i: Tensor  # long, [N_txt]


def retrieval_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    *,
    chunk_size: int = 1024,
) -> RetrievalRanks:
    """Rank of the ground truth for every image query and every caption query.

    Args:
        image_features: ``[N_img, D]``, L2-normalised by the caller.
        text_features: ``[N_txt, D]``, L2-normalised by the caller.
        text_to_image: ``[N_txt]`` integer tensor, the index of each caption's image. Every
            image must have at least one caption.
        chunk_size: number of queries scored at once. At most ``chunk_size x gallery``
            float32 scores exist at any time, so large galleries fit in memory.

    Returns:
        :class:`RetrievalRanks` with long tensors on the CPU.

    Definitions (S = image_features @ text_features.T, ties count in the query's favour):

    * ``t2i[c] = #{x' : S[x', c] > S[x_c, c]}`` where ``x_c = text_to_image[c]``.
    * ``i2t[x] = min_{c : x_c = x} #{c' : S[x, c'] > S[x, c]}``.

      The i2t rank is computed through the identity
      ``min_c #{c' : S[x, c'] > S[x, c]} = #{c' : S[x, c'] > max_c S[x, c]}``
      (min and max over the true captions c of x). It holds exactly because the count
      of scores strictly above a threshold never increases as the threshold rises, so
      the smallest count belongs to the highest-scoring true caption. This lets us work
      with one threshold per image instead of one rank per (image, caption) pair.

    Raises:
        ValueError: on inconsistent shapes, out-of-range caption indices, an image with
            no caption, or a non-positive ``chunk_size``.
    """
    _validate(image_features, text_features, text_to_image, chunk_size)
    device = image_features.device
    # The whole gallery is converted once (N x D, small next to the N x N scores); the
    # score matrix is only ever built one chunk of queries at a time.
    images = image_features.to(torch.float32)
    texts = text_features.to(device=device, dtype=torch.float32)
    caption_image = text_to_image.to(device=device, dtype=torch.long)

    return RetrievalRanks(
        i2t=_image_to_text_ranks(images, texts, caption_image, chunk_size).cpu(),
        t2i=_text_to_image_ranks(images, texts, caption_image, chunk_size).cpu(),
    )


def _text_to_image_ranks(images: Tensor, texts: Tensor, caption_image: Tensor, chunk_size: int) -> Tensor:
    ranks = torch.empty(texts.shape[0], dtype=torch.long, device=texts.device)
    for start in range(0, texts.shape[0], chunk_size):
        stop = min(start + chunk_size, texts.shape[0])
        scores = texts[start:stop] @ images.T  # [chunk, N_img]
        # The true score is read from the same matrix it is compared against, so a tie
        # is a tie bit for bit (no second computation that could round differently).
        true_scores = scores.gather(1, caption_image[start:stop, None])
        ranks[start:stop] = (scores > true_scores).sum(dim=1)
    return ranks


def _image_to_text_ranks(images: Tensor, texts: Tensor, caption_image: Tensor, chunk_size: int) -> Tensor:
    n_images = images.shape[0]
    ranks = torch.empty(n_images, dtype=torch.long, device=images.device)
    caption_ids = torch.arange(texts.shape[0], device=images.device)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        scores = images[start:stop] @ texts.T  # [chunk, N_txt]

        # Best true-caption score per image of the chunk: gather each of the chunk's
        # captions' own score, then take the per-image maximum with a segment max.
        in_chunk = (caption_image >= start) & (caption_image < stop)
        rows = caption_image[in_chunk] - start
        own_scores = scores[rows, caption_ids[in_chunk]]
        best_true = torch.full((stop - start,), float("-inf"), device=images.device)
        best_true.scatter_reduce_(0, rows, own_scores, reduce="amax")

        # See the docstring of retrieval_ranks for why this equals the min over captions.
        ranks[start:stop] = (scores > best_true[:, None]).sum(dim=1)
    return ranks


def _validate(image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"features must be 2-D [N, D]; got image {tuple(image_features.shape)}, "
            f"text {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image and text features have different widths: "
            f"{image_features.shape[1]} vs {text_features.shape[1]}"
        )
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"empty gallery: {n_images} images, {n_texts} captions")
    if text_to_image.shape != (n_texts,):
        raise ValueError(
            f"text_to_image must have shape [{n_texts}] (one image index per caption); "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.is_floating_point() or text_to_image.is_complex() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    lowest, highest = int(text_to_image.min()), int(text_to_image.max())
    if lowest < 0 or highest >= n_images:
        raise ValueError(
            f"text_to_image holds image indices in [{lowest}, {highest}] but there are "
            f"only {n_images} images"
        )
    # An image without a caption has no defined i2t rank; failing here is clearer than
    # silently giving it rank N_txt.
    captions_per_image = torch.bincount(text_to_image.long().cpu(), minlength=n_images)
    orphans = torch.nonzero(captions_per_image == 0).flatten()
    if orphans.numel():
        shown = ", ".join(str(int(i)) for i in orphans[:5])
        more = "" if orphans.numel() <= 5 else f" (and {orphans.numel() - 5} more)"
        raise ValueError(f"every image needs at least one caption; images without one: {shown}{more}")


def recall_at_k(
    ranks: Tensor,
    ks: Iterable[int] = (1, 5, 10),
    mask: Tensor | None = None,
) -> dict[int, float]:
    """Recall@K in percent: ``100 * #{q in selection : ranks[q] < K} / #selection``.

    Args:
        ranks: 0-based ranks, one per query (e.g. ``RetrievalRanks.i2t``).
        ks: the cut-offs K, positive integers.
        mask: boolean tensor shaped like ``ranks`` selecting the queries to average over
            (e.g. the queries of one task); ``None`` selects all.

    Raises:
        ValueError: if the selection is empty, the mask is not a boolean tensor of the
            right shape, or a K is not positive.
    """
    ranks = ranks.detach().cpu()
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D, got shape {tuple(ranks.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != ranks.shape:
            raise ValueError(
                f"mask must be a boolean tensor of shape {tuple(ranks.shape)}; "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        ranks = ranks[mask.cpu()]
    if ranks.numel() == 0:
        raise ValueError("recall_at_k: no query selected (empty ranks or all-False mask)")

    total = ranks.numel()
    recalls: dict[int, float] = {}
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"recall cut-off K must be a positive integer, got {k!r}")
        hits = int((ranks < k).sum())
        recalls[int(k)] = 100.0 * hits / total
    return recalls
