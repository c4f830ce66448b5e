"""LPI's multi-modal correlation ("interaction") module, adapted to CLIP retrieval (§3.2).

The paper's abstract names "multi-modal correlation modules for corresponding Transformer
layers". [released] The retrieval code has none; only the grounding code (GLIP) does. This is
our adaptation of grounding's module to CLIP: per task, a visual->text and a text->visual linear map (with bias) for every
encoder block, all blocks' maps stored together as one rank-r CP tensor over
(block, input + 1, output)::

    M[l] = (1/r) * sum_k a[l, k] * u[:, k] (outer) w[:, k]        u: [in + 1, r], w: [out, r]
    W[l] = M[l][:in]  (in x out),   b[l] = M[l][in]  (out)

plus two LayerNorms (vision width, text width) shared by the blocks of the task. In block
``l`` (1 <= l < depth), after the deep prompt slice ``l`` has been added at the prompt
positions and before the block runs, the prompt-position states are mixed and normalised::

    v' = LN_v(0.9 * v + 0.1 * (t W_t2v[l] + b_t2v[l]))
    t' = LN_t(0.9 * t + 0.1 * (v W_v2t[l] + b_v2t[l]))

**Our adaptation, forced by retrieval.** In grounding, ``v`` and ``t`` are the hidden states of
the *paired* image and caption, which a fusion model sees together. A retrieval model must
embed every image and every caption on its own (the gallery is encoded once, without the
query), so the cross-modal input here is the other modality's *prompt slice* ``l`` of the same
task (what the other encoder adds at its prompt positions in block ``l``), while the modality's
own input is its data-dependent hidden state. The mixing, the 0.9/0.1 weights, the CP maps and
the LayerNorms follow grounding (``grounding/.../modeling_bert.py``, ``InteractModule``).

Consequence, stated plainly: the cross term ``Pt[l] W_t2v[l] + b_t2v[l]`` depends on the task's
parameters only, not on the image or caption being encoded. It is one learned constant
``[P, D]`` per task and block, so ``v' = LN_v(0.9 v + c_l)``: a learned offset before a learned
LayerNorm. **No information passes between an image and a caption**; the two modalities are
tied only through their shared parameters. ``mix = 0`` (``interaction_mix=0``) is the control:
``v' = LN_v(v)``, LayerNorm only, without the maps, so a gain of the module over it is the
gain of the constant offsets.

On ViT-B/16 (12 blocks, rank 4) one task's module has v->t 48 + 3,076 + 2,048, t->v
48 + 2,052 + 3,072 and LayerNorms 2,560 parameters: 12,904 (§7).

The backbone adapter has no per-block hook on prompt-position states, so
:func:`prompt_state_hooks` installs forward pre-hooks on the encoder blocks for the duration of
one encoder call and removes them afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CPLinearMaps(nn.Module):
    """One linear map ``in -> out`` (with bias) per block, stored as a rank-r CP tensor.

    Factors (all U(-1/sqrt(r), 1/sqrt(r)), what grounding's ``kaiming_uniform_(a=sqrt(5))`` gives
    on an ``[n, r]`` tensor): ``layer`` ``[num_layers, r]``, ``inputs`` ``[in + 1, r]`` (the last row
    makes the bias), ``outputs`` ``[out, r]``.
    """

    def __init__(self, num_layers: int, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        bound = 1.0 / math.sqrt(rank)
        self.rank = rank
        self.layer = nn.Parameter(torch.empty(num_layers, rank).uniform_(-bound, bound))
        self.inputs = nn.Parameter(torch.empty(in_dim + 1, rank).uniform_(-bound, bound))
        self.outputs = nn.Parameter(torch.empty(out_dim, rank).uniform_(-bound, bound))

    def weight(self, layer: int) -> Tensor:
        """W[layer], ``[in, out]`` (materialised; for inspection and tests)."""
        return torch.einsum("k,ik,ok->io", self.layer[layer], self.inputs[:-1], self.outputs) / self.rank

    def bias(self, layer: int) -> Tensor:
        """b[layer], ``[out]``."""
        return torch.einsum("k,k,ok->o", self.layer[layer], self.inputs[-1], self.outputs) / self.rank

    def forward(self, x: Tensor, layer: int) -> Tensor:
        """``x @ W[layer] + b[layer]`` for ``x`` ``[..., in]``, without materialising ``W``."""
        scaled = (x @ self.inputs[:-1]) * self.layer[layer]  # through the rank-r bottleneck
        return scaled @ self.outputs.T / self.rank + self.bias(layer)


def mix_states(states: Tensor, cross: Tensor, norm_weight: Tensor, norm_bias: Tensor, mix: float,
               eps: float = 1e-5) -> Tensor:
    """``LN((1 - mix) * states + mix * cross)`` with the given LayerNorm affine.

    ``norm_weight`` / ``norm_bias`` broadcast against ``states`` (``[D]`` for one task, ``[B, 1, D]``
    when each sample uses its own task's LayerNorm). Computed in float32.
    """
    mixed = (1.0 - mix) * states.float() + mix * cross.float()
    return F.layer_norm(mixed, mixed.shape[-1:], eps=eps) * norm_weight.float() + norm_bias.float()


class InteractionModule(nn.Module):
    """One task's cross-modal maps for every block plus its two LayerNorms (§3.2 [REC]).

    Args:
        num_layers: blocks covered by the CP layer factor (the encoders' block count, 12 on
            ViT-B/16, as grounding's 12-layer mode).
        vision_width / text_width: the encoders' widths.
        rank: CP rank of the maps (4 in LPI).
        mix: weight of the cross-modal term (0.1 in LPI; the own state keeps ``1 - mix``).
            ``mix = 0`` is the control ablation: LayerNorm only, and no cross-modal maps are
            allocated (they could not receive a gradient).
    """

    def __init__(self, num_layers: int, vision_width: int, text_width: int, rank: int, mix: float = 0.1):
        super().__init__()
        self.mix = mix
        self.vision_to_text = CPLinearMaps(num_layers, vision_width, text_width, rank) if mix > 0 else None
        self.text_to_vision = CPLinearMaps(num_layers, text_width, vision_width, rank) if mix > 0 else None
        self.vision_norm = nn.LayerNorm(vision_width)
        self.text_norm = nn.LayerNorm(text_width)

    def cross_to_vision(self, text_source: Tensor, layer: int) -> Tensor:
        """``t W_t2v[layer] + b_t2v[layer]``; a zero scalar in the LayerNorm-only control."""
        if self.text_to_vision is None:
            return text_source.new_zeros(())
        return self.text_to_vision(text_source, layer)

    def cross_to_text(self, vision_source: Tensor, layer: int) -> Tensor:
        """``v W_v2t[layer] + b_v2t[layer]``; a zero scalar in the LayerNorm-only control."""
        if self.vision_to_text is None:
            return vision_source.new_zeros(())
        return self.vision_to_text(vision_source, layer)

    def mix_vision(self, vision_states: Tensor, text_source: Tensor, layer: int) -> Tensor:
        """v' = LN_v((1-mix) v + mix (t W_t2v[layer] + b_t2v[layer]))."""
        return mix_states(vision_states, self.cross_to_vision(text_source, layer), self.vision_norm.weight,
                          self.vision_norm.bias, self.mix, self.vision_norm.eps)

    def mix_text(self, text_states: Tensor, vision_source: Tensor, layer: int) -> Tensor:
        """t' = LN_t((1-mix) t + mix (v W_v2t[layer] + b_v2t[layer]))."""
        return mix_states(text_states, self.cross_to_text(vision_source, layer), self.text_norm.weight,
                          self.text_norm.bias, self.mix, self.text_norm.eps)


@contextlib.contextmanager
def prompt_state_hooks(blocks: nn.ModuleList, transforms: dict[int, Callable[[Tensor], Tensor]], num_prompts: int,
                       batch_first: bool = True) -> Iterator[None]:
    """Within the block, replace the prompt-position states (positions 1..P) entering block ``l``
    by ``transforms[l](states)`` (``states``: ``[B, P, D]``).

    Forward pre-hooks run after the adapter has added the deep prompt of block ``l`` and right
    before the block itself, which is the order of §3.2 (add slice, read, mix, write back,
    run the block). They are removed on exit, even on error, so the shared backbone is left as
    it was found.
    """

    def make_hook(transform: Callable[[Tensor], Tensor]):
        def hook(module, args, kwargs):
            x = args[0]
            if not batch_first:  # [N, B, D] -> [B, N, D]
                x = x.transpose(0, 1)
            states = transform(x[:, 1:1 + num_prompts]).to(x.dtype)
            x = torch.cat([x[:, :1], states, x[:, 1 + num_prompts:]], dim=1)
            if not batch_first:
                x = x.transpose(0, 1)
            return (x, *args[1:]), kwargs

        return hook

    handles = []
    try:
        for index, transform in transforms.items():
            handles.append(blocks[index].register_forward_pre_hook(make_hook(transform), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
