"""Key-query prompt selection, shared by L2P, DualPrompt and CODA-Prompt (written once).

The three methods pick (or weight) prompts by comparing a *query* — the frozen image encoder's
feature of the image, computed without any prompt — with learnable *keys*:

* :func:`frozen_cls_query` — the query: the pre-projection ``[CLS]`` feature of the frozen
  image tower (the output of its final LayerNorm, ``ln_post``), ``[B, vision_width]``. This is
  the query of all three papers (the ``[CLS]`` output of the frozen ViT, before any head), and
  its width is the ViT's width, so the keys are ``vision_width``-dimensional: 768 for ViT-B/16,
  which gives L2P's published 46,080 pool + key parameters. It costs one extra forward pass of
  the image tower per image (``Method.forward_passes = 2``).
* :func:`cosine_similarity` / :func:`select_top_k` — instance-wise top-N selection by cosine
  similarity (L2P's prompt choice, N = 1 for DualPrompt's E-prompt matching).
* :func:`pull_loss` — the surrogate loss that pulls the chosen keys towards their queries:
  the cosine distance ``1 - cos(q, k)`` summed over the chosen keys and averaged over the
  batch (L2P's ``Σ γ(q(x), k_si)``; DualPrompt's matching loss with the task's key).
* Precision: the query pass and the scoring run with autocast switched off
  (:func:`methods.common.precision.full_precision`), in float32, so under the harness's bf16
  autocast on CUDA the selection is exactly the float32 one (the official codebases run in
  float32); the prompted pass that follows still runs under autocast.
* :func:`batchwise_top_k` — L2P's batch-wise selection: the ``k`` prompts chosen most often
  across the batch's instance-wise top-k sets, used for every image of the batch.
* :func:`clip_layers` — paper layer indices clipped to the depth of the backbone at hand.
* :func:`gram_schmidt` / :func:`ortho_penalty` — CODA-Prompt's orthogonal initialisation of new
  components against the earlier ones, and its optional orthogonality penalty.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import full_precision


@torch.no_grad()
def frozen_cls_query(backbone, images: Tensor) -> Tensor:
    """The query of key-query prompt methods: ``[B, vision_width]`` float32 features of ``images``
    from the frozen image tower without prompts, taken after the final LayerNorm and before the
    projection into the joint embedding space (the ``[CLS]`` token for CLIP's ViTs).

    Runs the backbone's own ``encode_image`` (so it is exactly the pretrained model) and reads
    the output of ``visual.ln_post`` with a forward hook; no gradient flows into it. The pass
    runs with autocast off: under bf16 autocast the query is the float32 one all the same.
    """
    visual = backbone.visual
    captured: list[Tensor] = []
    handle = visual.ln_post.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with full_precision(images.device):
            backbone.encode_image(images.float() if images.is_floating_point() else images)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"backbone {getattr(backbone, 'spec', '?')}: the image tower never ran visual.ln_post")
    out = captured[-1]
    if out.ndim == 3:  # ln_post normalised the whole sequence: pool it as the encoder does ([CLS] for CLIP)
        out, _ = visual._global_pool(out)
    return out.float()


def cosine_similarity(queries: Tensor, keys: Tensor) -> Tensor:
    """``[B, M]`` cosine similarity of every query ``[B, D]`` with every key ``[M, D]``, computed
    in float32 with autocast off (a bf16 matmul would decide near-ties by rounding)."""
    with full_precision(queries.device):
        return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def select_top_k(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Instance-wise selection: for each query the ``k`` keys of highest cosine similarity.

    Returns ``(indices [B, k], similarity [B, M])``; each row of ``indices`` is ordered from the
    most to the least similar key.
    The selection itself carries no gradient; ``similarity`` does (towards the keys), for
    :func:`pull_loss`.
    """
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"cannot select {k} of {keys.shape[0]} keys")
    similarity = cosine_similarity(queries, keys)
    indices = similarity.detach().topk(k, dim=-1).indices
    return indices, similarity


def batchwise_top_k(indices: Tensor, pool_size: int) -> Tensor:
    """L2P's batch-wise prompt selection: from the instance-wise choices ``indices`` ``[B, k]``,
    the ``k`` prompts chosen most often in the whole batch, most frequent first and, among equally
    frequent ones, the lower index first; returned as ``[B, k]`` (the same row for every image).

    This is ``batchwise_prompt`` of google-research/l2p ``models/prompt.py`` (``jnp.unique`` with
    counts, then ``jax.lax.top_k`` on the counts, whose ties go to the lower index) and of
    JH-LEE-KR/l2p-pytorch ``prompt.py`` (``torch.unique`` / ``torch.topk``).
    """
    batch, k = indices.shape
    counts = torch.bincount(indices.flatten(), minlength=pool_size)
    # A stable descending sort keeps equal counts in index order: ties go to the lower index.
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:k].expand(batch, k)


def pull_loss(similarity: Tensor, indices: Tensor) -> Tensor:
    """Cosine distance between each query and its chosen keys, summed over the ``k`` chosen keys
    and averaged over the batch: ``mean_b Σ_i (1 - similarity[b, indices[b, i]])``.

    ``similarity`` is ``[B, M]`` (from :func:`select_top_k`), ``indices`` ``[B, k]`` (or ``[B]``
    for one key per query). Minimising it moves the chosen keys towards the (frozen) queries.
    """
    if indices.ndim == 1:
        indices = indices[:, None]
    chosen = similarity.gather(1, indices.to(similarity.device))
    return (1.0 - chosen).sum(dim=1).mean()


def clip_layers(layers: Iterable[int], depth: int) -> tuple[int, ...]:
    """The sorted, distinct block indices of ``layers`` that exist in an encoder of ``depth``
    blocks (the papers' layer choices are for 12-block ViT-B/16; a shallower backbone keeps those
    that fit). Negative indices are an error, not Python-style indexing."""
    layers = list(layers)
    if any(int(layer) < 0 for layer in layers):
        raise ValueError(f"layer indices must be >= 0, got {layers}")
    return tuple(sorted({int(layer) for layer in layers if int(layer) < depth}))


def gram_schmidt(n: int, dim: int, existing: Tensor | None = None) -> Tensor:
    """``[n, dim]`` new unit-norm rows, orthogonal to the span of ``existing`` ``[m, dim]`` and to
    each other (classical Gram-Schmidt, each projection applied twice for numerical stability).

    Rows start as draws from ``torch.randn`` (the global RNG, so a seeded run is reproducible).
    Once the rows fill the ``dim``-dimensional space no orthogonal direction is left; the
    remaining rows are then plain random unit vectors (this happens only when the total
    number of components exceeds the width, e.g. CODA-Prompt's 100 components on a 96-wide
    test backbone).
    """
    earlier = existing.detach().float().reshape(-1, dim) if existing is not None else torch.empty(0, dim)
    basis = torch.empty(min(dim, len(earlier) + n), dim)  # orthonormal rows found so far
    size = 0

    def add(v: Tensor) -> bool:
        """Append v's part orthogonal to the basis, normalised, unless nothing is left of it."""
        nonlocal size
        if size >= len(basis):
            return False
        r = v
        for _ in range(2):
            r = r - basis[:size].T @ (basis[:size] @ r)
        if r.norm() <= 1e-6 * max(float(v.norm()), 1e-12):
            return False
        basis[size] = r / r.norm()
        size += 1
        return True

    for row in earlier:
        add(row)
    rows = []
    for v in torch.randn(n, dim):
        # Once the space is full no orthogonal direction is left: keep the random unit vector.
        rows.append(basis[size - 1].clone() if add(v) else v / v.norm())
    return torch.stack(rows) if rows else torch.empty(0, dim)


def ortho_penalty(rows: Tensor) -> Tensor:
    """CODA-Prompt's orthogonality penalty ``mean((R R^T - I)^2)`` for rows ``R`` ``[m, d]``."""
    rows = rows.reshape(rows.shape[0], -1).float()
    gram = rows @ rows.T
    return ((gram - torch.eye(len(rows), device=rows.device)) ** 2).mean()


__all__ = ["batchwise_top_k", "clip_layers", "cosine_similarity", "frozen_cls_query", "gram_schmidt", "ortho_penalty",
           "pull_loss", "select_top_k"]
