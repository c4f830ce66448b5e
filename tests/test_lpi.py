"""LPI (methods/lpi): each component against its documented behaviour (docs/methods/lpi.md),
the presets through the conformance kit and the command line.

Everything runs on the CPU with random-weight backbones: ``clvl-tiny`` (vision 96 wide, text 64,
3 blocks each) and, for the parameter accounting, ``ViT-B-16`` built without weights. The loss
references below are written out with Python floats and loops, independent of the module.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbone import Prompts, load_backbone
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.losses import info_nce
from benchmark.runner import method_config
from benchmark.testing import check_method, tiny_setup
from methods import get_method
from methods.base import TrainData
from methods.lpi import LPI, LPIConfig, LPIReleased, LPIReleasedConfig
from methods.lpi.interaction import CPLinearMaps, InteractionModule, prompt_state_hooks
from methods.lpi.losses import layer_alignment_loss, task_contrastive_loss
from methods.lpi.prompts import DecomposedPrompt, encoder_prompts
from methods.lpi.similarity import SHIPPED_CSV, read_similarity_csv

REPO = Path(__file__).resolve().parents[1]
COCO_ORDER = ["appliance", "sports", "outdoor", "electronic", "accessory", "indoor", "kitchen", "furniture",
              "vehicle", "food", "animal", "person"]  # spec §1.2
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    logging.getLogger("benchmark.backbone.resolve").setLevel(logging.ERROR)
    return load_backbone("clvl-tiny")


def start(method, task: int, name: str | None = None) -> None:
    method.before_training_exp(TrainData(task, name or f"task{task}", None, 8, CPU))


def build(cls, backbone, num_tasks=2, seed=0, started=False, **overrides):
    """A method on ``backbone``; ``started``: every task's before_training_exp has run (the state
    in which each task's prompts are used)."""
    torch.manual_seed(seed)
    method = cls(backbone, cls.Config(**overrides), num_tasks)
    for task in range(num_tasks if started else 0):
        start(method, task)
    return method


def batch(backbone, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *backbone.image_size, generator=generator)
    tokens = backbone.tokenize([f"a small red circle number {i}" for i in range(n)])
    return images, tokens


def cp_reference(layer, token, channel):
    """P[l, p, d] = (1/r) sum_k A[l, k] B[p, k] C[d, k], by loops (spec §3.1)."""
    L, r = layer.shape
    out = torch.zeros(L, token.shape[0], channel.shape[0], dtype=torch.float64)
    for l in range(L):
        for p in range(token.shape[0]):
            for d in range(channel.shape[0]):
                out[l, p, d] = sum(float(layer[l, k] * token[p, k] * channel[d, k]) for k in range(r)) / r
    return out


# ------------------------------------------------------------------------ parameter accounting (§7)
def test_released_preset_adds_5284_parameters_per_task_on_vit_b16(vit_b16):
    method = build(LPIReleased, vit_b16, num_tasks=12)
    prompt = method.prompts[0]
    shapes = {name: tuple(p.shape) for name, p in prompt.named_parameters()}
    assert shapes == {"layer": (9, 4), "vision_token": (16, 4), "text_token": (16, 4),
                      "vision_channel": (768, 4), "text_channel": (512, 4)}
    counts = method.parameter_counts()
    assert counts["per_task"] == sum(p.numel() for p in prompt.parameters()) == 5284
    assert counts["added"] == 12 * 5284 == 63408 and counts["shared"] == 0
    start(method, 3, "electronic")
    live = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert live == method.parameter_counts()["trainable"] == 5284
    assert all(p.requires_grad for p in method.prompts[3].parameters())


def test_paper_preset_adds_the_interaction_module_18188_per_task_on_vit_b16(vit_b16):
    method = build(LPI, vit_b16, num_tasks=12)
    assert method.depth == 9 and method.prompt_length == 16
    module = method.interactions[0]
    sizes = {name: p.numel() for name, p in module.named_parameters()}
    assert sizes == {"vision_to_text.layer": 48, "vision_to_text.inputs": 3076, "vision_to_text.outputs": 2048,
                     "text_to_vision.layer": 48, "text_to_vision.inputs": 2052, "text_to_vision.outputs": 3072,
                     "vision_norm.weight": 768, "vision_norm.bias": 768, "text_norm.weight": 512,
                     "text_norm.bias": 512}
    assert sum(sizes.values()) == 12904
    assert method.parameter_counts()["per_task"] == 5284 + 12904 == 18188


# ------------------------------------------------------------------------ decomposition (§3.1)
def test_decomposed_prompt_matches_the_cp_equation_and_its_init():
    torch.manual_seed(0)
    prompt = DecomposedPrompt(num_layers=3, length=2, vision_width=5, text_width=4, rank=2)
    vision, text = prompt()
    assert vision.shape == (3, 2, 5) and text.shape == (3, 2, 4)
    factors = {name: p.detach() for name, p in prompt.named_parameters()}
    torch.testing.assert_close(vision.double(), cp_reference(factors["layer"], factors["vision_token"],
                                                             factors["vision_channel"]))
    torch.testing.assert_close(text.double(), cp_reference(factors["layer"], factors["text_token"],
                                                           factors["text_channel"]))
    big = DecomposedPrompt(9, 16, 768, 512, 4)
    assert 0.45 < float(big.vision_channel.detach().std()) < 0.55  # N(0, 0.5^2)
    assert 0.05 < float(big.vision().detach().std()) < 0.075  # spec: entries of std ~ 0.0625


# ------------------------------------------------------------------------ placement (§2.1)
def test_encoder_prompts_put_slice_zero_at_the_input_and_add_deeper_slices():
    slices = torch.randn(1, 4, 3, 8)
    shallow = encoder_prompts(slices, depth=1)
    assert torch.equal(shallow.tokens, slices[:, 0]) and shallow.deep == {}
    deep = encoder_prompts(slices, depth=3)
    assert deep.deep_mode == "add" and sorted(deep.deep) == [1, 2]
    assert torch.equal(deep.deep[2], slices[:, 2])
    with pytest.raises(ValueError):
        encoder_prompts(slices, depth=5)


def test_features_use_the_adapter_hook_points_with_the_task_prompt(tiny):
    images, tokens = batch(tiny)
    ids = torch.ones(len(images), dtype=torch.long)
    released = build(LPIReleased, tiny, started=True)
    vision, text = released.prompts[1]()
    expected = tiny.encode_image(images, Prompts(tokens=vision[None, 0]))
    torch.testing.assert_close(released.encode_images(images, ids), expected)
    expected = tiny.encode_text(tokens, Prompts(tokens=text[None, 0]))
    torch.testing.assert_close(released.encode_texts(tokens, ids), expected)
    deep = build(LPI, tiny, interaction=False, depth=3, started=True)
    vision, _ = deep.prompts[1]()
    expected = tiny.encode_image(images, Prompts(tokens=vision[None, 0], deep={1: vision[None, 1], 2: vision[None, 2]}))
    torch.testing.assert_close(deep.encode_images(images, ids), expected)


def test_a_task_not_started_yet_is_encoded_by_the_plain_backbone(tiny):
    images, tokens = batch(tiny)
    method = build(LPIReleased, tiny)
    start(method, 0)
    ids = torch.tensor([0, 1, 0, 1])  # task 1 has only its random initial prompt
    features = method.encode_images(images, ids)
    torch.testing.assert_close(features[1::2], tiny.encode_image(images[1::2]))
    torch.testing.assert_close(features[::2], method.encode_images(images[::2], ids[::2]))
    assert not torch.allclose(features[::2], tiny.encode_image(images[::2]))
    torch.testing.assert_close(method.encode_texts(tokens, torch.ones(4, dtype=torch.long)), tiny.encode_text(tokens))


@pytest.mark.parametrize("depth", [1, 3])
def test_deeper_slices_reach_the_encoders_only_when_depth_exceeds_one(tiny, depth):
    images, tokens = batch(tiny)
    ids = torch.zeros(len(images), dtype=torch.long)
    method = build(LPI, tiny, interaction=False, depth=depth, started=True)
    before = method.encode_images(images, ids), method.encode_texts(tokens, ids)
    with torch.no_grad():
        method.prompts[0].layer[1:] += 1.0  # rows 1.. of A only shape slices 1..L-1
    after = method.encode_images(images, ids), method.encode_texts(tokens, ids)
    for b, a in zip(before, after):
        assert torch.equal(a, b) if depth == 1 else not torch.allclose(a, b)


def test_depth_and_prompt_length_are_clipped_to_the_backbone_not_ignored(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="methods.lpi.method"):
        method = build(LPI, tiny)
    assert method.depth == 3 and method.prompt_length == 15  # 3 blocks; 32 text positions
    assert "depth 9 used as 3" in caplog.text and "prompt_length 16 used as 15" in caplog.text
    # What ran is kept beside what was asked (the record's method_params_used / method_adjusted).
    assert {k: (v["asked"], v["used"]) for k, v in method.adjusted.items()} == {"prompt_length": (16, 15), "depth": (9, 3)}
    used = method.effective_config()
    assert (used["depth"], used["prompt_length"], method.config.depth) == (3, 15, 9)
    with pytest.raises(ValueError, match="depth=1"):
        build(LPI, tiny, depth=1)  # interaction on needs deep blocks
    with pytest.raises(ValueError, match="num_layers"):
        build(LPI, tiny, depth=10)
    with pytest.raises(ValueError, match="hlc_variant"):
        build(LPI, tiny, hlc_variant="nope")


# ------------------------------------------------------------------------ interaction (§3.2)
def test_cp_linear_maps_match_the_spec_equation():
    torch.manual_seed(0)
    maps = CPLinearMaps(num_layers=3, in_dim=4, out_dim=5, rank=2)
    a, u, w = maps.layer.double(), maps.inputs.double(), maps.outputs.double()
    assert float(maps.inputs.detach().abs().max()) <= 1 / math.sqrt(2)  # U(-1/sqrt(r), 1/sqrt(r))
    x = torch.randn(6, 4, dtype=torch.float64)
    for layer in range(3):
        full = sum(a[layer, k] * torch.outer(u[:, k], w[:, k]) for k in range(2)) / 2  # [(in+1), out]
        torch.testing.assert_close(maps.weight(layer).double(), full[:4])
        torch.testing.assert_close(maps.bias(layer).double(), full[4])
        torch.testing.assert_close(maps(x.float(), layer).double(), x @ full[:4] + full[4], rtol=1e-5, atol=1e-6)


def test_interaction_mixes_09_own_state_and_01_cross_term_then_layer_norm():
    torch.manual_seed(0)
    module = InteractionModule(num_layers=3, vision_width=6, text_width=4, rank=2)
    with torch.no_grad():  # non-trivial LayerNorm affine
        for norm in (module.vision_norm, module.text_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    v, t = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    expected_v = module.vision_norm(0.9 * v + 0.1 * (t @ module.text_to_vision.weight(2) + module.text_to_vision.bias(2)))
    expected_t = module.text_norm(0.9 * t + 0.1 * (v @ module.vision_to_text.weight(2) + module.vision_to_text.bias(2)))
    torch.testing.assert_close(module.mix_vision(v, t, 2), expected_v)
    torch.testing.assert_close(module.mix_text(t, v, 2), expected_t)


class _BlockInputs:
    """Records, per block, the hidden state entering it (a pre-hook registered before LPI's own,
    so it runs first) and the one the block itself receives (a wrapped forward, after every hook)."""

    def __init__(self, blocks):
        self.blocks, self.before, self.after, self._handles = blocks, {}, {}, []

    def __enter__(self):
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(
                lambda module, args, i=index: self.before.__setitem__(i, args[0].detach().clone())))

            def wrapped(x, *args, _i=index, _forward=block.forward, **kwargs):
                self.after[_i] = x.detach().clone()
                return _forward(x, *args, **kwargs)

            block.forward = wrapped  # an instance attribute shadowing the class's forward
        return self

    def __exit__(self, *exc):
        for block, handle in zip(self.blocks, self._handles):
            handle.remove()
            del block.forward
        return False


def test_interaction_hooks_transform_only_the_prompt_positions_of_deep_blocks(tiny):
    images, tokens = batch(tiny)
    ids = torch.ones(len(images), dtype=torch.long)
    method = build(LPI, tiny, started=True)
    P = method.prompt_length
    vision, text = method.prompts[1]()
    module = method.interactions[1]
    with torch.no_grad():
        for encoder, x, blocks in (("vision", images, tiny.vision_blocks), ("text", tokens, tiny.text_blocks)):
            with _BlockInputs(blocks) as seen:
                method.encode_images(x, ids) if encoder == "vision" else method.encode_texts(x, ids)
            assert torch.equal(seen.before[0], seen.after[0])  # block 0: nothing mixed
            for layer in (1, 2):
                before, after = seen.before[layer], seen.after[layer]
                if encoder == "vision":
                    expected = module.mix_vision(before[:, 1:1 + P], text[layer], layer)
                else:
                    expected = module.mix_text(before[:, 1:1 + P], vision[layer], layer)
                torch.testing.assert_close(after[:, 1:1 + P], expected)
                assert torch.equal(after[:, :1], before[:, :1]) and torch.equal(after[:, 1 + P:], before[:, 1 + P:])
    assert all(not b._forward_pre_hooks for b in [*tiny.vision_blocks, *tiny.text_blocks])  # hooks removed


def test_interaction_switch_changes_features_and_mixed_task_batches_match_single_task_ones(tiny):
    images, tokens = batch(tiny)
    on, off = build(LPI, tiny, started=True), build(LPI, tiny, interaction=False, started=True)
    ids = torch.tensor([0, 1, 1, 0])
    assert not torch.allclose(on.encode_images(images, ids), off.encode_images(images, ids))
    assert off.interactions is None and off.parameter_counts()["per_task"] < on.parameter_counts()["per_task"]
    for encode, x in ((on.encode_images, images), (on.encode_texts, tokens)):
        mixed = encode(x, ids)
        for task in (0, 1):
            rows = ids == task
            torch.testing.assert_close(mixed[rows], encode(x[rows], ids[rows]), rtol=1e-5, atol=1e-5)


def _layer_norm_by_hand(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_interaction_mix_zero_is_the_layer_norm_only_control(tiny):
    """interaction_mix=0 (issue 9, item 13): the prompt-position states entering each deep block
    are LN(state) with the routed task's LayerNorm, and no cross-modal map is allocated."""
    images, tokens = batch(tiny)
    ids = torch.tensor([0, 1, 1, 0])
    method = build(LPI, tiny, started=True, interaction_mix=0.0)
    P = method.prompt_length
    with torch.no_grad():
        for module in method.interactions:  # distinct, non-trivial affine per task
            for norm in (module.vision_norm, module.text_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
        for encoder, x, blocks in (("vision", images, tiny.vision_blocks), ("text", tokens, tiny.text_blocks)):
            with _BlockInputs(blocks) as seen:
                method.encode_images(x, ids) if encoder == "vision" else method.encode_texts(x, ids)
            for layer in (1, 2):
                before, after = seen.before[layer].float(), seen.after[layer].float()
                for row, task in enumerate(ids.tolist()):
                    norm = getattr(method.interactions[task], f"{encoder}_norm")
                    expected = _layer_norm_by_hand(before[row, 1:1 + P], norm.weight, norm.bias)
                    torch.testing.assert_close(after[row, 1:1 + P], expected, rtol=1e-5, atol=1e-5)
    # clvl-tiny (P = 15, rank 4): prompts 4 * (9 + 2 * 15 + 96 + 64) = 796, LayerNorms 2 * (96 + 64) = 320
    assert method.parameter_counts()["per_task"] == 796 + 320
    assert method.interactions[0].vision_to_text is None and method.interactions[0].text_to_vision is None


def test_hooks_are_removed_when_the_encoder_raises(tiny):
    calls = []
    with pytest.raises(RuntimeError):
        with prompt_state_hooks(tiny.vision_blocks, {1: lambda s: calls.append(1) or s}, num_prompts=2):
            raise RuntimeError("boom")
    assert not tiny.vision_blocks[1]._forward_pre_hooks


# ------------------------------------------------------------------------ losses (§4)
def _softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _layer_loss_reference(vision, text, variant) -> float:
    L = vision.shape[0]
    v = [[float(vision[l, p].double().mean()) for p in range(vision.shape[1])] for l in range(L)]
    t = [[float(text[l, p].double().mean()) for p in range(text.shape[1])] for l in range(L)]
    if variant == "normalized":
        v = [[x / n for x in row] for row, n in ((row, math.sqrt(sum(y * y for y in row))) for row in v)]
        t = [[x / n for x in row] for row, n in ((row, math.sqrt(sum(y * y for y in row))) for row in t)]
        scale = 100.0
    else:
        scale = 1.0 / (0.01 * 0.01)
    H = [[scale * sum(a * b for a, b in zip(v[i], t[j])) for j in range(L)] for i in range(L)]

    def ce(rows):
        return sum(math.log(sum(math.exp(x - max(r)) for x in r)) + max(r) - r[i] for i, r in enumerate(rows)) / L

    return (ce(H) + ce([list(col) for col in zip(*H)])) / 2


@pytest.mark.parametrize("variant", ["released", "normalized"])
def test_layer_alignment_loss_matches_its_formula(variant):
    torch.manual_seed(1)
    prompt = DecomposedPrompt(num_layers=5, length=3, vision_width=7, text_width=6, rank=2)
    vision, text = prompt()
    loss = layer_alignment_loss(vision, text, variant)
    assert math.isclose(float(loss), _layer_loss_reference(vision.detach(), text.detach(), variant), rel_tol=1e-4)


def _task_loss_reference(x, positive, tau, form) -> float:
    n = len(x)
    norms = [math.sqrt(sum(b * b for b in row)) for row in x]
    unit = [[a / norm for a in row] for row, norm in zip(x, norms)]
    rows = []
    for i in range(n):
        pos, neg = [], []
        for j in range(n):
            m = 1.0 if (positive[i][j] or i == j) else 0.0
            if form == "released":
                cos = math.inf if i == j else sum(a * b for a, b in zip(unit[i], unit[j]))
                z = 1.0 / (1.0 + math.exp(-cos / tau)) if cos != math.inf else 1.0  # the first sigmoid
            else:
                if i == j:
                    continue
                z = sum(a * b for a, b in zip(unit[i], unit[j])) / tau
            value = m * _softplus(-z) + (1 - m) * _softplus(z)
            (pos if m else neg).append(value)
        rows.append((sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0))
    return sum(rows) / n


@pytest.mark.parametrize("form", ["released", "corrected"])
@pytest.mark.parametrize("tau", [0.001, 0.05])
def test_task_contrastive_loss_matches_its_formula(form, tau):
    torch.manual_seed(2)
    x = torch.randn(4, 30) * 0.1
    positive = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    loss = task_contrastive_loss(x, positive, tau, form)
    expected = _task_loss_reference(x.double().tolist(), positive.tolist(), tau, form)
    assert math.isclose(float(loss), expected, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("form", ["released", "corrected"])
def test_task_loss_guards_rows_without_positives_or_negatives(form):
    torch.manual_seed(3)
    x = torch.randn(3, 10, requires_grad=True)
    for positive in (torch.ones(3, 3, dtype=torch.bool),  # no negatives anywhere
                     torch.eye(3, dtype=torch.bool),  # corrected: no positives anywhere
                     torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)):  # row 0: no negatives
        loss = task_contrastive_loss(x, positive, 0.01, form)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        expected = _task_loss_reference(x.detach().double().tolist(), positive.tolist(), 0.01, form)
        assert math.isclose(float(loss), expected, rel_tol=1e-4, abs_tol=1e-6)
        x.grad = None
    single = task_contrastive_loss(x[:1], torch.ones(1, 1, dtype=torch.bool), 0.01, form)
    assert torch.isfinite(single)


def test_extra_loss_is_the_weighted_sum_of_both_terms_with_csv_positives(tiny):
    method = build(LPIReleased, tiny, num_tasks=5)
    for task, name in enumerate(["appliance", "sports", "outdoor", "electronic", "accessory"]):
        start(method, task, name)
    assert method.similarity_source == "csv"
    prompts = [method.prompts[j]() for j in range(5)]
    sim = read_similarity_csv(SHIPPED_CSV)
    names = COCO_ORDER[:5]
    positive = [[sim[a][b] > 0.4 for b in names] for a in names]
    assert positive[4][0] and not any(positive[4][1:4])  # accessory ~ appliance only (spec §4.3)
    layer = _layer_loss_reference(prompts[4][0].detach(), prompts[4][1].detach(), "released")
    task = 0.5 * sum(_task_loss_reference([p[m].detach().flatten().double().tolist() for p in prompts], positive,
                                          0.001, "released") for m in (0, 1))
    loss = method.extra_loss()
    assert math.isclose(float(loss), 0.1 * layer + 0.1 * task, rel_tol=1e-4)
    assert math.isclose(float(method.loss_terms["task"]), 0.1 * task, rel_tol=1e-4)
    start(method, 0, "appliance")
    method.extra_loss()
    assert set(method.loss_terms) == {"layer"}  # no task term on the first task
    off = build(LPIReleased, tiny, hlc_weight=0.0, task_loss_weight=0.0)
    start(off, 1, "b")
    assert off.extra_loss() is None


# ------------------------------------------------------------------------ task similarity (§4.3)
def test_shipped_similarity_matrix_gives_the_positives_listed_in_the_spec():
    sim = read_similarity_csv(SHIPPED_CSV)
    assert list(sim) == COCO_ORDER
    # datasets/ keeps a copy for readers of the repository; the package data is what is read.
    assert (REPO / "datasets" / "coco_supercat_task_similarity.csv").read_bytes() == SHIPPED_CSV.read_bytes()
    pairs = {frozenset((a, b)) for a in COCO_ORDER for b in COCO_ORDER if a != b and sim[a][b] > 0.4}
    expected = {("appliance", "accessory"), ("appliance", "kitchen"), ("appliance", "furniture"),
                ("appliance", "vehicle"), ("sports", "food"), ("outdoor", "indoor"), ("outdoor", "kitchen"),
                ("indoor", "kitchen"), ("kitchen", "furniture"), ("kitchen", "food"), ("furniture", "food"),
                ("vehicle", "animal"), ("vehicle", "person"), ("food", "animal"), ("animal", "person")}
    assert pairs == {frozenset(p) for p in expected}


def test_similarity_comes_from_the_text_encoder_for_other_task_names(tiny):
    method = build(LPI, tiny, num_tasks=3)
    for task, name in enumerate(["colours", "backdrops", "textures"]):
        start(method, task, name)
    assert method.similarity_source == "text"
    features = F.normalize(torch.stack([tiny.encode_text(tiny.tokenize([n]))[0] for n in
                                        ["colours", "backdrops", "textures"]]), dim=-1)
    torch.testing.assert_close(method.task_similarity, features @ features.T)
    strict = build(LPI, tiny, task_similarity="csv")
    with pytest.raises(ValueError, match="colours"):
        start(strict, 0, "colours")


# ------------------------------------------------------------------------ gradients and freezing
def _step_loss(method, backbone, task):
    images, tokens = batch(backbone)
    ids = torch.full((len(images),), task)
    image_features, text_features = method.training_features(images, tokens, ids)
    loss = info_nce(image_features, text_features, method.logit_scale())
    extra = method.extra_loss()
    return loss if extra is None else loss + extra


def test_gradients_reach_only_the_current_task(tiny):
    method = build(LPI, tiny)
    start(method, 0, "colours")
    start(method, 1, "backdrops")
    _step_loss(method, tiny, 1).backward()
    for name, param in method.named_parameters():
        if name.startswith(("prompts.1.", "interactions.1.")):
            assert param.grad is not None and bool((param.grad != 0).any()), name
        else:
            assert param.grad is None, name  # the backbone and task 0 get nothing


def test_with_depth_one_and_no_prompt_losses_only_slice_zero_gets_gradient(tiny):
    method = build(LPIReleased, tiny, hlc_weight=0.0, task_loss_weight=0.0)
    start(method, 0)
    _step_loss(method, tiny, 0).backward()
    layer = method.prompts[0].layer.grad
    assert bool((layer[0] != 0).any()) and bool((layer[1:] == 0).all())  # only A[0, :] is used (spec §7)


def test_earlier_tasks_stay_bit_identical_and_routing_keys_are_kept():
    setup = tiny_setup(LPI, LPIConfig(lr=0.05), num_tasks=2)
    strategy = setup.make_strategy()
    method, stream = setup.method, setup.streams.train_stream
    strategy.train(stream[0])
    first = {k: v.clone() for k, v in method.state_dict().items() if k.startswith(("prompts.0.", "interactions.0."))}
    keys = method.image_router.keys[0].clone(), method.text_router.keys[0].clone()
    start_state = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("prompts.1.")}
    strategy.train(stream[1])
    assert all(torch.equal(method.state_dict()[k], v) for k, v in first.items())
    assert any(not torch.equal(method.state_dict()[k], v) for k, v in start_state.items())  # task 1 trained
    assert torch.equal(method.image_router.keys[0], keys[0]) and torch.equal(method.text_router.keys[0], keys[1])
    assert method.image_router.fitted.tolist() == [True, True]


# ------------------------------------------------------------------------ routing (§3.4)
def test_routing_uses_l1_distance_to_the_nearest_key_per_modality(tiny, monkeypatch):
    method = build(LPIReleased, tiny, k=1)
    assert method.route_images(batch(tiny)[0]) is None  # nothing fitted: no routing (frozen features)
    dim = tiny.embed_dim
    key0, key1, query = torch.zeros(1, dim), torch.zeros(1, dim), torch.zeros(2, dim)
    key0[0, :2] = torch.tensor([2.0, 2.0])  # L1 4.0, L2 2.83 from the origin
    key1[0, 0] = 3.5  # L1 3.5, L2 3.5
    query[1, 0] = 3.5
    for router in (method.image_router, method.text_router):
        router.fit_task(0, key0)
        router.fit_task(1, key1)
    monkeypatch.setattr(tiny, "encode_image", lambda images, *a, **k: query)
    monkeypatch.setattr(tiny, "encode_text", lambda tokens, *a, **k: query)
    assert method.route_images(torch.zeros(2, 3, 32, 32)).tolist() == [1, 1]  # L2 would pick task 0 first
    assert method.route_texts(torch.zeros(2, 32, dtype=torch.long)).tolist() == [1, 1]
    l2 = build(LPIReleased, tiny, k=1, routing_distance="l2")
    l2.image_router.fit_task(0, key0)
    l2.image_router.fit_task(1, key1)
    assert l2.route_images(torch.zeros(2, 3, 32, 32)).tolist() == [0, 1]


# ------------------------------------------------------------------------ optimiser (§5.1)
def test_released_recipe_is_sgd_with_per_epoch_cosine(tiny):
    method = build(LPIReleased, tiny)
    start(method, 0)
    params = list(method.trainable_parameters())
    optimizer, scheduler = method.configure_optimizer(params, epochs=10, steps_per_epoch=5)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 2e-4)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------ presets and configs
def test_presets_differ_only_in_the_documented_defaults():
    paper, released = LPIConfig(), LPIReleasedConfig()
    differ = {k for k, v in vars(paper).items() if getattr(released, k) != v}
    assert differ == {"depth", "interaction", "hlc_variant", "task_loss_form", "train_preprocess", "key_preprocess",
                      "eval_preprocess"}
    assert (released.depth, released.interaction, released.hlc_variant, released.task_loss_form) == \
        (1, False, "released", "released")
    assert get_method("lpi") is LPI and get_method("lpi_released") is LPIReleased
    cfg = method_config(LPI, {"rank": "8", "interaction": False, "hlc_weight": 0, "task_loss_form": "released"})
    assert (cfg.rank, cfg.interaction, cfg.hlc_weight, cfg.task_loss_form) == (8, False, 0.0, "released")


def test_shipped_coco_supercat_config_parses():
    config = build_config(REPO / "configs" / "lpi_coco_supercat.yaml")
    assert config.scenario == "coco_supercat" and config.backbone == "ViT-B-16:openai"
    assert config.methods == ["lpi_released", "lpi"]
    assert (config.training.epochs, config.training.batch_size) == (10, 64)
    # the 5k Karpathy test images, not every val2014 image (issue 9, item 11)
    assert config.scenario_options["split"] == "karpathy"
    for name in config.methods:
        params = method_config(get_method(name), config.method_params.get(name, {}))
        assert (params.prompt_length, params.rank, params.num_layers) == (16, 4, 9)


@pytest.mark.parametrize("cls", [LPIReleased, LPI])
def test_presets_pass_the_conformance_check(cls):
    report = check_method(cls)
    assert report.parameter_counts["per_task"] > 0 and report.parameter_counts["shared"] == 0


def test_cli_runs_both_presets_end_to_end_with_ablation_switches(tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--methods", "lpi,lpi_released", "--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1",
            "--batch-size", "8", "--output-dir", str(out), "--no-tables",
            "--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
            "--set", "scenario_options.captions_per_image=2", "--set", "scenario_options.tasks=[colours,backdrops]",
            "--set", "method_params.lpi.rank=8", "--set", "method_params.lpi.task_loss_form=released"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))}
    assert set(records) == {"lpi", "lpi_released"}
    paper, released = records["lpi"], records["lpi_released"]
    assert paper["config"]["method_params"]["lpi"]["rank"] == 8
    for stage in ("train_preprocess", "key_preprocess", "eval_preprocess"):  # the record says how images were fed
        assert released["config"]["method_params"]["lpi_released"][stage] == "reference"
    assert paper["config"]["method_params"]["lpi"]["eval_preprocess"] == "clip"
    assert paper["config"]["method_params"]["lpi"]["task_loss_form"] == "released"
    # clvl-tiny: Dv 96, Dt 64, 3 blocks, P 15; prompts 9r + 2*15r + 96r + 64r; interaction 2*(3r) + 97r + 65r + 96r
    # + 64r + 2*96 + 2*64
    assert released["costs"]["params_per_task"] == 4 * (9 + 30 + 96 + 64)
    assert paper["costs"]["params_per_task"] == 8 * (9 + 30 + 96 + 64) + 4 * (6 + 97 + 65 + 96 + 64) + 2 * (96 + 64)
    for record in records.values():
        routing = record["routing_accuracy"]
        assert routing is not None and all(0 <= routing[m][1][j] <= 100 for m in ("image", "text") for j in (0, 1))
        assert record["costs"]["forward_passes_per_query"] == 2
        assert record["recall"]["i2t"]["1"][1][0] is not None


# ------------------------------------------------------------------------ image preprocessing (issue 9, item 12)
def independent_reference_compose(size):
    """retrieval/utils/data.py's Coco/CocoEval default, written out with torchvision's defaults
    spelled explicitly: RandomResizedCrop(224) = scale (0.08, 1), ratio (3/4, 4/3), bilinear."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                            interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(p=0.5), T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def noise_image(seed=0, size=(57, 43)):
    from PIL import Image

    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy(), mode="RGB")


def test_released_preset_preprocesses_like_the_reference_at_every_stage(tiny):
    cfg = LPIReleasedConfig()
    assert (cfg.train_preprocess, cfg.key_preprocess, cfg.eval_preprocess) == ("reference",) * 3
    method = build(LPIReleased, tiny)
    expected = independent_reference_compose(tuple(tiny.image_size))
    image = noise_image()
    for stage in ("train", "eval"):
        outputs = []
        for seed in range(4):
            torch.manual_seed(seed)
            ours = method.image_transforms()[stage](image)
            torch.manual_seed(seed)
            assert torch.equal(ours, expected(image)), (stage, seed)
            outputs.append(ours)
        assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # random crops: not one fixed view
    # the paper preset keeps the harness's CLIP preprocessing
    paper = build(LPI, tiny)
    assert paper.image_transforms() == {"train": tiny.preprocess_train, "eval": tiny.preprocess_eval}


def test_the_harness_puts_the_methods_preprocessing_on_the_datasets():
    from benchmark.data.torch_datasets import load_image

    setup = tiny_setup(LPIReleased)
    gallery, pairs = setup.streams.galleries[0], setup.streams.train_pairs[0]
    expected = independent_reference_compose(tuple(setup.backbone.image_size))
    torch.manual_seed(3)
    image, _ = gallery[0]
    torch.manual_seed(3)
    assert torch.equal(image, expected(load_image(gallery.items[0])))
    torch.manual_seed(4)
    image = setup.streams.train_stream[0].dataset[0][0]  # through the Avalanche experience
    torch.manual_seed(4)
    assert torch.equal(image, expected(load_image(pairs.items[pairs.pair_image[0]])))


def test_routing_keys_are_fitted_with_key_preprocess():
    setup = tiny_setup(LPI, LPIConfig(key_preprocess="reference"))
    method, pairs = setup.method, setup.streams.train_pairs[0]
    calls = {"train": [], "keys": []}

    def spy(stage, transform):
        def call(image):
            calls[stage].append(transform(image))
            return calls[stage][-1]
        return call

    switch = method.image_transforms()["train"]
    switch.train, switch.keys = spy("train", switch.train), spy("keys", switch.keys)
    encoded = []
    original = setup.backbone.encode_image
    setup.backbone.encode_image = lambda images, *a, **k: (encoded.append(images), original(images, *a, **k))[1]
    try:
        method.before_training_exp(setup.train_data(0))
        method.after_training_exp(setup.train_data(0))
    finally:
        setup.backbone.encode_image = original
    n = len(pairs.items)  # image keys use each training image once (methods.common.routing.frozen_features)
    assert calls["train"] == [] and len(calls["keys"]) >= n
    # the image keys were fitted on exactly the key-preprocessed images
    assert torch.equal(torch.cat(encoded)[:n], torch.stack(calls["keys"][:n]))
    assert calls["keys"][0].shape[-2:] == torch.Size(setup.backbone.image_size)
    pairs[0]  # outside key fitting the training transform is back
    assert len(calls["train"]) == 1


def test_preprocess_options_are_checked(tiny):
    with pytest.raises(ValueError, match="eval_preprocess"):
        build(LPI, tiny, eval_preprocess="imagenet")


def test_lpi_preset_is_labelled_as_the_harness_recommendation_not_the_paper():
    """Issue 9, item 14: `lpi` mixes grounding, retrieval and a harness fix, so nothing may call
    it the paper's method; and no LPI file may point users at material outside the project."""
    import methods.lpi as package
    import methods.lpi.method as module

    texts = {"docs/methods/lpi.md": (REPO / "docs" / "methods" / "lpi.md").read_text(),
             "configs/lpi_coco_supercat.yaml": (REPO / "configs" / "lpi_coco_supercat.yaml").read_text(),
             "methods.lpi": package.__doc__, "methods.lpi.method": module.__doc__,
             "LPI": LPI.__doc__, "LPIConfig": LPIConfig.__doc__}
    for where, text in texts.items():
        lowered = text.lower()
        assert "[paper]" not in lowered and "the paper's method" not in lowered, where
        assert "shared/" not in text, where
    doc = texts["docs/methods/lpi.md"]
    assert "| `lpi` [harness] |" in doc and "recommendation" in " ".join(doc.split())
