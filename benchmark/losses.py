"""The contrastive objective shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE (CLIP's loss) over a batch of matching pairs.

    With L2-normalised features and ``s = logit_scale``, ``logits = s * I @ T.T``; pair ``i``
    is the positive of row and column ``i``. The loss is the mean of the image->text and
    text->image cross-entropies: ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def info_nce_share(image_features: Tensor, text_features: Tensor, all_image_features: Tensor,
                   all_text_features: Tensor, logit_scale: Tensor | float, offset: int, total: int) -> Tensor:
    """One process's share of :func:`info_nce` over a batch split across processes (``--ddp``).

    This process holds pairs ``offset .. offset + b - 1`` of a batch of ``total`` pairs whose
    features, gathered from every process in order, are ``all_image_features`` /
    ``all_text_features``. Its rows are scored against every column (open_clip's
    ``ClipLoss(local_loss=True)``: labels shifted by ``offset``), and the cross-entropies are
    summed, not averaged, and divided by ``2 * total``. So the shares of all processes add up to
    ``info_nce`` of the whole batch, and so do their gradients once summed over processes.
    """
    image, text = image_features.float(), text_features.float()
    target = torch.arange(offset, offset + len(image), device=image.device)
    image_to_text = logit_scale * image @ all_text_features.float().T
    text_to_image = logit_scale * text @ all_image_features.float().T
    return (F.cross_entropy(image_to_text, target, reduction="sum")
            + F.cross_entropy(text_to_image, target, reduction="sum")) / (2 * total)
