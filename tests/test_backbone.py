"""Tests for benchmark.backbone: the prompt-aware CLIP adapter and backbone name resolution.

Everything runs on tiny randomly initialised models: the shipped ``clvl-tiny`` config and a
few even smaller ``open_clip.CLIP`` variants built here (other pooling types, LayerScale,
a linear text projection, ``eos`` text pooling).
"""

from __future__ import annotations

import contextlib
import json
import math

import open_clip
import pytest
import torch

from benchmark.backbone import ClipBackbone, Prompts, load_backbone, register_weight_recipe
from benchmark.backbone import resolve
from benchmark.backbone.adapter import block_with_prefix
from benchmark.errors import DataError, RegistryError

TINY_CONFIG = json.loads((resolve.CONFIG_DIR / "clvl-tiny.json").read_text())

# Even smaller CLIPs, for variants the shipped config does not cover.
SMALL_VISION = dict(image_size=16, patch_size=4, width=32, layers=3, head_width=16)
SMALL_TEXT = dict(context_length=12, vocab_size=64, width=32, heads=2, layers=3)
VARIANTS = {
    "avg-pool+layerscale": (dict(pool_type="avg", ls_init_value=0.3), dict(ls_init_value=0.3)),
    "ln-after-pool+no-ln-pre+eos+linear-proj": (dict(final_ln_after_pool=True, no_ln_pre=True),
                                               dict(pool_type="eos", eos_id=2, proj_bias=True)),
    "quick-gelu+last-pool": (dict(), dict(pool_type="last")),
}


def small_clip(variant: str, seed: int = 0) -> ClipBackbone:
    vision, text = VARIANTS[variant]
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=24, vision_cfg={**SMALL_VISION, **vision}, text_cfg={**SMALL_TEXT, **text},
                           quick_gelu="quick-gelu" in variant)
    return ClipBackbone(model, None, None, None, spec=variant).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ClipBackbone:
    """``clvl-tiny`` with random weights, in eval mode. Tests must not modify it."""
    torch.manual_seed(0)
    return load_backbone("clvl-tiny", cache_dir=tmp_path_factory.mktemp("cache")).eval()


def make_images(bb: ClipBackbone, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *bb.image_size, generator=generator)


def text_specials(bb: ClipBackbone) -> tuple[int, int, range]:
    """``(sot, eot, word ids)``; ``eot`` is the token the text pooling looks for."""
    model = bb.model
    if model.text_pool_type == "eos":
        return 1, model.text_eos_id, range(3, model.vocab_size)
    # CLIP's tokenizer: SOT and EOT are the two highest ids
    return model.vocab_size - 2, model.vocab_size - 1, range(1, model.vocab_size - 2)


def make_captions(bb: ClipBackbone, num_words: list[int], seed: int = 0) -> torch.Tensor:
    """Token ids ``[N, context_length]``: SOT, random words, EOT, zero padding. A caption that is
    too long is truncated with its EOT at the last position, as open_clip's tokenizer does."""
    sot, eot, word_ids = text_specials(bb)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(num_words), bb.context_length, dtype=torch.long)
    for row, n in enumerate(num_words):
        words = torch.randint(word_ids.start, word_ids.stop, (n,), generator=generator).tolist()
        if bb.model.text_pool_type == "eos" and words:
            words[0] = bb.model.vocab_size - 1  # the highest id is a word, not the EOS
        seq = ([sot] + words + [eot])[:bb.context_length]
        seq[-1] = eot
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Capture:
    """Records what a module receives (forward pre-hook) or returns (forward hook)."""

    def __init__(self, module: torch.nn.Module, output: bool = False):
        self.value = None
        if output:
            self.handle = module.register_forward_hook(lambda mod, args, out: self._set(out))
        else:
            self.handle = module.register_forward_pre_hook(lambda mod, args: self._set(args[0]))

    def _set(self, value):
        self.value = value.detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@contextlib.contextmanager
def full_width(bb: ClipBackbone):
    """The text tower at all ``context_length`` positions (``cut_text`` off), as open_clip runs it."""
    bb.cut_text = False
    try:
        yield bb
    finally:
        bb.cut_text = True


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


# ------------------------------------------------------------------ 1. no prompts = open_clip
@pytest.mark.parametrize("normalize", [True, False])
def test_no_prompts_equals_open_clip_tiny(tiny, normalize):
    """Without prompts the adapter gives open_clip's own features, bit for bit (the text tower
    at full width; cut to the longest caption, to float rounding)."""
    images = make_images(tiny, 3)
    text = tiny.tokenize(["a photo of a dog", "two cats on a red sofa", "x"])
    with torch.no_grad():
        exact(tiny.encode_image(images, normalize=normalize), tiny.model.encode_image(images, normalize=normalize))
        with full_width(tiny):
            exact(tiny.encode_text(text, normalize=normalize), tiny.model.encode_text(text, normalize=normalize))
        torch.testing.assert_close(tiny.encode_text(text, normalize=normalize),
                                   tiny.model.encode_text(text, normalize=normalize), rtol=1e-5, atol=1e-6)
        exact(tiny.encode_image(images, Prompts(), normalize=normalize),
              tiny.model.encode_image(images, normalize=normalize))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_prompts_equals_open_clip_variants(variant, normalize):
    """Same exactness for other pooling types, LayerScale, QuickGELU and a linear text projection."""
    bb = small_clip(variant)
    images = make_images(bb, 2)
    text = make_captions(bb, [3, 7])
    with torch.no_grad():
        exact(bb.encode_image(images, normalize=normalize), bb.model.encode_image(images, normalize=normalize))
        with full_width(bb):
            exact(bb.encode_text(text, normalize=normalize), bb.model.encode_text(text, normalize=normalize))
        torch.testing.assert_close(bb.encode_text(text, normalize=normalize),
                                   bb.model.encode_text(text, normalize=normalize), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 2. prefix attention
def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


def reference_block(block, x, causal: bool, key_prefix, value_prefix):
    """A pre-norm residual block with prefix attention, written out head by head:
    ``softmax(Q [Kp; K]^T / sqrt(d) + mask) [Vp; V]``, prefixes visible to every query."""
    attn = block.attn
    batch, length, width = x.shape
    heads, head_dim, n_prefix = attn.num_heads, width // attn.num_heads, key_prefix.shape[1]
    w_q, w_k, w_v = attn.in_proj_weight.split(width, dim=0)
    b_q, b_k, b_v = attn.in_proj_bias.split(width)
    h = block.ln_1(x)
    q = h @ w_q.T + b_q
    k = torch.cat([key_prefix.expand(batch, -1, -1), h @ w_k.T + b_k], dim=1)
    v = torch.cat([value_prefix.expand(batch, -1, -1), h @ w_v.T + b_v], dim=1)
    mask = torch.zeros(length, n_prefix + length)
    if causal:
        mask[:, n_prefix:] = causal_mask(length)
    out = torch.empty_like(q)
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim) + mask
        out[..., cols] = scores.softmax(dim=-1) @ v[..., cols]
    x = x + block.ls_1(out @ attn.out_proj.weight.T + attn.out_proj.bias)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_cases(tiny):
    """(name, block, input, attention mask) for a vision block and a causal text block."""
    return [
        ("vision", tiny.vision_blocks[1], randn(2, 17, tiny.vision_width, seed=1), None),
        ("text", tiny.text_blocks[1], randn(2, tiny.context_length, tiny.text_width, seed=2), tiny.model.attn_mask),
        ("vision-layerscale", small_clip("avg-pool+layerscale").vision_blocks[0], randn(2, 17, 32, seed=3), None),
    ]


def test_text_attn_mask_is_causal(tiny):
    """The reference below assumes open_clip's text mask is the usual causal -inf mask."""
    exact(tiny.model.attn_mask, causal_mask(tiny.context_length))


def test_empty_prefix_equals_block_forward(tiny):
    """With Lp = 0 the re-implemented attention reproduces the block's own forward."""
    with torch.no_grad():
        for name, block, x, mask in block_cases(tiny):
            empty = x.new_zeros(1, 0, x.shape[-1])
            expected = block(x, attn_mask=mask)
            close(block_with_prefix(block, x, mask, empty, empty), expected)
            # the hand-written reference agrees too, so it can judge the non-empty case
            close(reference_block(block, x, mask is not None, empty, empty), expected, atol=1e-5)


@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_prefix_attention_matches_hand_computation(tiny, prefix_batch):
    """Key/value prefixes join K and V after the projection, unmasked, shared or per sample."""
    with torch.no_grad():
        for name, block, x, mask in block_cases(tiny):
            width = x.shape[-1]
            key, value = randn(prefix_batch, 3, width, seed=4), randn(prefix_batch, 3, width, seed=5)
            got = block_with_prefix(block, x, mask, key, value)
            close(got, reference_block(block, x, mask is not None, key, value), atol=1e-5)
            assert differs(got, block(x, attn_mask=mask)), name


def test_empty_prefix_in_encoders_changes_nothing(tiny):
    """An empty prefix on some block gives the no-prompt features."""
    images, text = make_images(tiny, 2), tiny.tokenize(["a dog", "a cat"])
    with torch.no_grad():
        ev, et = torch.zeros(1, 0, tiny.vision_width), torch.zeros(1, 0, tiny.text_width)
        close(tiny.encode_image(images, Prompts(prefix={1: (ev, ev)})), tiny.encode_image(images))
        close(tiny.encode_text(text, Prompts(prefix={2: (et, et)})), tiny.encode_text(text))


# ------------------------------------------------------------------ 3. vision prompt placement
def test_vision_prompts_enter_after_cls_without_position(tiny):
    """ln_pre sees [CLS + pos0, prompts (no position), patches + pos], length 1 + P + grid^2."""
    visual, P, B = tiny.visual, 4, 2
    images, tokens = make_images(tiny, B), randn(1, P, tiny.vision_width, seed=1)
    with torch.no_grad(), Capture(visual.ln_pre) as seen:
        prompted = tiny.encode_image(images, Prompts(tokens=tokens))
        patches = visual.conv1(images).flatten(2).transpose(1, 2)
        pos = visual.positional_embedding
        cls = (visual.class_embedding + pos[0]).expand(B, 1, -1)
        expected = torch.cat([cls, tokens.expand(B, -1, -1), patches + pos[1:]], dim=1)
        grid = visual.grid_size[0] * visual.grid_size[1]
        assert seen.value.shape == (B, 1 + P + grid, tiny.vision_width)
        close(seen.value, expected)
        assert differs(prompted, tiny.encode_image(images))


@pytest.mark.parametrize("which", ["tiny", "avg-pool+layerscale"])
def test_vision_pooling_ignores_prompt_positions(tiny, which):
    """The pooled feature is computed from CLS and patches only (matters for avg pooling)."""
    bb = tiny if which == "tiny" else small_clip(which)
    visual, P = bb.visual, 3
    images, tokens = make_images(bb, 2), randn(1, P, bb.vision_width, seed=1)
    with torch.no_grad(), Capture(bb.vision_blocks[-1], output=True) as last:
        features = bb.encode_image(images, Prompts(tokens=tokens), normalize=False)
        hidden = last.value
        if visual.pool_type == "avg":
            pooled = visual.ln_post(hidden[:, 1 + P:]).mean(dim=1)
        else:
            pooled = visual.ln_post(hidden[:, 0])
        close(features, pooled @ visual.proj, atol=1e-5)


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_deep_prompt_add_and_replace_before_block(tiny, mode):
    """Before block l, positions 1..P become h + deep ('add') or deep ('replace'); others untouched."""
    P, layer = 3, 2
    images = make_images(tiny, 2)
    tokens, deep = randn(1, P, tiny.vision_width, seed=1), randn(1, P, tiny.vision_width, seed=2)
    with torch.no_grad(), Capture(tiny.vision_blocks[layer - 1], output=True) as before, \
            Capture(tiny.vision_blocks[layer]) as entering:
        tiny.encode_image(images, Prompts(tokens=tokens, deep={layer: deep}, deep_mode=mode))
    h, x = before.value, entering.value
    expected = h[:, 1:1 + P] + deep if mode == "add" else deep.expand(2, -1, -1)
    exact(x[:, 1:1 + P], expected)
    exact(x[:, :1], h[:, :1])
    exact(x[:, 1 + P:], h[:, 1 + P:])


def test_deep_prompt_acts_only_where_present(tiny):
    """A deep prompt for block 2 changes the output but not blocks 0-1; a zero 'add' prompt is a no-op."""
    P, width = 3, tiny.vision_width
    images, tokens, deep = make_images(tiny, 2), randn(1, P, width, seed=1), randn(1, P, width, seed=2)
    with torch.no_grad():
        with Capture(tiny.vision_blocks[1]) as plain_in:
            plain = tiny.encode_image(images, Prompts(tokens=tokens))
        with Capture(tiny.vision_blocks[1]) as deep_in:
            with_deep = tiny.encode_image(images, Prompts(tokens=tokens, deep={2: deep}))
        zero = tiny.encode_image(images, Prompts(tokens=tokens, deep={2: torch.zeros(1, P, width)}))
    assert differs(with_deep, plain)
    exact(deep_in.value, plain_in.value)
    exact(zero, plain)


@pytest.mark.parametrize("layer", [0, 3, 10, -1])
def test_deep_prompt_block_out_of_range_rejected(tiny, layer):
    """Deep prompts go to blocks 1..num_blocks-1 only (3 blocks in clvl-tiny)."""
    tokens = torch.zeros(1, 2, tiny.vision_width)
    with pytest.raises(ValueError, match="deep prompt"):
        tiny.encode_image(make_images(tiny, 1), Prompts(tokens=tokens, deep={layer: tokens}))


def test_deep_prompts_need_tokens_and_matching_shape(tiny):
    """Deep prompts without input tokens, or with another P, are rejected in both encoders."""
    images, text = make_images(tiny, 1), tiny.tokenize(["a dog"])
    with pytest.raises(ValueError, match="need input prompt tokens"):
        tiny.encode_image(images, Prompts(deep={1: torch.zeros(1, 2, tiny.vision_width)}))
    with pytest.raises(ValueError, match="need input prompt tokens"):
        tiny.encode_text(text, Prompts(deep={1: torch.zeros(1, 2, tiny.text_width)}))
    with pytest.raises(ValueError):
        tiny.encode_image(images, Prompts(tokens=torch.zeros(1, 2, tiny.vision_width),
                                          deep={1: torch.zeros(1, 3, tiny.vision_width)}))


# ------------------------------------------------------------------ 4. text prompt placement
def test_text_prompts_follow_sot_with_positions(tiny):
    """The caption shifts right by P after SOT; prompts get positional embeddings 1..P."""
    P, model = 3, tiny.model
    text = tiny.tokenize(["a photo of a dog", "a red car parked outside"])
    prompts = randn(1, P, tiny.text_width, seed=1)
    keep = tiny.context_length - P
    with (torch.no_grad(), full_width(tiny), Capture(model.token_embedding) as ids,
          Capture(tiny.text_blocks[0]) as entering):
        tiny.encode_text(text, Prompts(tokens=prompts))
    with torch.no_grad():
        embedded = model.token_embedding(text)
        expected = torch.cat([embedded[:, :1], prompts.expand(2, -1, -1), embedded[:, 1:keep]], dim=1)
        expected = expected + model.positional_embedding
    exact(ids.value, text[:, :keep])
    close(entering.value, expected)
    close(entering.value[:, 1:1 + P], (prompts + model.positional_embedding[1:1 + P]).expand(2, -1, -1))


def test_text_pools_at_eot_moved_by_p(tiny):
    """The pooled position is the caption's EOT, P positions further right."""
    P, model = 3, tiny.model
    text, prompts = tiny.tokenize(["a photo of a dog", "a cat"]), randn(1, P, tiny.text_width, seed=1)
    rows, eot = torch.arange(2), text.argmax(dim=-1)
    with torch.no_grad(), Capture(model.ln_final, output=True) as final:
        features = tiny.encode_text(text, Prompts(tokens=prompts), normalize=False)
    close(features, final.value[rows, eot + P] @ model.text_projection, atol=1e-5)
    assert differs(features, final.value[rows, eot] @ model.text_projection)


@pytest.mark.parametrize("which", ["tiny", "ln-after-pool+no-ln-pre+eos+linear-proj"])
def test_text_long_caption_keeps_eot(tiny, which):
    """A caption whose EOT would be cut keeps an EOT at the last position, which is pooled;
    one that still fits is only shortened at the padding end."""
    bb = tiny if which == "tiny" else small_clip(which)
    model, P = bb.model, 3
    ctx = bb.context_length
    keep = ctx - P
    _, eot, _ = text_specials(bb)
    # EOT at keep - 1 (still fits), at keep (cut by one), and a truncated caption (EOT at ctx - 1)
    text = make_captions(bb, [keep - 2, keep - 1, 3 * ctx])
    assert (text[:, keep - 1:] == eot).nonzero()[:, 0].tolist() == [0, 1, 2]
    prompts = randn(1, P, bb.text_width, seed=1)
    with torch.no_grad(), Capture(model.token_embedding) as ids, Capture(bb.text_blocks[0]) as entering, \
            Capture(model.ln_final, output=True) as final:
        features = bb.encode_text(text, Prompts(tokens=prompts), normalize=False)
    exact(ids.value[0], text[0, :keep])
    exact(ids.value[1:, :keep - 1], text[1:, :keep - 1])
    assert ids.value[1:, keep - 1].tolist() == [eot, eot]
    last = model.token_embedding.weight[eot] + model.positional_embedding[-1]
    close(entering.value[:, -1], last.expand(3, -1))
    projection = model.text_projection
    pooled = final.value[:, -1]
    expected = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
    close(features, expected, atol=1e-5)


# ------------------------------------------------------------------ 5. batch broadcasting
def full_prompts(width: int, batch: int, seed: int) -> Prompts:
    """Tokens, a deep prompt (block 1) and a prefix (block 2), each [batch, ...]."""
    return Prompts(tokens=randn(batch, 3, width, seed=seed), deep={1: randn(batch, 3, width, seed=seed + 1)},
                   prefix={2: (randn(batch, 2, width, seed=seed + 2), randn(batch, 2, width, seed=seed + 3))})


def repeat(prompts: Prompts, batch: int) -> Prompts:
    rep = lambda t: t.repeat(batch, 1, 1)  # noqa: E731
    return Prompts(tokens=rep(prompts.tokens), deep={k: rep(v) for k, v in prompts.deep.items()},
                   deep_mode=prompts.deep_mode,
                   prefix={k: (rep(key), rep(value)) for k, (key, value) in prompts.prefix.items()})


def select(prompts: Prompts, i: int) -> Prompts:
    one = lambda t: t[i:i + 1]  # noqa: E731
    return Prompts(tokens=one(prompts.tokens), deep={k: one(v) for k, v in prompts.deep.items()},
                   deep_mode=prompts.deep_mode,
                   prefix={k: (one(key), one(value)) for k, (key, value) in prompts.prefix.items()})


def test_shared_prompt_equals_repeated_prompt(tiny):
    """A [1, P, D] prompt (tokens, deep, prefix) acts like the same prompt repeated [B, P, D]."""
    B = 3
    images, text = make_images(tiny, B), tiny.tokenize(["a dog", "a photo of a cat", "a tree"])
    vision, txt = full_prompts(tiny.vision_width, 1, seed=10), full_prompts(tiny.text_width, 1, seed=20)
    with torch.no_grad():
        close(tiny.encode_image(images, vision), tiny.encode_image(images, repeat(vision, B)))
        close(tiny.encode_text(text, txt), tiny.encode_text(text, repeat(txt, B)))


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_per_sample_prompts_give_per_sample_results(tiny, mode):
    """With [B, ...] prompts, sample i's feature equals sample i encoded alone with prompt i."""
    B = 3
    images, text = make_images(tiny, B), tiny.tokenize(["a dog", "a photo of a cat", "a tree"])
    vision, txt = full_prompts(tiny.vision_width, B, seed=30), full_prompts(tiny.text_width, B, seed=40)
    vision.deep_mode = txt.deep_mode = mode
    with torch.no_grad():
        batched_image, batched_text = tiny.encode_image(images, vision), tiny.encode_text(text, txt)
        for i in range(B):
            close(batched_image[i:i + 1], tiny.encode_image(images[i:i + 1], select(vision, i)), atol=1e-5)
            close(batched_text[i:i + 1], tiny.encode_text(text[i:i + 1], select(txt, i)), atol=1e-5)
        # the prompts differ per sample, so sharing prompt 0 would give another result
        assert differs(batched_image[1:2], tiny.encode_image(images[1:2], select(vision, 0)))


# ------------------------------------------------------------------ 6. gradients
def test_gradients_reach_prompts_only(tmp_path):
    """With a frozen backbone, every prompt tensor gets a non-zero gradient and no parameter does."""
    torch.manual_seed(0)
    bb = load_backbone("clvl-tiny", cache_dir=tmp_path).train()
    bb.requires_grad_(False)
    vision, txt = full_prompts(bb.vision_width, 1, seed=1), full_prompts(bb.text_width, 1, seed=2)
    vision.prefix[0] = (randn(1, 2, bb.vision_width, seed=3), randn(1, 2, bb.vision_width, seed=4))
    leaves = [vision.tokens, *vision.deep.values(), *[t for kv in vision.prefix.values() for t in kv],
              txt.tokens, *txt.deep.values(), *[t for kv in txt.prefix.values() for t in kv]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    images, text = make_images(bb, 2), bb.tokenize(["a dog", "a cat"])
    weights = randn(2, bb.embed_dim, seed=5)
    loss = (bb.encode_image(images, vision) * weights).sum() + (bb.encode_text(text, txt) * weights).sum()
    loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    for name, param in bb.named_parameters():
        assert not param.requires_grad and param.grad is None, name


# ------------------------------------------------------------------ 7. name resolution
def saved_tiny_weights(path) -> dict[str, torch.Tensor]:
    """Writes the state dict of a clvl-tiny model with distinctive weights to ``path``."""
    torch.manual_seed(123)
    model = open_clip.CLIP(**TINY_CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(randn(*param.shape, seed=7, scale=0.01))
    state = model.state_dict()
    torch.save(state, path)
    return state


def assert_same_state(loaded: ClipBackbone, state: dict[str, torch.Tensor]) -> None:
    got = loaded.model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_load_weight_file(tmp_path):
    """``clvl-tiny:/path/file.bin`` loads exactly the saved weights."""
    state = saved_tiny_weights(tmp_path / "weights.bin")
    bb = load_backbone(f"clvl-tiny:{tmp_path / 'weights.bin'}", cache_dir=tmp_path / "cache")
    assert_same_state(bb, state)


def test_load_local_dir(tmp_path):
    """``local-dir:`` reads open_clip's hub layout (config + weights) and gives the saved weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    state = saved_tiny_weights(folder / "open_clip_pytorch_model.bin")
    bb = load_backbone(f"local-dir:{folder}", cache_dir=tmp_path / "cache")
    assert_same_state(bb, state)
    assert bb.tokenize(["a dog"]).shape == (1, TINY_CONFIG["text_cfg"]["context_length"])


def test_unknown_architecture_suggests_close_name(tmp_path):
    with pytest.raises(RegistryError, match="did you mean.*clvl-tiny"):
        load_backbone("clvl-tinny", cache_dir=tmp_path)


def test_unknown_tag_lists_known_tags(tmp_path):
    with pytest.raises(RegistryError, match="nosuchtag") as error:
        load_backbone("ViT-B-32:nosuchtag", cache_dir=tmp_path)
    assert "known tags" in str(error.value) and "openai" in str(error.value)


def test_missing_weight_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_backbone(f"clvl-tiny:{tmp_path / 'missing.bin'}", cache_dir=tmp_path)


def test_local_dir_without_config_is_data_error(tmp_path):
    with pytest.raises(DataError, match="open_clip_config.json"):
        load_backbone(f"local-dir:{tmp_path}", cache_dir=tmp_path)


def test_weight_recipe_names_a_tag(tmp_path, monkeypatch):
    """``register_weight_recipe`` makes ``ARCH:mytag`` load the file the recipe returns."""
    monkeypatch.setattr(resolve, "_WEIGHT_RECIPES", {})
    calls = []

    def recipe(arch, cache_dir):
        calls.append((arch, cache_dir))
        path = cache_dir / f"{arch}-mytag.bin"
        if not path.exists():
            saved_tiny_weights(path)
        return path

    register_weight_recipe("mytag", recipe)
    cache = tmp_path / "cache"
    cache.mkdir()
    bb = load_backbone("clvl-tiny:mytag", cache_dir=cache)
    assert calls == [("clvl-tiny", cache)]
    assert_same_state(bb, torch.load(cache / "clvl-tiny-mytag.bin"))


# ------------------------------------------------------------------ 8. logit scale
def test_logit_scale_clamped_at_100():
    """``logit_scale()`` is exp(logit_scale), capped at 100."""
    bb = small_clip("quick-gelu+last-pool")
    with torch.no_grad():
        bb.model.logit_scale.fill_(math.log(20.0))
        close(bb.logit_scale(), torch.tensor(20.0), atol=1e-4)
        bb.model.logit_scale.fill_(math.log(1000.0))
        assert bb.logit_scale().item() == 100.0


# ------------------------------------------------------------------ 9. weights that are not at hand
TAG = "ViT-B-16:openai"  # open_clip fetches it from the hub repo timm/vit_base_patch16_clip_224.openai
TINY_RUN = ["--methods", "zeroshot", "--device", "cpu", "--set", "scenario_options.train_images=8",
            "--set", "scenario_options.test_images=4", "--set", "scenario_options.tasks=[colours,backdrops]"]


@pytest.fixture
def no_network(monkeypatch):
    """Online mode (HF_HUB_OFFLINE unset) on a machine where no host can be reached; returns the
    connection attempts (address, timeout). open_clip must not be asked to build the model."""
    import socket

    import huggingface_hub.constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy",
                     "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def unreachable(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("[Errno 101] Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to download the weights")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    return attempts


def test_uncached_tag_without_network_fails_at_once(tmp_path, no_network, monkeypatch):
    """One short probe of the hub ($HF_ENDPOINT respected), no download, one-line DataError."""
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    with pytest.raises(DataError) as error:
        load_backbone(TAG, cache_dir=tmp_path)
    assert no_network == [(("hub.example.org", 8443), resolve.PROBE_TIMEOUT_S)] and resolve.PROBE_TIMEOUT_S <= 2
    message = str(error.value)
    assert "\n" not in message and "not in the cache" in message and "hub.example.org cannot be reached" in message
    assert f"--backbone ViT-B-16:/path/to/" in message


def test_the_probe_goes_through_the_https_proxy(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    with pytest.raises(DataError, match="huggingface.co cannot be reached"):
        load_backbone(TAG, cache_dir=tmp_path)
    assert [address for address, _ in no_network] == [("proxy.example.org", 3128)]


def test_uncached_tag_offline_fails_without_probing(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        load_backbone(TAG, cache_dir=tmp_path)
    assert no_network == []


def test_uncached_tag_without_network_exits_2_with_one_line(tmp_path, no_network, capsys):
    from benchmark.cli import main

    code = main(["run", *TINY_RUN, "--backbone", TAG, "--cache-dir", str(tmp_path / "cache"),
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Retrying" not in err and "WARNING" not in err
    assert [line for line in err.splitlines() if not line.startswith("INFO")] == [
        next(line for line in err.splitlines() if line.startswith("error:"))]
    assert "huggingface.co cannot be reached" in err
    assert len(no_network) == 1  # one probe; nothing retried


def test_cached_tag_loads_with_the_hub_offline(tmp_path, no_network, monkeypatch):
    """Weights in the hub cache under <cache_dir>/open_clip load without any network call."""
    import huggingface_hub.constants

    snapshot = tmp_path / "open_clip" / "models--timm--vit_base_patch16_clip_224.openai"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snapshot / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    real = open_clip.factory.create_model_and_transforms
    offline_during_load = []

    def create(arch, pretrained=None, **kwargs):
        offline_during_load.append(huggingface_hub.constants.is_offline_mode())
        return real("clvl-tiny", pretrained=None, device=kwargs.get("device", "cpu"))

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    load_backbone(TAG, cache_dir=tmp_path)
    assert offline_during_load == [True] and no_network == []
    assert huggingface_hub.constants.is_offline_mode() is False  # restored


# ------------------------------------------------------------------ 10. a weight file of another architecture
SMALLER = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture
def smaller_arch(monkeypatch):
    """An architecture ``clvl-test-smaller`` (other shapes than clvl-tiny), known to open_clip for one test."""
    resolve.list_architectures()  # the shipped configs first: registering them rebuilds open_clip's table
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "clvl-test-smaller", SMALLER)
    return "clvl-test-smaller"


def test_weight_file_of_another_architecture_names_what_differs(tmp_path, smaller_arch):
    """clvl-tiny weights loaded as another architecture: one-line DataError naming the shapes
    that do not fit and the architecture whose shapes the file has."""
    saved_tiny_weights(tmp_path / "tiny.bin")
    with pytest.raises(DataError) as error:
        load_backbone(f"{smaller_arch}:{tmp_path / 'tiny.bin'}", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and "size mismatch" not in message
    assert f"does not fit architecture {smaller_arch}" in message
    assert "patch size 8 (not 4)" in message and "vision width 96 (not 64)" in message
    assert f"those of clvl-tiny: e.g. --backbone clvl-tiny:{tmp_path / 'tiny.bin'}" in message
    # and the other way round: the smaller file has no known architecture other than its own
    torch.save(open_clip.CLIP(**SMALLER).state_dict(), tmp_path / "smaller.bin")
    with pytest.raises(DataError, match="patch size 4 .not 8.*those of clvl-test-smaller"):
        load_backbone(f"clvl-tiny:{tmp_path / 'smaller.bin'}", cache_dir=tmp_path / "cache")


def test_weight_file_that_is_no_state_dict(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(DataError, match="cannot be read as an open_clip state dict"):
        load_backbone(f"clvl-tiny:{tmp_path / 'junk.bin'}", cache_dir=tmp_path / "cache")


def test_weight_file_of_another_architecture_exits_2(tmp_path, smaller_arch, capsys):
    from benchmark.cli import main

    saved_tiny_weights(tmp_path / "tiny.bin")
    code = main(["run", *TINY_RUN, "--backbone", f"{smaller_arch}:{tmp_path / 'tiny.bin'}",
                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"does not fit architecture {smaller_arch}" in errors[0]


# ------------------------------------------------------------------ 11. harness-pretrained weights on other data
@pytest.fixture
def private_recipes(monkeypatch):
    monkeypatch.setattr(resolve, "_WEIGHT_RECIPES", resolve._WEIGHT_RECIPES.copy())
    monkeypatch.setattr(resolve, "_RECIPE_SCENARIOS", dict(getattr(resolve, "_RECIPE_SCENARIOS", {})), raising=False)


def test_a_recipe_declares_the_scenario_it_pretrains_on(private_recipes, caplog):
    register_weight_recipe("elsewhere", lambda arch, cache_dir: cache_dir, scenario="flickr_coco")
    assert resolve.pretrained_for("clvl-tiny:elsewhere") == "flickr_coco"
    assert resolve.pretrained_for("clvl-tiny:synthetic") == "synthetic"  # the shipped recipe
    assert resolve.pretrained_for("ViT-B-16:openai") is None and resolve.pretrained_for("clvl-tiny") is None
    with caplog.at_level("WARNING", logger="benchmark"):
        assert resolve.warn_if_pretrained_elsewhere("clvl-tiny:synthetic", "synthetic") is None
        assert resolve.warn_if_pretrained_elsewhere("ViT-B-16:openai", "coco_supercat") is None
        message = resolve.warn_if_pretrained_elsewhere("clvl-tiny:synthetic", "coco_supercat")
    assert "'synthetic'" in message and "'coco_supercat'" in message and "chance" in message
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [message]


@pytest.mark.parametrize("pretrained_on, warned", [("flickr_coco", True), ("synthetic", False)])
def test_run_warns_at_plan_time_about_a_backbone_pretrained_elsewhere(private_recipes, tmp_path, caplog,
                                                                      pretrained_on, warned):
    """The warning comes once, before the backbone is even built (the recipe here refuses to
    build it, so nothing trains), and only when the run's scenario is not the recipe's."""
    from benchmark.cli import main
    from benchmark.errors import ConfigError

    def refuse(arch, cache_dir):
        raise ConfigError("this recipe builds nothing")

    register_weight_recipe("elsewhere", refuse, scenario=pretrained_on)
    with caplog.at_level("WARNING", logger="benchmark"):
        code = main(["run", *TINY_RUN, "--backbone", "clvl-tiny:elsewhere", "--cache-dir", str(tmp_path / "cache"),
                     "--output-dir", str(tmp_path / "out")])
    assert code == 2
    warnings = [r.getMessage() for r in caplog.records if "pretrained by the harness" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert "'flickr_coco'" in warnings[0] and "'synthetic'" in warnings[0]
