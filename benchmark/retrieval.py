"""Recall@K for image-text retrieval with several captions per image.

Conventions (also in docs/metrics.md):

* Similarity is the dot product of the features. The caller L2-normalises them, so this
  is the cosine similarity CLIP is trained with. Scores are always computed in float32,
  whatever the feature dtype, so fp16/bf16 features do not lose ranking resolution in the
  matrix product's accumulation.
* Features must be finite: a NaN compares false with everything, so a NaN gallery would
  otherwise leave every ground truth with nothing "above" it and score 100 %. Non-finite
  features are a ``ValueError``.
* Ranks are 0-based: rank 0 means the ground truth is at the top of the ranking.
* **Multi-caption semantics.** An image may have any number (>= 1) of captions.

  - text -> image: a caption has exactly one true image.
  - image -> text: an image is retrieved correctly as soon as *any* of its captions is
    in the top K, so only its best-scoring true caption matters.

* **Ties.** For every query we count, at the score ``s*`` of its best true item,
  ``above`` = gallery items scoring strictly more than ``s*``, ``tied`` = *non-matching*
  items scoring exactly ``s*``, and ``tied_true`` = true items scoring exactly ``s*``
  (always 1 for text -> image). The default tie rule, ``"expected"``, is the expected
  recall when tied items are put in a uniformly random order (McSherry & Najork, ECIR
  2008): a collapsed model whose features are all equal scores chance, not 100 %. With
  ``j = K - above`` free places in the top K, the first true item of the tied block lands
  among them unless all ``j`` go to non-matching items:

      hit@K = 0                                        if j <= 0
            = 1 - C(tied, j) / C(tied + tied_true, j)  otherwise (C(n, j) = 0 for j > n)

  For one true item this is ``min(1, j / (tied + 1))``. ``"optimistic"`` (ties count in the
  query's favour, hit iff ``above < K``) was this module's rule before; it stays available
  by name. When all scores are distinct every rule gives the position obtained by sorting.

Recall@K is the mean of hit@K over the selected queries, in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["RetrievalRanks", "TIE_RULES", "hits_at_k", "non_finite_rows", "retrieval_ranks", "recall_at_k"]

TIE_RULES = ("expected", "optimistic")
MAX_SCORES = 1 << 28  # scores held at once by one retrieval_ranks call (float32: 1 GiB)


@dataclass(frozen=True)
class RetrievalRanks:
    """Where the ground truth of every query stands, on the CPU (long tensors).

    ``i2t[x]`` / ``t2i[c]`` count the gallery items that score strictly more than the best
    true item of image ``x`` / caption ``c`` (the optimistic 0-based rank); ``*_tied``
    count the non-matching items that tie with it exactly, ``i2t_tied_true`` the true
    captions at that score (>= 1; for t2i it is always 1).
    """

    i2t: Tensor  # [N_img]
    t2i: Tensor  # [N_txt]
    i2t_tied: Tensor  # [N_img]
    i2t_tied_true: Tensor  # [N_img]
    t2i_tied: Tensor  # [N_txt]

    def ties(self, direction: str) -> tuple[Tensor, Tensor]:
        """``(tied, tied_true)`` of one direction."""
        if direction == "i2t":
            return self.i2t_tied, self.i2t_tied_true
        if direction == "t2i":
            return self.t2i_tied, torch.ones_like(self.t2i_tied)
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")

    def recall(self, direction: str, ks: Iterable[int] = (1, 5, 10), mask: Tensor | None = None,
               tie_rule: str = "expected") -> dict[int, float]:
        """:func:`recall_at_k` of one direction with its ties."""
        tied, tied_true = self.ties(direction)
        return recall_at_k(getattr(self, direction), ks, mask, tied=tied, tied_true=tied_true, tie_rule=tie_rule)


def retrieval_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    max_scores: int = MAX_SCORES,
) -> RetrievalRanks:
    """Rank of the ground truth, and its ties, for every image query and every caption query.

    Args:
        image_features: ``[N_img, D]``, L2-normalised by the caller, finite.
        text_features: ``[N_txt, D]``, L2-normalised by the caller, finite.
        text_to_image: ``[N_txt]`` integer tensor, the index of each caption's image. Every
            image must have at least one caption.
        chunk_size: rows of the score matrix compared at once; when the whole matrix does not
            fit ``max_scores``, queries scored at once (then at most ``chunk_size x gallery``
            float32 scores exist at any time).
        max_scores: the most scores (``N_img x N_txt``) held at once: up to it, the whole matrix
            is one product (default 2^28 scores, 1 GiB; COCO's 5,000 x 25,000 test set is 0.5 GB);
            beyond it, each direction is scored in chunks of queries, one product per direction.
        device: where the scores are computed and counted (e.g. ``"cuda"``); ``None``: the
            device of ``image_features``. The counts do not depend on it (see below).

    Returns:
        :class:`RetrievalRanks` with long tensors on the CPU.

    Definitions (S = image_features @ text_features.T, x_c = text_to_image[c]):

    * t2i: ``s* = S[x_c, c]``; ``t2i[c] = #{x' : S[x', c] > s*}``,
      ``t2i_tied[c] = #{x' != x_c : S[x', c] = s*}``.
    * i2t: ``s* = max_{c : x_c = x} S[x, c]``; ``i2t[x] = #{c' : S[x, c'] > s*}`` (all
      captions above the best true one are non-matching), ``i2t_tied_true[x] =
      #{c : x_c = x, S[x, c] = s*}``, ``i2t_tied[x] = #{c' : S[x, c'] = s*} - i2t_tied_true[x]``.

      Working from the best true caption is exact for "any caption in the top K": under any
      ordering of the ties the first true caption in the ranking is one scoring ``s*``.

    Up to ``max_scores``, one score matrix serves both directions: ``S`` is one product, i2t reads
    its rows and t2i its columns, so both directions compare the very same float32 numbers (half
    the arithmetic of one product per direction). A true score is always read from the matrix it
    is compared against, so a tie is a tie bit for bit. (Computing ``S`` in blocks of different
    shapes would not do: a BLAS may round the same dot product differently in two calls of
    different shapes, which splits exact ties.)

    Raises:
        ValueError: on inconsistent shapes, non-finite features, out-of-range caption
            indices, an image with no caption, or a non-positive ``chunk_size``.
    """
    _validate(image_features, text_features, text_to_image, chunk_size)
    device = image_features.device if device is None else torch.device(device)
    # The whole gallery is converted once (N x D, small next to the N x N scores).
    images = image_features.to(device=device, dtype=torch.float32)
    texts = text_features.to(device=device, dtype=torch.float32)
    caption_image = text_to_image.to(device=device, dtype=torch.long)
    if images.shape[0] * texts.shape[0] <= max_scores:
        return _one_product_ranks(images, texts, caption_image, chunk_size)
    i2t, i2t_tied, i2t_tied_true = _image_to_text_ranks(images, texts, caption_image, chunk_size)
    t2i, t2i_tied = _text_to_image_ranks(images, texts, caption_image, chunk_size)
    return RetrievalRanks(i2t=i2t.cpu(), t2i=t2i.cpu(), i2t_tied=i2t_tied.cpu(),
                          i2t_tied_true=i2t_tied_true.cpu(), t2i_tied=t2i_tied.cpu())


def _one_product_ranks(images: Tensor, texts: Tensor, caption_image: Tensor, chunk_size: int) -> RetrievalRanks:
    """Both directions from one score matrix ``S = images @ texts.T``, computed in one product:
    i2t reads its rows, t2i its columns (the transpose), so both compare the very same numbers.
    The comparisons run over blocks of ``chunk_size`` rows, whose temporaries stay small."""
    scores = _finite(images @ texts.T)  # [N_img, N_txt]
    n_images, n_texts = scores.shape
    device = scores.device
    own = scores[caption_image, torch.arange(n_texts, device=device)]  # each caption's score with its image
    # i2t: the best true caption of each image (a segment max), and how many true captions reach it.
    best_true = torch.full((n_images,), float("-inf"), device=device).scatter_reduce_(
        0, caption_image, own, reduce="amax")
    at_best = torch.zeros(n_images, dtype=torch.long, device=device).scatter_add_(
        0, caption_image, (own == best_true[caption_image]).long())
    i2t, i2t_equal = (torch.empty(n_images, dtype=torch.long, device=device) for _ in range(2))
    t2i, t2i_equal = (torch.zeros(n_texts, dtype=torch.long, device=device) for _ in range(2))
    for start in range(0, n_images, chunk_size):
        rows = scores[start:start + chunk_size]
        best = best_true[start:start + chunk_size, None]
        i2t[start:start + chunk_size] = (rows > best).sum(dim=1)
        i2t_equal[start:start + chunk_size] = (rows == best).sum(dim=1)
        # t2i: each caption's column against its own image's score, summed block by block.
        t2i += (rows > own).sum(dim=0)
        t2i_equal += (rows == own).sum(dim=0)
    return RetrievalRanks(i2t=i2t.cpu(), t2i=t2i.cpu(), i2t_tied=(i2t_equal - at_best).cpu(),
                          i2t_tied_true=at_best.cpu(), t2i_tied=(t2i_equal - 1).cpu())  # t2i: minus the true image


def _text_to_image_ranks(images: Tensor, texts: Tensor, caption_image: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    above = torch.empty(texts.shape[0], dtype=torch.long, device=texts.device)
    tied = torch.empty_like(above)
    for start in range(0, texts.shape[0], chunk_size):
        stop = min(start + chunk_size, texts.shape[0])
        scores = _finite(texts[start:stop] @ images.T)  # [chunk, N_img]
        # The true score is read from the same matrix it is compared against, so a tie
        # is a tie bit for bit (no second computation that could round differently).
        true_scores = scores.gather(1, caption_image[start:stop, None])
        above[start:stop] = (scores > true_scores).sum(dim=1)
        tied[start:stop] = (scores == true_scores).sum(dim=1) - 1  # minus the true image itself
    return above, tied


def _image_to_text_ranks(images: Tensor, texts: Tensor, caption_image: Tensor,
                         chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    n_images = images.shape[0]
    above = torch.empty(n_images, dtype=torch.long, device=images.device)
    tied = torch.empty_like(above)
    tied_true = torch.empty_like(above)
    caption_ids = torch.arange(texts.shape[0], device=images.device)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        scores = _finite(images[start:stop] @ texts.T)  # [chunk, N_txt]

        # Best true-caption score per image of the chunk: gather each of the chunk's
        # captions' own score, then take the per-image maximum with a segment max.
        in_chunk = (caption_image >= start) & (caption_image < stop)
        rows = caption_image[in_chunk] - start
        own_scores = scores[rows, caption_ids[in_chunk]]
        best_true = torch.full((stop - start,), float("-inf"), device=images.device)
        best_true.scatter_reduce_(0, rows, own_scores, reduce="amax")
        # How many of each image's true captions reach that best score.
        at_best = torch.zeros(stop - start, dtype=torch.long, device=images.device)
        at_best.scatter_add_(0, rows, (own_scores == best_true[rows]).long())

        above[start:stop] = (scores > best_true[:, None]).sum(dim=1)
        tied[start:stop] = (scores == best_true[:, None]).sum(dim=1) - at_best
        tied_true[start:stop] = at_best
    return above, tied, tied_true


def non_finite_rows(features: Tensor) -> int:
    """How many feature vectors (rows) hold a NaN or an infinity."""
    return int((~torch.isfinite(features)).any(dim=1).sum())


def _finite(scores: Tensor) -> Tensor:
    """Finite features can still overflow float32 in the product (e.g. unnormalised features
    near 1e30); a NaN or infinite score would be miscounted like a NaN feature."""
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("some similarity scores are not finite (the features overflow float32): "
                         "L2-normalise the features before ranking")
    return scores


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
    for name, features in (("image", image_features), ("text", text_features)):
        bad = non_finite_rows(features)
        if bad:
            raise ValueError(f"{bad} of {features.shape[0]} {name} feature vectors are not finite (NaN or inf)")
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


def hits_at_k(above: Tensor, k: int, *, tied: Tensor | None = None, tied_true: Tensor | None = None,
              tie_rule: str = "expected") -> Tensor:
    """Per-query hit at K (float64 in [0, 1]) under a tie rule; see the module docstring.

    ``tied`` / ``tied_true`` default to no ties (0 / 1), for which every rule gives
    ``above < k``.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {', '.join(TIE_RULES)}, got {tie_rule!r}")
    above = torch.as_tensor(above).long()
    strict = (above < k).double()
    if tied is None or tie_rule == "optimistic":
        return strict
    tied = torch.as_tensor(tied).long()
    tied_true = torch.ones_like(tied) if tied_true is None else torch.as_tensor(tied_true).long()
    free = (k - above).clamp(min=0)  # j: places left in the top K above the tied block
    # P(the first j places of the tied block are all non-matching) = prod_{i<j} (e-i)/(e+m-i).
    # j <= k, so a loop over i < k suffices; factors for i >= j are left at 1.
    miss = torch.ones(above.shape, dtype=torch.float64)
    for i in range(k):
        # Once i reaches `tied` the numerator is 0; clamping the denominator avoids 0/0 there.
        factor = (tied - i).clamp(min=0).double() / (tied + tied_true - i).clamp(min=1).double()
        miss = torch.where(free > i, miss * factor, miss)
    return torch.where(free > 0, 1.0 - miss, torch.zeros_like(miss))


def recall_at_k(
    ranks: Tensor,
    ks: Iterable[int] = (1, 5, 10),
    mask: Tensor | None = None,
    *,
    tied: Tensor | None = None,
    tied_true: Tensor | None = None,
    tie_rule: str = "expected",
) -> dict[int, float]:
    """Recall@K in percent: ``100 * mean over the selected queries of hit@K``.

    Args:
        ranks: per query, the number of gallery items strictly above its best true item
            (e.g. ``RetrievalRanks.i2t``).
        ks: the cut-offs K, positive integers.
        mask: boolean tensor shaped like ``ranks`` selecting the queries to average over
            (e.g. the queries of one task); ``None`` selects all.
        tied, tied_true: the ties of each query (:class:`RetrievalRanks`); without them the
            ranks are taken as tie-free, so the hit is ``rank < K``.
        tie_rule: ``"expected"`` (default) or ``"optimistic"``; see the module docstring.

    Raises:
        ValueError: if the selection is empty, the mask is not a boolean tensor of the
            right shape, a K is not positive, or the tie rule is unknown.
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
    tied = None if tied is None else tied.detach().cpu()
    tied_true = None if tied_true is None else tied_true.detach().cpu()
    if mask is not None:
        mask = mask.cpu()
        ranks = ranks[mask]
        tied = None if tied is None else tied[mask]
        tied_true = None if tied_true is None else tied_true[mask]
    if ranks.numel() == 0:
        raise ValueError("recall_at_k: no query selected (empty ranks or all-False mask)")

    recalls: dict[int, float] = {}
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"recall cut-off K must be a positive integer, got {k!r}")
        hits = hits_at_k(ranks, int(k), tied=tied, tied_true=tied_true, tie_rule=tie_rule)
        recalls[int(k)] = 100.0 * float(hits.sum()) / ranks.numel()
    return recalls
