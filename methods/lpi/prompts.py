"""LPI's low-rank (CP) decomposed multi-modal prompt and where its slices enter CLIP.

Section marks (§) name the topics of ``docs/methods/lpi.md``'s account of the reference code.

One :class:`DecomposedPrompt` per task (§3.1). Its five factors are

=================  =========  =============================================================
factor             shape      role
=================  =========  =============================================================
``layer``          L x r      A: one row per prompt slice, *shared by both modalities*
``vision_token``   P x r      Bv: token factor of the visual prompt
``text_token``     P x r      Bt: token factor of the textual prompt
``vision_channel`` Dv x r     Cv: channel factor of the visual prompt (Dv = vision width)
``text_channel``   Dt x r     Ct: channel factor of the textual prompt (Dt = text width)
=================  =========  =============================================================

and the prompts are rank-r CP tensors, *averaged* (not summed) over the rank::

    Pv[l, p, d] = (1/r) * sum_k A[l, k] * Bv[p, k] * Cv[d, k]      -> [L, P, Dv]
    Pt[l, p, d] = (1/r) * sum_k A[l, k] * Bt[p, k] * Ct[d, k]      -> [L, P, Dt]

Every factor starts from N(0, 0.5^2) (§3.1, [released]), which gives prompt entries of
std ~ 0.0625 for r = 4. On ViT-B/16 (L=9, P=16, r=4) one task owns
36 + 64 + 64 + 3,072 + 2,048 = 5,284 parameters (§7).

Placement (§2.1, :func:`encoder_prompts`): slice 0 is the input-level prompt (vision: P
tokens after CLS, after the positional embedding, before ``ln_pre``; text: the P positions after
SOT, which then receive positions 1..P). Slices 1..depth-1 are *added* to the hidden states at
the prompt positions before blocks 1..depth-1. ``depth = 1`` is the [released] behaviour (its
deep branch is guarded by ``layer_id < 0`` and never runs); ``depth > 1`` is the
intent (grounding uses depth 9). Slices that no block receives still enter the losses (§4.2, §4.3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.backbone import Prompts


class DecomposedPrompt(nn.Module):
    """The visual and textual prompts of one task as a rank-r CP decomposition (§3.1).

    Args:
        num_layers: L, the number of prompt slices (9 in LPI).
        length: P, prompt tokens per slice (16 in LPI).
        vision_width / text_width: Dv / Dt, the encoders' transformer widths.
        rank: r (4 in LPI).
        init_std: std of the N(0, std^2) initialisation of every factor (0.5 in LPI).
    """

    def __init__(self, num_layers: int, length: int, vision_width: int, text_width: int, rank: int,
                 init_std: float = 0.5):
        super().__init__()
        if min(num_layers, length, vision_width, text_width, rank) < 1:
            raise ValueError("num_layers, length, widths and rank must all be >= 1")
        self.rank = rank

        def factor(rows: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, rank) * init_std)

        # Drawn in this order from the global RNG, so a seed fixes every task's prompt.
        self.layer = factor(num_layers)  # A, shared across modalities: the only cross-modal tie
        self.vision_token = factor(length)
        self.text_token = factor(length)
        self.vision_channel = factor(vision_width)
        self.text_channel = factor(text_width)

    def _cp(self, token: Tensor, channel: Tensor) -> Tensor:
        # Mean over the rank ("/ r"), as the reference code does, not the usual CP sum.
        return torch.einsum("lk,pk,dk->lpd", self.layer, token, channel) / self.rank

    def vision(self) -> Tensor:
        """Pv, ``[L, P, Dv]``."""
        return self._cp(self.vision_token, self.vision_channel)

    def text(self) -> Tensor:
        """Pt, ``[L, P, Dt]``."""
        return self._cp(self.text_token, self.text_channel)

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(Pv [L, P, Dv], Pt [L, P, Dt])``."""
        return self.vision(), self.text()


def encoder_prompts(slices: Tensor, depth: int) -> Prompts:
    """The backbone :class:`~benchmark.backbone.Prompts` for one encoder (§2.1).

    Args:
        slices: ``[B|1, L, P, D]`` prompt slices (one task's, or one per sample after routing).
        depth: how many slices reach the encoder: slice 0 as input tokens, slices 1..depth-1
            added at the prompt positions before blocks 1..depth-1. ``depth = 1``: input-level
            only ([released]); the caller makes sure ``depth`` fits the encoder and ``L``.
    """
    if not 1 <= depth <= slices.shape[1]:
        raise ValueError(f"depth must be between 1 and the number of slices ({slices.shape[1]}), got {depth}")
    deep = {layer: slices[:, layer] for layer in range(1, depth)}
    return Prompts(tokens=slices[:, 0], deep=deep, deep_mode="add")
