"""S-Prompts (``methods.sprompts``) and LoRA via peft (``methods.lora``).

Everything runs on the random-weight ``clvl-tiny`` backbone and the tiny two-task synthetic
stream of :mod:`benchmark.testing` (16 training images per task, 2 captions each, one epoch of
batch 8), so a whole training run takes about a second.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmark.testing import check_method, single_thread, tiny_setup
from methods import get_method
from methods.common.routing import KMeansRouter
from methods.lora import LoRA, LoraMethodConfig, SplitAttention, split_attention
from methods.sprompts import SPrompts, SPromptsConfig, TaskKeys


def snapshot(named) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def train_task_by_task(setup, after_each=None) -> list[dict]:
    """Train every task of the tiny stream; return a snapshot of the method's parameters after each."""
    strategy = setup.make_strategy()
    snaps = []
    for task, experience in enumerate(setup.streams.train_stream):
        strategy.train(experience)
        snaps.append(snapshot(setup.method.named_parameters()))
        if after_each is not None:
            after_each(task)
    return snaps


def pretrained_weights(backbone) -> dict[str, torch.Tensor]:
    """The backbone's own weights by their open_clip names (peft inserts ``.base_layer`` and adds ``lora_*``)."""
    return {name.replace(".base_layer", ""): p.detach().clone() for name, p in backbone.model.named_parameters()
            if "lora_" not in name}


# ============================================================================ conformance
@pytest.mark.parametrize("cls, config", [
    (SPrompts, SPromptsConfig()),
    (SPrompts, SPromptsConfig(distance="l1", optimizer="adamw", lr=1e-2)),
    (LoRA, LoraMethodConfig()),
    (LoRA, LoraMethodConfig(mode="per_task", targets=["attn", "mlp"], dropout=0.1, replay_memory=8)),
], ids=["sprompts-l2", "sprompts-l1", "lora-shared", "lora-per-task"])
def test_conformance(cls, config):
    report = check_method(cls, config)
    assert len(report.checks) == 8 and report.method == cls.name
    assert report.parameter_counts["trainable"] > 0


def test_registered_and_replay_is_avalanches():
    from avalanche.training.plugins import ReplayPlugin

    assert get_method("sprompts") is SPrompts and get_method("lora") is LoRA
    assert tiny_setup(LoRA).method.plugins() == []
    (plugin,) = tiny_setup(LoRA, LoraMethodConfig(mode="per_task", replay_memory=12)).method.plugins()
    assert isinstance(plugin, ReplayPlugin) and plugin.mem_size == 12
    with pytest.raises(ValueError, match="lora.mode"):
        tiny_setup(LoRA, LoraMethodConfig(mode="both"))
    with pytest.raises(ValueError, match="sprompts.distance"):
        tiny_setup(SPrompts, SPromptsConfig(distance="l3"))


# ============================================================================ routing
class IdentityEncoder:
    """A stand-in backbone whose features are the inputs themselves; counts encoder calls."""

    def __init__(self):
        self.calls = 0

    def encode_image(self, x):
        self.calls += 1
        return x

    encode_text = encode_image


def test_keys_route_known_clusters_to_their_tasks():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    keys = TaskKeys(num_tasks=3, dim=3, k=5, distance="l2")
    encoder = IdentityEncoder()
    assert keys.route(encoder, "image", centres) is None, "no keys yet: no routing"
    for task in (0, 1):  # task 2 is not fitted yet
        points = centres[task] + 0.3 * torch.randn(40, 3, generator=generator)
        keys.image.fit_task(task, points)
    keys._changed()
    queries = torch.cat([centres[t] + 0.3 * torch.randn(10, 3, generator=generator) for t in (0, 1)])
    routed = keys.route(encoder, "image", queries)
    assert routed.tolist() == [0] * 10 + [1] * 10
    calls = encoder.calls
    assert keys.route(encoder, "image", queries) is routed and encoder.calls == calls, "same batch: cached"
    # A point of the unfitted task 2 goes to a fitted task: routing never picks an unseen task.
    assert keys.route(encoder, "image", centres[2:]).item() in (0, 1)
    assert keys.route(encoder, "text", queries) is None, "caption keys are separate"
    calls = encoder.calls
    keys.image.fit_task(2, centres[2] + 0.3 * torch.randn(40, 3, generator=generator))
    keys._changed()
    assert keys.route(encoder, "image", centres[2:]).item() == 2 and encoder.calls == calls + 1


def test_l1_and_l2_distances_pick_different_tasks():
    # From the origin, key (2, 2) is nearer in L2 (2.83 < 3) and key (3, 0) in L1 (3 < 4).
    query = torch.zeros(1, 2)
    routed = {}
    for distance in ("l2", "l1"):
        router = KMeansRouter(num_tasks=2, dim=2, k=1, distance=distance)
        router.fit_task(0, torch.tensor([[2.0, 2.0]]))
        router.fit_task(1, torch.tensor([[3.0, 0.0]]))
        routed[distance] = router.route(query).item()
    assert routed == {"l2": 0, "l1": 1}
    setup = tiny_setup(SPrompts, SPromptsConfig(distance="l1", keys_per_task=3))
    assert setup.method.keys.image.distance == setup.method.keys.text.distance == "l1"
    assert setup.method.keys.image.keys.shape == (2, 3, setup.backbone.embed_dim)


# ============================================================================ S-Prompts training
@pytest.fixture(scope="module")
def sprompts_run():
    with single_thread():
        setup = tiny_setup(SPrompts)
        backbone_before = snapshot(setup.backbone.named_parameters())
        inits = []
        strategy = setup.make_strategy()
        original = setup.method.before_training_exp

        def record_init(data):  # the prompts a task starts from
            original(data)
            inits.append(snapshot(setup.method.named_parameters()))

        setup.method.before_training_exp = record_init
        snaps = []
        for experience in setup.streams.train_stream:
            strategy.train(experience)
            snaps.append(snapshot(setup.method.named_parameters()))
        del setup.method.before_training_exp
    return {"setup": setup, "backbone_before": backbone_before, "inits": inits, "snaps": snaps}


def test_sprompts_trains_only_the_current_tasks_prompts(sprompts_run):
    setup, inits, snaps = sprompts_run["setup"], sprompts_run["inits"], sprompts_run["snaps"]
    method = setup.method
    assert changed(sprompts_run["backbone_before"], snapshot(setup.backbone.named_parameters())) == set()
    # Task 0 changed only its own prompts; task 1 only its own; task 0's are bit-identical afterwards.
    assert changed(inits[0], snaps[0]) == {"image_prompts.0", "text_prompts.0"}
    assert changed(inits[1], snaps[1]) == {"image_prompts.1", "text_prompts.1"}
    assert torch.equal(snaps[0]["image_prompts.0"], snaps[1]["image_prompts.0"])
    assert torch.equal(snaps[0]["text_prompts.0"], snaps[1]["text_prompts.0"])
    assert [p.requires_grad for p in method.image_prompts] == [False, True]
    # Prompt shapes: 10 image tokens of the vision width, the CoOp context clipped to 15 on a 32-token context.
    assert method.image_prompts[0].shape == (10, setup.backbone.vision_width)
    assert method.text_prompts[0].shape == (15, setup.backbone.text_width)
    assert bool(method.keys.image.fitted.all()) and bool(method.keys.text.fitted.all())


@torch.no_grad()
def test_sprompts_encodes_each_item_with_its_tasks_prompts(sprompts_run):
    setup = sprompts_run["setup"]
    method = setup.method.eval()
    images, tokens, tasks = setup.probe_batch()
    mixed_i, mixed_t = method.encode_images(images, tasks), method.encode_texts(tokens, tasks)
    for task in (0, 1):
        ids = torch.full((len(images),), task)
        alone_i, alone_t = method.encode_images(images, ids), method.encode_texts(tokens, ids)
        mask = tasks == task
        torch.testing.assert_close(mixed_i[mask], alone_i[mask], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed_t[mask], alone_t[mask], rtol=0, atol=1e-6)
    assert not torch.allclose(method.encode_images(images, torch.zeros_like(tasks)),
                              method.encode_images(images, torch.ones_like(tasks)))
    # A task without prompts (not trained yet) gets the plain backbone.
    unseen = torch.full_like(tasks, 5)
    torch.testing.assert_close(method.encode_images(images, unseen), setup.backbone.encode_image(images))
    torch.testing.assert_close(method.encode_texts(tokens, unseen), setup.backbone.encode_text(tokens))
    # Inferred identity: each modality is routed by its own keys, then encoded with the routed prompts.
    routed_i, routed_t = method.route_images(images), method.route_texts(tokens)
    torch.testing.assert_close(method.encode_images(images), method.encode_images(images, routed_i))
    torch.testing.assert_close(method.encode_texts(tokens), method.encode_texts(tokens, routed_t))
    assert set(routed_i.tolist()) <= {0, 1} and set(routed_t.tolist()) <= {0, 1}


# ============================================================================ LoRA
def test_lora_adapters_are_peft_layers_on_the_chosen_modules():
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear

    def adapted(block):
        return {name for name in ("q_proj", "k_proj", "v_proj", "out_proj") if isinstance(getattr(block.attn, name),
                                                                                        LoraLinear)}

    method = tiny_setup(LoRA, LoraMethodConfig(targets=["attn", "mlp"])).method
    assert isinstance(method.peft_model, PeftModel) and method.peft_model.base_model.model is method.backbone.model
    for blocks in (method.backbone.vision_blocks, method.backbone.text_blocks):
        for block in blocks:
            assert isinstance(block.attn, SplitAttention)
            assert adapted(block) == {"q_proj", "k_proj", "v_proj", "out_proj"}
            assert isinstance(block.mlp.c_fc, LoraLinear) and isinstance(block.mlp.c_proj, LoraLinear)
    default = tiny_setup(LoRA).method  # W_q and W_v, as in the paper
    for block in [*default.backbone.vision_blocks, *default.backbone.text_blocks]:
        assert adapted(block) == {"q_proj", "v_proj"}
    assert not any(isinstance(b.mlp.c_fc, LoraLinear) for b in default.backbone.vision_blocks)
    visual_only = tiny_setup(LoRA, LoraMethodConfig(encoders=["visual"])).method
    assert all(adapted(b) == {"q_proj", "v_proj"} for b in visual_only.backbone.vision_blocks)
    # the text tower is left as open_clip built it
    assert all(type(b.attn) is torch.nn.MultiheadAttention for b in visual_only.backbone.text_blocks)
    with pytest.raises(ValueError, match="lora.targets"):
        tiny_setup(LoRA, LoraMethodConfig(targets=["qkv"]))


def open_clip_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of split attention (``attn.q_proj`` / ``k_proj`` / ``v_proj``) packed back into
    open_clip's ``attn.in_proj_weight`` / ``in_proj_bias`` (rows q, k, v)."""
    packed = {}
    for name, value in weights.items():
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".attn.{proj}." in name:
                prefix, kind = name.split(f".attn.{proj}.")
                packed.setdefault(f"{prefix}.attn.in_proj_{kind}", {})[proj] = value
                break
        else:
            packed[name] = value
    return {name: torch.cat([value[p] for p in ("q_proj", "k_proj", "v_proj")]) if isinstance(value, dict) else value
            for name, value in packed.items()}


def _plain_parts(backbone):
    """A fresh, adapter-free open_clip model with the tiny backbone's pretrained weights."""
    import open_clip

    model = open_clip.create_model("clvl-tiny")
    model.load_state_dict(open_clip_layout(pretrained_weights(backbone)))
    model.requires_grad_(False)
    return model, backbone.preprocess_train, backbone.preprocess_eval, backbone.tokenizer, backbone.spec


@pytest.fixture(scope="module", params=["shared", "per_task"])
def lora_run(request):
    with single_thread():
        setup = tiny_setup(LoRA, LoraMethodConfig(mode=request.param, lr=1e-2))
        pretrained = pretrained_weights(setup.backbone)
        probe = setup.probe_batch()
        with torch.no_grad():
            plain = _plain_parts(setup.backbone)[0].eval()
            base_features = (plain.encode_image(probe[0], normalize=True), plain.encode_text(probe[1], normalize=True))
        snaps = train_task_by_task(setup)
    return {"setup": setup, "mode": request.param, "pretrained": pretrained, "snaps": snaps, "probe": probe,
            "base_features": base_features}


def test_lora_keeps_the_backbone_bit_identical(lora_run):
    setup = lora_run["setup"]
    after = pretrained_weights(setup.backbone)
    assert changed(lora_run["pretrained"], after) == set(), "peft's merge/unmerge must not move frozen weights"
    # Only LoRA factors changed, and in per_task mode each task changed only its own adapter.
    snaps = lora_run["snaps"]
    lora_names = {n for n in snaps[0] if "lora_" in n}
    if lora_run["mode"] == "shared":
        assert changed(snaps[0], snaps[1]) and changed(snaps[0], snaps[1]) <= lora_names
        assert all(".shared." in n for n in lora_names)
    else:
        assert set(snaps[0]) < set(snaps[1]), "task 1's adapter is added when task 1 starts"
        task0 = {n for n in snaps[0] if ".task0." in n}
        assert task0 and all(torch.equal(snaps[0][n], snaps[1][n]) for n in task0), "task 0's adapter changed later"
        assert {n for n in snaps[1] if ".task1." in n and "lora_B" in n and snaps[1][n].abs().sum() > 0}, \
            "task 1's adapter did not train (its B factors are still zero)"
        assert setup.method.adapters() == ["task0", "task1"]


@torch.no_grad()
def test_lora_changes_features_and_disabling_gives_the_pretrained_model(lora_run):
    setup, (images, tokens, tasks) = lora_run["setup"], lora_run["probe"]
    method = setup.method.eval()
    base_i, base_t = lora_run["base_features"]
    ids = tasks if lora_run["mode"] == "per_task" else None
    assert not torch.allclose(method.encode_images(images, ids), base_i, atol=1e-4)
    assert not torch.allclose(method.encode_texts(tokens, ids), base_t, atol=1e-4)
    with method.peft_model.disable_adapter():
        assert torch.equal(setup.backbone.encode_image(images), base_i)
        setup.backbone.cut_text = False  # all 77 positions, as plain open_clip runs them: bit for bit
        try:
            assert torch.equal(setup.backbone.encode_text(tokens), base_t)
        finally:
            setup.backbone.cut_text = True
        torch.testing.assert_close(setup.backbone.encode_text(tokens), base_t, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_lora_per_task_encodes_groups_with_their_adapters(lora_run):
    if lora_run["mode"] != "per_task":
        pytest.skip("shared mode has one adapter")
    setup, (images, tokens, tasks) = lora_run["setup"], lora_run["probe"]
    method = setup.method.eval()
    mixed = method.encode_images(images, tasks)
    for task in (0, 1):
        mask = tasks == task
        method.peft_model.set_adapter(f"task{task}")
        torch.testing.assert_close(mixed[mask], setup.backbone.encode_image(images[mask]), rtol=0, atol=1e-6)
    method._active = None  # the test switched adapters behind the method's back
    routed = method.route_texts(tokens)
    torch.testing.assert_close(method.encode_texts(tokens), method.encode_texts(tokens, routed))
    assert method.forward_passes == 2
    assert not any(p.requires_grad for n, p in method.named_parameters() if ".task0." in n)


def test_lora_adapters_round_trip_through_peft(lora_run, tmp_path):
    from peft import PeftModel

    setup, (images, tokens, tasks) = lora_run["setup"], lora_run["probe"]
    method = setup.method.eval()
    method.save_adapters(tmp_path)
    names = method.adapters()
    for name in names:
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = tasks if lora_run["mode"] == "per_task" else None
    with torch.no_grad():
        expected = method.encode_images(images, ids), method.encode_texts(tokens, ids)
        # The harness's way back: a fresh method, adapters loaded through peft.
        fresh = tiny_setup(LoRA, method.config).method.eval()
        fresh.load_adapters(tmp_path)
        assert fresh.adapters() == names
        torch.testing.assert_close(fresh.encode_images(images, ids), expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(fresh.encode_texts(tokens, ids), expected[1], rtol=0, atol=1e-6)
        # peft's own way, on a plain open_clip model with its attention split: the last adapter
        # reproduces the method's features.
        plain = _plain_parts(setup.backbone)[0].eval()
        split_attention(plain, method.config.encoders)
        loaded = PeftModel.from_pretrained(plain, str(tmp_path / names[-1]), adapter_name=names[-1])
        from benchmark.backbone import ClipBackbone

        wrapped = ClipBackbone(loaded.base_model.model, None, None, None, "plain+peft")
        last = torch.full_like(tasks, len(names) - 1) if ids is not None else None
        torch.testing.assert_close(wrapped.encode_image(images), method.encode_images(images, last),
                                   rtol=0, atol=1e-6)


# ============================================================================ parameter counts
def lora_formula(backbone, rank: int, projections: int = 2, mlp: bool = False) -> int:
    """r (d_in + d_out) per adapted weight: 2 r d for each of ``projections`` d x d attention
    projections of a block, 2 r (d + h) for its MLP."""
    total = 0
    for blocks in (backbone.vision_blocks, backbone.text_blocks):
        for block in blocks:
            d = block.attn.embed_dim
            total += projections * 2 * rank * d
            if mlp:
                total += 2 * rank * (d + block.mlp.c_fc.out_features)
    return total


def test_parameter_counts_follow_the_formulas():
    setup = tiny_setup(SPrompts)
    method, backbone = setup.method, setup.backbone
    per_task = 10 * backbone.vision_width + 15 * backbone.text_width  # 15: the context clipped to (32 - 1) // 2
    for task in (0, 1):
        method.before_training_exp(setup.train_data(task))
    counts = method.parameter_counts()
    assert counts["per_task"] == per_task == 1920 and counts["shared"] == 0
    assert counts["added"] == 2 * per_task and counts["trainable"] == per_task
    assert counts["backbone"] == sum(p.numel() for p in backbone.parameters())

    for mode, rank, targets in (("shared", 8, ["q", "v"]), ("per_task", 2, ["attn", "mlp"])):
        config = LoraMethodConfig(mode=mode, rank=rank, targets=targets)
        setup = tiny_setup(LoRA, config)
        for task in (0, 1):
            setup.method.before_training_exp(setup.train_data(task))
        counts = setup.method.parameter_counts()
        size = lora_formula(setup.backbone, rank, projections=2 if targets == ["q", "v"] else 4, mlp="mlp" in targets)
        assert mode != "shared" or size == 8 * 4 * (3 * 96 + 3 * 64) == 15360
        adapters = 2 if mode == "per_task" else 1
        assert counts["adapters"] == adapters * size
        assert counts["per_task"] == (size if mode == "per_task" else 0)
        assert counts["shared"] == (size if mode == "shared" else 0)
        assert counts["trainable"] == size  # the current task's adapter, or the shared one
        lora_live = sum(p.numel() for n, p in setup.method.named_parameters() if "lora_" in n)
        assert lora_live == adapters * size
        pretrained = sum(p.numel() for p in pretrained_weights(setup.backbone).values())
        # peft's adapters sit inside the backbone's modules but are counted as the method's own
        assert counts["injected"] == lora_live
        assert counts["backbone"] == pretrained
        assert counts["added"] == lora_live == counts["total"] - pretrained


def test_parameter_counts_on_vit_b16(vit_b16):
    """The ViT-B/16 sizes quoted in the README and the method pages, from live modules."""
    import copy

    from methods.base import TrainData

    def start(method, task):
        method.before_training_exp(TrainData(task, f"task{task}", None, 8, torch.device("cpu")))

    sprompts = SPrompts(vit_b16, SPromptsConfig(), num_tasks=2)
    for task in (0, 1):
        start(sprompts, task)
    counts = sprompts.parameter_counts()
    assert counts["per_task"] == 10 * 768 + 16 * 512 == 15_872  # the CoOp context fits 77 positions whole
    assert counts["added"] == 2 * 15_872 and counts["shared"] == 0

    # Default W_q and W_v: 2 * 2 r d per block; all four attention projections: 4 * 2 r d.
    for targets, projections, size in ((["q", "v"], 2, 491_520), (["attn"], 4, 983_040)):
        backbone = copy.deepcopy(vit_b16)  # LoRA splits the attention and peft injects its layers
        lora = LoRA(backbone, LoraMethodConfig(targets=targets), num_tasks=2)
        start(lora, 0)
        counts = lora.parameter_counts()
        assert counts["shared"] == counts["added"] == lora_formula(backbone, 8, projections) == size
        assert size == projections * 2 * 8 * (12 * 768 + 12 * 512)
        assert counts["backbone"] == sum(p.numel() for p in vit_b16.parameters())  # the split moves, adds nothing


# ============================================================================ end to end
def test_cli_runs_both_methods(tmp_path):
    from benchmark.cli import main

    out = tmp_path / "out"
    argv = ["run", "--methods", "sprompts,lora", "--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1",
            "--batch-size", "8", "--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
            "--set", "scenario_options.captions_per_image=2", "--set", "scenario_options.tasks=[colours,backdrops]",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]
    assert main(argv) == 0
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(records) == {"sprompts", "lora"}
    routing = records["sprompts"]["routing_accuracy"]
    assert set(routing) == {"image", "text"}
    for modality in ("image", "text"):
        last = routing[modality][-1]
        assert len(last) == 2 and all(isinstance(v, float) and 0 <= v <= 100 for v in last)
    assert records["lora"]["routing_accuracy"] is None  # shared mode does not route
    assert records["sprompts"]["costs"]["params_per_task"] == 1920
    assert records["lora"]["costs"]["params_shared"] == 15360  # r = 8 on W_q, W_v: 8 * 4 * (3 * 96 + 3 * 64)
