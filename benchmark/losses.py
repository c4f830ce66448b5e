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
