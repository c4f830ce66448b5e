"""What a prompt method hands to the encoders.

Every prompt method (L2P, DualPrompt, S-Prompts, LPI, ...) reduces to a few places where
learned vectors enter a frozen transformer. They are described once here, as data, and the
adapter in :mod:`benchmark.backbone.adapter` implements them once, for both encoders.

Shapes use ``B`` for the batch, ``P`` for the number of prompt tokens, ``D`` for the width of
the encoder's transformer and ``Lp`` for a prefix length. A leading dimension of 1 broadcasts
over the batch (one prompt for every sample); ``B`` gives every sample its own prompt (what
instance-wise prompt selection produces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor


@dataclass
class Prompts:
    """Prompts for one encoder (vision or text).

    Attributes:
        tokens: ``[B|1, P, D]`` input prompt tokens.
            *Vision*: inserted right after the class token, after the positional embedding
            has been added (so they get no position) and before ``ln_pre``; VPT-shallow /
            S-Prompts / LPI placement. *Text*: placed in the ``P`` positions right after the
            start-of-text token, shifting the caption right (CoOp's "X X ... X caption"
            layout); they then receive the positional embeddings of those positions. A caption
            that no longer fits is cut so that its end-of-text token is kept.
        deep: ``{block index l: [B|1, P, D]}`` deep prompts, applied to the hidden states at
            the prompt positions (1..P) *before* block ``l`` runs. Needs ``tokens`` (the
            positions must exist) and ``l >= 1``.
        deep_mode: ``"add"`` adds the deep prompt to the hidden state at those positions
            (LPI's deep branch); ``"replace"`` overwrites them (VPT-deep).
        prefix: ``{block index l: (key_prefix, value_prefix)}``, each ``[B|1, Lp, D]``: prefix
            tuning inside the attention of block ``l``. The prefixes are concatenated to the
            block's keys and values *after* the input projection (as DualPrompt and
            CODA-Prompt do), so queries of every token can attend to them; they are not
            themselves outputs of the block.
    """

    tokens: Tensor | None = None
    deep: dict[int, Tensor] = field(default_factory=dict)
    deep_mode: Literal["add", "replace"] = "add"
    prefix: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    def is_empty(self) -> bool:
        return self.tokens is None and not self.deep and not self.prefix

    def validate(self, num_blocks: int, width: int) -> None:
        """Raise ``ValueError`` if the prompts cannot be applied to an encoder of this size."""
        if self.deep_mode not in ("add", "replace"):
            raise ValueError(f"deep_mode must be 'add' or 'replace', got {self.deep_mode!r}")
        if self.tokens is not None and (self.tokens.ndim != 3 or self.tokens.shape[-1] != width):
            raise ValueError(f"prompt tokens must be [B|1, P, {width}], got {tuple(self.tokens.shape)}")
        for layer, deep in self.deep.items():
            if not 1 <= layer < num_blocks:
                raise ValueError(f"deep prompt for block {layer}: blocks 1..{num_blocks - 1} take deep prompts")
            if self.tokens is None:
                raise ValueError("deep prompts need input prompt tokens: they act on the prompt positions")
            if deep.shape[-2:] != self.tokens.shape[-2:]:
                raise ValueError(
                    f"deep prompt for block {layer} is {tuple(deep.shape)}, expected [B|1, {self.num_tokens}, {width}]")
        for layer, (key, value) in self.prefix.items():
            if not 0 <= layer < num_blocks:
                raise ValueError(f"prefix for block {layer}: the encoder has blocks 0..{num_blocks - 1}")
            if key.shape != value.shape or key.ndim != 3 or key.shape[-1] != width:
                raise ValueError(f"prefix for block {layer} must be two [B|1, Lp, {width}] tensors")
