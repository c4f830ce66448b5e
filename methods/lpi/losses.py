"""LPI's two prompt-level loss terms (§4). The instance-level term, symmetric InfoNCE with
the backbone's logit scale (§4.1), is the harness strategy's own loss.

Total [released]: ``L = L_itc + 0.1 * L_layer + 0.1 * L_task``, with ``L_task`` only from the
second task on (§4.4). Both terms depend on the prompt factors only, not on the batch.

* :func:`layer_alignment_loss` — "hierarchical low-rank contrastive learning" (§4.2): the
  visual prompt summary of slice ``l`` must match the textual summary of the same slice against
  the other slices. Two variants: ``released`` (retrieval code: unnormalised, both sides / 0.01,
  an effective temperature of 1e-4) and ``normalized`` (grounding code: L2-normalised, x100).
* :func:`task_contrastive_loss` — the task contrastive constraint (§4.3): the flattened
  prompts of tasks 0..t are pulled together where the task-similarity matrix says the tasks are
  close and pushed apart otherwise, by a per-row balanced binary cross-entropy on cosines.
  ``released`` reproduces the reference code's double sigmoid (§6.11); ``corrected`` is
  the loss it meant. Both are guarded against rows with no positives or no negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HLC_VARIANTS = ("released", "normalized")
TASK_LOSS_FORMS = ("released", "corrected")


def layer_alignment_loss(vision: Tensor, text: Tensor, variant: str = "released") -> Tensor:
    """L_layer for one task's prompts ``vision`` ``[L, P, Dv]`` and ``text`` ``[L, P, Dt]`` (§4.2).

    Summaries ``V = mean_d Pv`` and ``T = mean_d Pt`` (``[L, P]``); logits ``H`` (``[L, L]``):
    ``released``: ``(V / 0.01) (T / 0.01)^T``; ``normalized``: ``100 * norm(V) norm(T)^T``.
    Returns ``(CE(H, diag) + CE(H^T, diag)) / 2``.
    """
    v, t = vision.float().mean(dim=-1), text.float().mean(dim=-1)
    if variant == "released":
        logits = (v / 0.01) @ (t / 0.01).T
    elif variant == "normalized":
        logits = 100.0 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    else:
        raise ValueError(f"hlc_variant must be one of {', '.join(HLC_VARIANTS)}, got {variant!r}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` per row; 0 for a row whose mask is empty (the NaN guard:
    the reference code divides 0 by 0 there)."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1)


def task_contrastive_loss(prompts: Tensor, positives: Tensor, temperature: float = 0.001,
                          form: str = "released") -> Tensor:
    """L_task on one modality (§4.3): ``prompts`` ``[n, F]`` (row j = flattened prompt of
    task j), ``positives`` ``[n, n]`` bool (task pairs whose similarity exceeds the threshold).

    With ``K = cos(x_i, x_j)`` and ``bce(z, m) = m * softplus(-z) + (1 - m) * softplus(z)``
    (binary cross-entropy with logits), per row ``i``::

        loss_i = mean_{j positive} bce_ij + mean_{j negative} bce_ij,   L = mean_i loss_i

    ``released``: ``bce_ij = bce(sigmoid(K_ij / tau), m_ij)``, a probability fed as a logit (the
    double sigmoid); the diagonal counts as a positive with ``K_ii = +inf``, as in the reference.
    ``corrected``: ``bce_ij = bce(K_ij / tau, m_ij)``; the diagonal (constant ``cos = 1``, no
    gradient) is left out. An empty positive or negative set contributes 0 (never NaN).
    """
    n = prompts.shape[0]
    if positives.shape != (n, n):
        raise ValueError(f"positives must be [{n}, {n}], got {tuple(positives.shape)}")
    unit = F.normalize(prompts.float(), dim=-1, eps=1e-8)
    cosine = unit @ unit.T
    eye = torch.eye(n, dtype=torch.bool, device=prompts.device)
    positives = positives.to(prompts.device).bool()
    if form == "released":
        target = positives | eye
        probability = torch.sigmoid(cosine.masked_fill(eye, float("inf")) / temperature)
        losses = F.binary_cross_entropy_with_logits(probability, target.float(), reduction="none")
        counted = torch.ones_like(eye)
    elif form == "corrected":
        target = positives & ~eye
        losses = F.binary_cross_entropy_with_logits(cosine / temperature, target.float(), reduction="none")
        counted = ~eye
    else:
        raise ValueError(f"task_loss_form must be one of {', '.join(TASK_LOSS_FORMS)}, got {form!r}")
    per_row = _row_mean(losses, target & counted) + _row_mean(losses, ~target & counted)
    return per_row.mean()
