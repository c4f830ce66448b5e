"""LoRA computes exactly ``W + (alpha / r) B A`` on every adapted weight, with true gradients.

The references are independent of the method's code: open_clip's own ``nn.MultiheadAttention``
and encoders, a copy of the plain open_clip model with ``(alpha / r) B A`` added into its
weights by hand, and central finite differences. Everything runs on the random-weight
``clvl-tiny`` backbone (float64 where a tight tolerance is the point).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmark.backbone import ClipBackbone, load_backbone
from benchmark.testing import single_thread
from methods.base import TrainData
from methods.lora import LoRA, LoraMethodConfig, SplitAttention, split_attention


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("clvl-tiny")


def inputs(backbone: ClipBackbone, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, *backbone.image_size, generator=generator, dtype=dtype)
    tokens = backbone.tokenize(["a red circle on grass", "two blue squares", "a large yellow star at night"])
    return images, tokens


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


# ============================================================ (c) the split attention is open_clip's attention
@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double()
    with torch.no_grad():  # PyTorch initialises the in_proj bias to zero; make it count
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    split = SplitAttention.from_multihead(mha)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    bool_mask = torch.rand(7, 7) > 0.7
    bool_mask.fill_diagonal_(False)  # every query may see itself
    for mask in (None, causal_mask(7).double(), bool_mask):
        for train in (True, False):  # eval + no_grad takes PyTorch's fused fast path
            mha.train(train), split.train(train)
            with torch.set_grad_enabled(train):
                expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
                got, weights = split(x, x, x, need_weights=False, attn_mask=mask)
            assert weights is None
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the copy is a copy: q/k/v rows of the packed projection, the output projection as it is
    width = mha.embed_dim
    assert torch.equal(split.v_proj.weight, mha.in_proj_weight[2 * width:])
    assert torch.equal(split.k_proj.bias, mha.in_proj_bias[width:2 * width])
    assert torch.equal(split.out_proj.weight, mha.out_proj.weight)


def test_split_encoders_equal_open_clip(tiny):
    """Both towers with split attention (the text one with its causal mask) give open_clip's features."""
    plain = copy.deepcopy(tiny.model).eval()
    split = copy.deepcopy(tiny.model).eval()
    assert split_attention(split) == len(tiny.vision_blocks) + len(tiny.text_blocks)
    assert all(isinstance(b.attn, SplitAttention) for b in split.transformer.resblocks)
    images, tokens = inputs(tiny)
    with torch.no_grad():
        wrapped = ClipBackbone(split, None, None, None, "split")
        torch.testing.assert_close(wrapped.encode_image(images), plain.encode_image(images, normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(wrapped.encode_text(tokens), plain.encode_text(tokens, normalize=True),
                                   rtol=0, atol=1e-5)


# ============================================================ (a) the adapted model is the hand-merged model
def lora_layers(model: nn.Module):
    """``(module name, adapter, B @ A)`` for every LoRA layer peft put into ``model``."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict):
            for adapter in lora_a:
                # peft names a LoRA layer nested in another wrapped one ``<outer>.base_layer.<inner>``
                yield name.replace(".base_layer", ""), adapter, module.lora_B[adapter].weight @ lora_a[adapter].weight


def hand_merged(plain: nn.Module, method: LoRA, adapter: str) -> nn.Module:
    """A copy of the plain open_clip model with ``(alpha / r) B A`` of ``adapter`` added into each
    adapted weight, located by the module's name in open_clip's layout."""
    merged = copy.deepcopy(plain)
    weights = dict(merged.named_parameters())
    scale = method.config.alpha / method.config.rank
    with torch.no_grad():
        for name, owner, delta in lora_layers(method.backbone.model):
            if owner != adapter:
                continue
            block, _, projection = name.rpartition(".")
            if projection in ("q_proj", "k_proj", "v_proj"):  # rows of the packed in_proj_weight
                width = delta.shape[1]
                start = ("q_proj", "k_proj", "v_proj").index(projection) * width
                weights[f"{block}.in_proj_weight"][start:start + width] += scale * delta
            elif projection == "attn":  # a LoRA on the packed attention as a whole
                weights[f"{name}.in_proj_weight"] += scale * delta
            else:  # out_proj, mlp.c_fc, mlp.c_proj: nn.Linear layers in both layouts
                weights[f"{name}.weight"] += scale * delta
    return merged


def adapted_method(backbone: ClipBackbone, config: LoraMethodConfig, tasks: int) -> LoRA:
    """A LoRA method on a float64 copy of ``backbone``, every adapter with random A and B."""
    torch.manual_seed(0)
    method = LoRA(copy.deepcopy(backbone).double(), config, num_tasks=tasks)
    for task in range(tasks):
        method.before_training_exp(TrainData(task, f"task{task}", None, 4, torch.device("cpu")))
    with torch.no_grad():
        for name, p in method.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)  # B starts at zero; a random B makes every delta count
    return method.eval()


@pytest.mark.parametrize("mode, targets", [
    ("shared", ["q", "v"]),
    ("shared", ["attn", "mlp"]),
    ("per_task", ["out", "k"]),
], ids=["default-qv", "attn-mlp", "per-task-out-k"])
def test_adapted_encoders_equal_a_hand_merged_model(tiny, mode, targets):
    config = LoraMethodConfig(mode=mode, targets=targets, rank=4, alpha=12.0)
    tasks = 2 if mode == "per_task" else 1
    with single_thread():
        method = adapted_method(tiny, config, tasks)
        plain = copy.deepcopy(tiny.model).double().eval()
        images, tokens = inputs(tiny, torch.float64)
        with torch.no_grad():
            plain_features = (ClipBackbone(plain, None, None, None, "plain").encode_image(images),
                              ClipBackbone(plain, None, None, None, "plain").encode_text(tokens))
            for task in range(tasks):
                reference = ClipBackbone(hand_merged(plain, method, method.adapter_name(task)), None, None, None, "ref")
                ids = torch.full((len(tokens),), task) if mode == "per_task" else None
                got = method.encode_images(images, ids), method.encode_texts(tokens, ids)
                expected = reference.encode_image(images), reference.encode_text(tokens)
                for tower, g, e, p in zip(("image", "text"), got, expected, plain_features):
                    assert (e - p).abs().max() > 1e-2, f"{tower}: the adapters should change the features"
                    torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=f"{tower} tower, task {task}")


# ============================================================ (b) gradients are the true gradients
def test_lora_gradients_equal_finite_differences(tiny):
    config = LoraMethodConfig(targets=["attn", "mlp"], rank=2, alpha=6.0)
    with single_thread():
        method = adapted_method(tiny, config, 1)
        images, tokens = inputs(tiny, torch.float64)
        generator = torch.Generator().manual_seed(2)
        u = torch.randn(len(images), tiny.embed_dim, generator=generator, dtype=torch.float64)
        w = torch.randn(len(tokens), tiny.embed_dim, generator=generator, dtype=torch.float64)

        def loss() -> torch.Tensor:
            return (method.encode_images(images) * u).sum() + (method.encode_texts(tokens) * w).sum()

        # A and B of every adapted layer in the first and the last block of each tower
        blocks = tuple(f"{tower}.resblocks.{i}." for tower, depth in (("visual.transformer", len(tiny.vision_blocks)),
                                                                     ("transformer", len(tiny.text_blocks)))
                       for i in (0, depth - 1))
        chosen = {name: p for name, p in method.backbone.model.named_parameters()
                  if "lora_" in name and name.startswith(blocks)}
        assert any("out_proj" in name for name in chosen) and len(chosen) >= 24
        method.zero_grad()
        loss().backward()
        eps = 1e-6
        worst = 0.0
        for name, p in chosen.items():
            for flat in (0, p.numel() - 1):
                index = torch.unravel_index(torch.tensor(flat), p.shape)
                with torch.no_grad():
                    original = p[index].item()
                    p[index] = original + eps
                    up = loss().item()
                    p[index] = original - eps
                    down = loss().item()
                    p[index] = original
                numeric, analytic = (up - down) / (2 * eps), p.grad[index].item()
                assert abs(numeric) > 1e-6, f"{name}: no sensitivity, the check could not fail"
                assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), name
                worst = max(worst, abs(analytic - numeric) / abs(numeric))
        assert worst < 1e-5
