"""One wrapper around an open_clip CLIP model with the prompt hook points every method shares.

:class:`ClipBackbone` re-runs the encoders' forward passes block by block so that prompts
(:class:`~benchmark.backbone.prompts.Prompts`) can enter at the documented places. With no
prompts the result equals open_clip's own ``encode_image`` / ``encode_text`` (the test suite
checks this), so a method that adds nothing gets exactly the pretrained model.

Blocks that receive no prefix are called as modules (``block(x, attn_mask=...)``), so anything
that wraps them (peft's LoRA layers, hooks) stays in effect. A block with a prefix runs its
attention here, through ``F.scaled_dot_product_attention``, with the block's own weights.

The text tower runs only as many positions as the batch needs (:class:`TokenTrimmer`): with
CLIP's causal attention mask and end-of-text pooling, the pooled feature of a caption depends
on the positions up to its end-of-text token only, so running the first ``L`` positions, ``L``
= the batch's last end-of-text position + 1 (plus the prompt tokens), gives the same features
and gradients as running all ``context_length`` (open_clip slices its causal mask the same way
for shorter inputs, ``open_clip/transformer.py``, ``MultimodalTransformer.forward``). The
floating-point sums differ in shape, so features agree to rounding (1e-6 in float32), not bit
for bit. ``encode_text`` trims CPU token ids itself (free); token ids already on a GPU are run
at the width they have, so that finding ``L`` never makes the device wait: the training batches
come trimmed on the host by the data loader (:mod:`benchmark.scenarios.streams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prompts import Prompts


class ClipBackbone(nn.Module):
    """An open_clip ``CLIP`` model (ViT image tower, transformer text tower) plus its
    preprocessing and tokenizer.

    Attributes:
        model: the open_clip model (its parameters are the backbone's parameters).
        spec: the name it was resolved from, e.g. ``"ViT-B-16:openai"``.
        preprocess_train / preprocess_eval: open_clip's image transforms for this model.
        tokenizer: open_clip's tokenizer for this model (returns ``[N, context_length]`` ids).
    """

    def __init__(self, model: nn.Module, preprocess_train, preprocess_eval, tokenizer, spec: str):
        super().__init__()
        self.model = model
        self.preprocess_train = preprocess_train
        self.preprocess_eval = preprocess_eval
        self.tokenizer = tokenizer
        self.spec = spec
        #: Run the text tower on the batch's longest caption only (exact math; False: all
        #: ``context_length`` positions, bit for bit what open_clip's ``encode_text`` computes).
        self.cut_text = True
        self._supports_prompts = self._check_standard_layout()

    # ------------------------------------------------------------------ sizes
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.embedding_dim)

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.image_size)

    def logit_scale(self) -> Tensor:
        """``exp(logit_scale)``, clamped at 100 as in CLIP's training."""
        return self.model.logit_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts)

    def token_trimmer(self) -> "TokenTrimmer":
        """The :class:`TokenTrimmer` for this text tower (one that keeps every position when
        trimming would not be exact: no causal mask, or pooling not at the end-of-text token;
        or when :attr:`cut_text` is off)."""
        model = self.model
        exact = (self.cut_text and self._supports_prompts and getattr(model, "attn_mask", None) is not None
                 and getattr(model, "text_pool_type", None) in ("argmax", "eos"))
        return TokenTrimmer(getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None), exact)

    def trim_tokens(self, text: Tensor) -> Tensor:
        """Token ids ``[B, context_length]`` cut to the batch's longest caption (see the module
        docstring); do it on the host, before the ids move to a GPU (finding the length there
        would make the host wait for the device)."""
        return self.token_trimmer()(text)

    # --------------------------------------------------------------- encoders
    def encode_image(self, images: Tensor, prompts: Prompts | None = None, normalize: bool = True) -> Tensor:
        """Image features ``[B, embed_dim]`` (L2-normalised unless ``normalize=False``)."""
        prompts = prompts or Prompts()
        if not self._supports_prompts:
            if not prompts.is_empty():
                raise ValueError(f"backbone {self.spec} has no standard ViT/text-transformer layout; "
                                 "prompt methods need an open_clip CLIP model with a ViT image tower")
            return self.model.encode_image(images, normalize=normalize)
        visual = self.model.visual
        prompts.validate(len(self.vision_blocks), self.vision_width)

        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid*grid, width]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        # Prompts go after the positional embedding (they carry no position) and before ln_pre.
        x = self._insert_tokens(x, prompts.tokens)
        x = visual.ln_pre(x)
        x = self._run_blocks(visual.transformer, x, None, prompts)
        if prompts.num_tokens:  # pooling must not see the prompt positions
            x = torch.cat([x[:, :1], x[:, 1 + prompts.num_tokens:]], dim=1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, text: Tensor, prompts: Prompts | None = None, normalize: bool = True) -> Tensor:
        """Text features ``[B, embed_dim]`` from token ids ``[B, context_length]`` (or fewer
        positions, as :meth:`trim_tokens` cuts them)."""
        prompts = prompts or Prompts()
        if not self._supports_prompts:
            if not prompts.is_empty():
                raise ValueError(f"backbone {self.spec} has no standard text-transformer layout for prompts")
            return self.model.encode_text(_pad_to(text, self.context_length), normalize=normalize)
        model = self.model
        prompts.validate(len(self.text_blocks), self.text_width)
        cast_dtype = model.transformer.get_cast_dtype()

        n_prompt = prompts.num_tokens
        if text.device.type == "cpu" and text.shape[1] >= self.context_length:
            # Full-width ids on the host: cut them here (free). Narrower ids were cut already (the
            # training collate, the evaluation loop), and ids on a GPU run at the width they have.
            text = self.trim_tokens(text)
        if not self.token_trimmer().exact:
            text = _pad_to(text, self.context_length)  # ids trimmed elsewhere: this tower runs all positions
        pool_ids = text
        if n_prompt:
            if text.shape[1] + n_prompt <= self.context_length:  # a trimmed batch: room without cutting
                pool_ids = torch.cat([text[:, :1], text.new_zeros(text.shape[0], n_prompt), text[:, 1:]], dim=1)
            else:
                text, pool_ids = _make_room_for_prompts(_pad_to(text, self.context_length), n_prompt,
                                                        model.text_pool_type, getattr(model, "text_eos_id", None))
        x = model.token_embedding(text).to(cast_dtype)
        x = self._insert_tokens(x, prompts.tokens)
        length = x.shape[1]  # context_length, or fewer positions for a trimmed batch
        x = x + model.positional_embedding[:length].to(cast_dtype)
        attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        x = self._run_blocks(model.transformer, x, attn_mask, prompts)
        x = model.ln_final(x)
        x = _text_pool(x, pool_ids, model.text_pool_type, getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    # ---------------------------------------------------------------- helpers
    def _check_standard_layout(self) -> bool:
        from open_clip.transformer import VisionTransformer

        model = self.model
        return (isinstance(getattr(model, "visual", None), VisionTransformer)
                and hasattr(model, "token_embedding") and hasattr(model, "transformer")
                and getattr(model.visual, "attn_pool", None) is None)

    @staticmethod
    def _insert_tokens(x: Tensor, tokens: Tensor | None) -> Tensor:
        if tokens is None:
            return x
        # No limit on the count: vision tokens carry their positions already, and the text side
        # was cut to make room (``_make_room_for_prompts``).
        tokens = tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        # Vision: after CLS. Text: after SOT (the caption was shifted right to make room).
        return torch.cat([x[:, :1], tokens, x[:, 1:]], dim=1)

    def _run_blocks(self, transformer: nn.Module, x: Tensor, attn_mask: Tensor | None, prompts: Prompts) -> Tensor:
        if not getattr(transformer, "batch_first", True):
            x = x.transpose(0, 1)
        n_prompt = prompts.num_tokens
        for index, block in enumerate(transformer.resblocks):
            deep = prompts.deep.get(index)
            if deep is not None:
                deep = deep.to(x.dtype).expand(x.shape[0], -1, -1)
                at_prompts = x[:, 1:1 + n_prompt] + deep if prompts.deep_mode == "add" else deep
                x = torch.cat([x[:, :1], at_prompts, x[:, 1 + n_prompt:]], dim=1)
            if index in prompts.prefix:
                key, value = prompts.prefix[index]
                x = block_with_prefix(block, x, attn_mask, key, value)
            else:
                x = block(x, attn_mask=attn_mask)
        if not getattr(transformer, "batch_first", True):
            x = x.transpose(0, 1)
        return x


def block_with_prefix(block: nn.Module, x: Tensor, attn_mask: Tensor | None, key_prefix: Tensor,
                      value_prefix: Tensor) -> Tensor:
    """Run an open_clip ``ResidualAttentionBlock`` with key/value prefixes in its attention.

    Same computation as the block's own forward (pre-norm attention and MLP, LayerScale),
    except that ``[key_prefix; K]`` and ``[value_prefix; V]`` replace ``K`` and ``V``. The
    prefixes live in the projected key/value space; the attention mask (the text tower's causal
    mask) is widened so that every query may see every prefix position.
    """
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise TypeError(f"prefix tuning needs an nn.MultiheadAttention with packed qkv, got {type(attn).__name__}")
    hidden = block.ln_1(x)
    batch, length, width = hidden.shape
    heads = attn.num_heads
    query, key, value = F.linear(hidden, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    key = torch.cat([key_prefix.to(key.dtype).expand(batch, -1, -1), key], dim=1)
    value = torch.cat([value_prefix.to(value.dtype).expand(batch, -1, -1), value], dim=1)

    def heads_first(t: Tensor) -> Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(query.dtype)
        mask = torch.cat([mask.new_zeros(length, key_prefix.shape[1]), mask], dim=1)
    out = F.scaled_dot_product_attention(heads_first(query), heads_first(key), heads_first(value), attn_mask=mask)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _make_room_for_prompts(text: Tensor, n_prompt: int, pool_type: str = "argmax",
                           eos_token_id: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut token ids so that ``n_prompt`` prompt tokens fit after SOT, keeping each EOT.

    Returns the ids to embed (``context_length - n_prompt`` long) and the ids to pool with
    (``context_length`` long, zeros at the prompt positions, so ``argmax`` still finds EOT).
    The EOT is the token the text pooling looks for: the first ``eos_token_id`` for
    ``pool_type='eos'``, else the highest id (CLIP's tokenizer).
    """
    keep = text.shape[1] - n_prompt
    if keep < 2:
        raise ValueError(f"{n_prompt} prompt tokens leave no room for a caption in {text.shape[1]} positions")
    ids = text[:, :keep].clone()
    if pool_type == "eos":
        eot_pos = (text == eos_token_id).int().argmax(dim=-1)
    else:
        eot_pos = text.argmax(dim=-1)
    # A caption whose tail is dropped keeps its EOT at the last kept position. Written for every
    # row with torch.where (no `if cut.any()`, which would make the host wait for the device).
    cut = eot_pos >= keep
    eot = text.gather(1, eot_pos[:, None]).squeeze(1)
    ids[:, keep - 1] = torch.where(cut, eot, ids[:, keep - 1])
    pool_ids = torch.cat([ids[:, :1], ids.new_zeros(ids.shape[0], n_prompt), ids[:, 1:]], dim=1)
    return ids, pool_ids


def _text_pool(x: Tensor, ids: Tensor, pool_type: str, eos_token_id: int | None) -> Tensor:
    from open_clip.transformer import text_global_pool

    return text_global_pool(x, ids, pool_type=pool_type, eos_token_id=eos_token_id)


@dataclass(frozen=True)
class TokenTrimmer:
    """Cuts token ids ``[B, W]`` to ``[B, L]``, ``L`` = the last pooled position of the batch + 1.

    The pooled position is open_clip's (``text_global_pool``): the highest id for ``argmax``
    pooling (CLIP's end-of-text token), the first ``eos_id`` for ``eos``. Only the positions
    after every caption's pooled token are dropped, so a causal text tower gives the same
    features (see :mod:`benchmark.backbone.adapter`). ``exact=False`` (a tower where that does
    not hold) keeps the ids as they are. Plain data, so data-loader workers can take it.
    """

    pool_type: str
    eos_id: int | None
    exact: bool = True

    def length(self, text: Tensor) -> int:
        """Positions the batch needs (its width when trimming is not exact or the batch is empty)."""
        if not self.exact or text.shape[0] == 0:
            return int(text.shape[1])
        pooled = (text == self.eos_id).int().argmax(dim=-1) if self.pool_type == "eos" else text.argmax(dim=-1)
        return int(pooled.max()) + 1

    def __call__(self, text: Tensor) -> Tensor:
        length = self.length(text)
        return text if length == text.shape[1] else text[:, :length]


def _pad_to(text: Tensor, width: int) -> Tensor:
    """Token ids padded with zeros (open_clip's padding id) on the right to ``width`` positions."""
    return text if text.shape[1] >= width else F.pad(text, (0, width - text.shape[1]))
