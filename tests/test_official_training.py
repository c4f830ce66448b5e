"""The official training details of the prompt methods (issue 9, items 6-10): batch-scaled
learning rates and gradient clipping (L2P, DualPrompt), L2P's batch-wise selection at training,
DualPrompt's E-prompt hand-over between tasks, CODA-Prompt's own cosine schedule, S-Prompts'
first-task weight decay, and float32 selection and routing under bf16 autocast.

Every expected value is computed here by hand (plain formulas, float64 where precision matters),
never read back from the methods. Everything runs on the CPU with the random-weight ``clvl-tiny``
backbone of :mod:`benchmark.testing`.
"""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.provenance import protocol_card
from benchmark.testing import tiny_setup
from methods.base import TrainData
from methods.coda import CodaPrompt, CodaPromptConfig
from methods.common.routing import KMeansRouter, pairwise_distance
from methods.common.selection import frozen_cls_query, select_top_k
from methods.dualprompt import DualPrompt, DualPromptConfig
from methods.l2p import L2P, L2PConfig
from methods.sprompts import SPrompts, SPromptsConfig, TaskKeys

CPU = torch.device("cpu")
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _train_data(task: int) -> TrainData:
    return TrainData(task_id=task, task_name=f"task{task}", dataset=None, encode_batch_size=8, device=CPU)


def _trainable(method, task: int = 0) -> list[torch.nn.Parameter]:
    method.before_training_exp(_train_data(task))
    return [p for p in method.trainable_parameters() if p.requires_grad]


# ------------------------------------------------------------------ item 6: lr scaled by batch / 256
@pytest.mark.parametrize("cls, base", [(L2P, 0.03), (DualPrompt, 0.005)], ids=["l2p", "dualprompt"])
def test_learning_rate_is_the_batch_256_rate_scaled_to_the_batch(cls, base):
    """The official codebases run at lr * batch / 256; at batch 64 that is a quarter of lr."""
    method = cls(tiny_setup(L2P, L2PConfig(top_k=3)).backbone, None, 2)
    assert method.config.lr == base and method.config.lr_scaling == "linear_256"
    params = _trainable(method)
    method.train_batch_size = 64
    optimizer, scheduler = method.configure_optimizer(params, epochs=3, steps_per_epoch=5)
    assert scheduler is None  # constant, as the official configs
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base / 4)
    method.config.lr_scaling = "none"
    optimizer, _ = method.configure_optimizer(params, epochs=3, steps_per_epoch=5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base)


def test_the_strategy_tells_the_method_its_batch_size():
    """Through the harness's own loop: the optimizer runs at lr * TRAIN_BATCH / 256."""
    from benchmark.testing import TRAIN_BATCH

    setup = tiny_setup(L2P, L2PConfig(top_k=3, lr=0.02))
    strategy = setup.make_strategy()
    strategy.train(setup.streams.train_stream[0])
    assert setup.method.train_batch_size == TRAIN_BATCH
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * TRAIN_BATCH / 256)


@pytest.mark.parametrize("cls, config", [(L2PConfig, {"lr_scaling": "sqrt"}), (DualPromptConfig, {"lr_scaling": ""}),
                                         (L2PConfig, {"clip_grad_norm": 0.0}),
                                         (DualPromptConfig, {"clip_grad_norm": -1.0}),
                                         (CodaPromptConfig, {"lr_schedule": "half"}),
                                         (SPromptsConfig, {"first_task_weight_decay": -1e-4})])
def test_bad_training_options_are_one_line_errors(cls, config):
    with pytest.raises(ValueError) as error:
        cls(**config)
    assert "\n" not in str(error.value) and next(iter(config)) in str(error.value)


def test_protocol_card_shows_the_effective_learning_rate(tmp_path):
    record = {"schema": "clvl-benchmark/run-record/1", "run_id": "r", "method": "l2p",
              "config": {"methods": ["l2p"], "method_params": {"l2p": {"lr": 0.03, "lr_scaling": "linear_256"}},
                         "training": {"epochs": 3, "batch_size": 64}}}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    card = protocol_card(path)
    assert "effective lr = lr * batch_size / 256 = 0.03 * 64 / 256 = 0.0075" in card


# ------------------------------------------------------------------ item 9: gradient-norm clipping
@pytest.mark.parametrize("cls", [L2P, DualPrompt], ids=["l2p", "dualprompt"])
def test_gradients_are_clipped_to_norm_one_before_each_step(cls):
    method = cls(tiny_setup(L2P, L2PConfig(top_k=3)).backbone, None, 2)
    params = _trainable(method)
    method.train_batch_size = 64
    optimizer, _ = method.configure_optimizer(params, epochs=1, steps_per_epoch=1)
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert total > 1  # so clipping has something to do
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    for p, g in zip(params, grads):  # one global factor 1 / total, as torch / the official code
        torch.testing.assert_close(p.grad.double(), g.double() / total, rtol=1e-5, atol=1e-7)

    small = [g / (10 * total) for g in grads]  # norm 0.1: left alone
    for p, g in zip(params, small):
        p.grad = g.clone()
    optimizer.step()
    for p, g in zip(params, small):
        torch.testing.assert_close(p.grad, g)

    method.config.clip_grad_norm = None  # switched off: gradients untouched
    optimizer, _ = method.configure_optimizer(params, epochs=1, steps_per_epoch=1)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------ item 8: L2P batch-wise selection
def _hand_top_k(query: torch.Tensor, keys: torch.Tensor, k: int) -> list[list[int]]:
    q = query.double() / query.double().norm(dim=1, keepdim=True)
    kk = keys.double() / keys.double().norm(dim=1, keepdim=True)
    sims = (q @ kk.T).tolist()
    return [sorted(range(len(row)), key=lambda j: -row[j])[:k] for row in sims]


def test_batchwise_majority_on_a_hand_counted_batch():
    from methods.common.selection import batchwise_top_k

    chosen = torch.tensor([[3, 1], [3, 2], [1, 3], [2, 0]])  # counts: 3 three times, 1 and 2 twice, 0 once
    result = batchwise_top_k(chosen, pool_size=5)
    assert result.tolist() == [[3, 1]] * 4  # 3 first; 1 beats 2 on the tie (lower index, as jax.lax.top_k)


def test_l2p_trains_on_the_batch_s_most_frequent_prompts_and_tests_per_image():
    setup = tiny_setup(L2P, L2PConfig(top_k=3))
    method = setup.method
    images, tokens, tasks = setup.probe_batch()
    query = frozen_cls_query(setup.backbone, images)
    per_image = _hand_top_k(query, method.keys.detach(), 3)
    counts = collections.Counter(j for row in per_image for j in row)
    batch_set = sorted(counts, key=lambda j: (-counts[j], j))[:3]
    assert any(sorted(row) != sorted(batch_set) for row in per_image)  # the vote changes something here

    with torch.no_grad():
        features, _ = method.training_features(images, tokens, tasks)
        expected = method._encode_prompted(images, torch.tensor([batch_set] * len(images)))
    torch.testing.assert_close(features, expected)
    # The key-pull loss pulls the batch's keys: λ · mean_b Σ_{j in set} (1 - cos(q_b, k_j)).
    q, kk = F.normalize(query.double(), dim=1), F.normalize(method.keys.detach().double(), dim=1)
    pull = 0.1 * float((1 - q @ kk[batch_set].T).sum(dim=1).mean())
    assert float(method.extra_loss()) == pytest.approx(pull, rel=1e-5)

    # Test time: per image, whatever the rest of the batch is.
    with torch.no_grad():
        tested = method.encode_images(images)
        alone = torch.cat([method.encode_images(images[i:i + 1]) for i in range(len(images))])
        by_hand = method._encode_prompted(images, torch.tensor(per_image))
    torch.testing.assert_close(tested, by_hand)
    torch.testing.assert_close(tested, alone, rtol=1e-4, atol=1e-5)

    method.config.batchwise_prompt = False  # the option off: per image at training too
    with torch.no_grad():
        features, _ = method.training_features(images, tokens, tasks)
    torch.testing.assert_close(features, by_hand)


# ------------------------------------------------------------------ item 7: DualPrompt E-prompt hand-over
def test_dualprompt_e_prompt_starts_from_the_previous_task_s():
    setup = tiny_setup(DualPrompt)
    method = setup.method
    method.before_training_exp(_train_data(0))
    trained = torch.linspace(-3, 3, method.e_prompts[0].numel()).reshape(method.e_prompts[0].shape)
    with torch.no_grad():  # stands for task 0's training (values U(-1, 1) never takes)
        method.e_prompts[0].copy_(trained)
    key0 = method.e_keys[0].detach().clone()
    method.before_training_exp(_train_data(1))
    torch.testing.assert_close(method.e_prompts[1].detach(), trained)
    assert method.e_prompts[1].requires_grad and not method.e_prompts[0].requires_grad
    with torch.no_grad():  # a copy, not a shared tensor
        method.e_prompts[1].add_(1.0)
    torch.testing.assert_close(method.e_prompts[0].detach(), trained)
    key1 = method.e_keys[1].detach()  # keys start fresh (official shared_prompt_key off)
    assert not torch.equal(key1, key0) and float(key1.abs().max()) <= 1

    off = tiny_setup(DualPrompt, DualPromptConfig(shared_prompt_pool=False)).method
    off.before_training_exp(_train_data(0))
    with torch.no_grad():
        off.e_prompts[0].copy_(trained)
    off.before_training_exp(_train_data(1))
    assert float(off.e_prompts[1].detach().abs().max()) <= 1  # a fresh U(-1, 1) draw


# ------------------------------------------------------------------ item 9: CODA's schedule
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_coda_runs_the_authors_cosine_schedule():
    method = tiny_setup(CodaPrompt).method
    params = _trainable(method)
    epochs, lr = 5, method.config.lr

    def lrs(schedule: str, epochs: int) -> list[float]:
        method.config.lr_schedule = schedule
        optimizer, scheduler = method.configure_optimizer(params, epochs=epochs, steps_per_epoch=3)
        seen = []
        for _ in range(epochs):  # the harness steps the scheduler after every epoch
            seen.append(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step()
        return seen

    assert lrs("coda", epochs) == pytest.approx(official_coda_lrs(lr, epochs))
    assert lrs("coda", 3) == pytest.approx([lr, lr, lr * math.cos(0.495 * math.pi / 2)])  # by hand
    assert lrs("coda", 1) == pytest.approx([lr])
    assert lrs("cosine", epochs) == pytest.approx([lr * (1 + math.cos(math.pi * e / epochs)) / 2
                                                   for e in range(epochs)])
    assert lrs("constant", epochs) == pytest.approx([lr] * epochs)


# ------------------------------------------------------------------ item 9: S-Prompts' weight decay
def test_sprompts_first_task_has_its_own_weight_decay():
    method = tiny_setup(SPrompts).method
    decays = []
    for task in (0, 1):
        optimizer, _ = method.configure_optimizer(_trainable(method, task), epochs=2, steps_per_epoch=3)
        decays.append(optimizer.param_groups[0]["weight_decay"])
    assert decays == [5e-4, 2e-4]  # reference init_weight_decay, then weight_decay

    method = tiny_setup(SPrompts, SPromptsConfig(first_task_weight_decay=None)).method
    optimizer, _ = method.configure_optimizer(_trainable(method, 0), epochs=2, steps_per_epoch=3)
    assert optimizer.param_groups[0]["weight_decay"] == 2e-4


def official_coda_lrs(base_lr: float, epochs: int) -> list[float]:
    """The rate of each epoch as GT-RIPL/CODA-Prompt's loop produces it, simulated step by step:
    ``CosineSchedule`` (utils/schedulers.py) sets lr = base * cos(99 π c / (200 (K - 1))) for its
    counter c whenever it steps; its constructor steps to c = 0 and then sets c = -1; the loop
    (learners/default.py) steps it (c += 1) at the start of every epoch after the first."""
    def rate(counter):
        return base_lr * math.cos(99 * math.pi * counter / (200 * (epochs - 1)))

    lr, counter = rate(0), -1  # the constructor
    seen = []
    for epoch in range(epochs):
        if epoch > 0:
            counter += 1
            lr = rate(counter)
        seen.append(lr)
    return seen


# ------------------------------------------------------------------ item 10: float32 under bf16 autocast
def _near_ties(n: int = 64, m: int = 10, dim: int = 96, spread: float = 0.03, seed: int = 0):
    """Queries and keys whose cosine similarities differ by ~1e-3: far apart for float32 and
    float64, within one bf16 rounding step (2^-8 near 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    keys = base + spread * torch.randn(m, dim, generator=g)
    queries = base + spread * torch.randn(n, dim, generator=g)
    return queries, keys


def test_top_k_selection_under_bf16_autocast_is_the_float_selection():
    queries, keys = _near_ties()
    expected = _hand_top_k(queries, keys, 5)
    with torch.autocast(**BF16):  # what the old scoring did: the matmul in bf16
        rough = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    assert rough.dtype == torch.bfloat16
    assert rough.float().topk(5, dim=-1).indices.tolist() != expected  # the case can tell them apart
    with torch.autocast(**BF16):
        indices, similarity = select_top_k(queries, keys, 5)
    assert indices.tolist() == expected and similarity.dtype == torch.float32


def test_frozen_query_and_coda_weights_under_bf16_autocast_are_float32():
    setup = tiny_setup(CodaPrompt)
    method = setup.method
    method.before_training_exp(_train_data(0))
    images, _, _ = setup.probe_batch()
    query = frozen_cls_query(setup.backbone, images)
    alpha = method.attention_weights(query)
    with torch.autocast(**BF16):
        query_bf16 = frozen_cls_query(setup.backbone, images)
        alpha_bf16 = method.attention_weights(query)
    assert torch.equal(query_bf16, query) and torch.equal(alpha_bf16, alpha)
    # α by hand: cos(q ⊙ A_m, K_m), in float64.
    keys, attention = method.keys[0].detach().double(), method.attention[0].detach().double()
    hand = F.cosine_similarity(query.double()[:, None, None, :] * attention[None], keys[None], dim=-1)
    torch.testing.assert_close(alpha.double(), hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "l1", "cosine"])
def test_routing_under_bf16_autocast_is_the_float_routing(distance):
    """S-Prompts' (and LoRA per_task's) TaskKeys: the routing query and the distances in float32.
    Each item's own float32 feature has a key of each task on either side of it, one 5% further
    than the other: float32 tells them apart, a bf16 routing query (errors ~3e-3 per entry)
    does not."""
    setup = tiny_setup(SPrompts)
    backbone = setup.backbone
    images, _, _ = setup.probe_batch()
    with torch.no_grad():
        features = backbone.encode_image(images).float()
    g = torch.Generator().manual_seed(1)
    keys = TaskKeys(num_tasks=2, dim=features.shape[1], k=len(images), distance=distance)
    # A unit direction per item, orthogonal to its feature; task 0's key lies along it, task 1's
    # against it, one 5% further than the other (the same order in every distance).
    direction = torch.randn(features.shape, generator=g)
    direction = F.normalize(direction - (direction * features).sum(1, keepdim=True) * features, dim=1)
    near = torch.randint(0, 2, (len(images),), generator=g)
    scale = 3e-2 if distance == "cosine" else 1e-3  # 1 - cos is quadratic in the offset: float32 needs more
    for task, sign in ((0, 1.0), (1, -1.0)):
        step = torch.where(near == task, 1.0, 1.05)[:, None] * scale
        keys.router("image").keys[task] = features + sign * step * direction
        keys.router("image").fitted[task] = True
    stacked = keys.router("image").keys.reshape(-1, features.shape[1]).double()
    f = features.double()
    if distance == "cosine":
        d = 1 - F.normalize(f, dim=1) @ F.normalize(stacked, dim=1).T
    else:
        d = torch.cdist(f, stacked, p=2 if distance == "l2" else 1)
    expected = (d.argmin(dim=1) // len(images)).tolist()
    assert expected == near.tolist()  # the construction did what it says
    with torch.autocast(**BF16):
        rough = backbone.encode_image(images)  # the old routing query
    rough_routes = keys.router("image").route(rough.float()).tolist()
    assert rough_routes != expected  # bf16 queries do flip routes here
    with torch.autocast(**BF16):
        routes = keys.route(backbone, "image", images)
    assert routes.tolist() == expected
    router = keys.router("image")
    with torch.autocast(**BF16):
        assert router.route_inputs(backbone.encode_image, images).tolist() == expected
        assert pairwise_distance(features, stacked.float(), distance).dtype == torch.float32


def test_kmeans_router_distances_under_bf16_autocast_are_float32():
    queries, keys = _near_ties(n=64, m=6, seed=2)
    router = KMeansRouter(num_tasks=6, dim=keys.shape[1], k=1, distance="cosine")
    for task in range(6):
        router.fit_task(task, keys[task:task + 1])
    expected = [row[0] for row in _hand_top_k(queries, keys, 1)]  # nearest in cosine = most similar
    with torch.autocast(**BF16):
        rough = 1 - F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    assert rough.float().argmin(dim=1).tolist() != expected
    with torch.autocast(**BF16):
        assert router.route(queries).tolist() == expected


def test_lpi_routing_query_under_bf16_autocast_is_float32():
    """LPI computes its own frozen routing query: under bf16 autocast it must be the float32
    query (keys placed as in the S-Prompts test above, so that a bf16 query flips routes)."""
    from methods.lpi import LPI

    setup = tiny_setup(LPI)
    method, backbone = setup.method, setup.backbone
    images, _, _ = setup.probe_batch()
    with torch.no_grad():
        features = backbone.encode_image(images).float()
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(features.shape, generator=g)
    direction = F.normalize(direction - (direction * features).sum(1, keepdim=True) * features, dim=1)
    near = torch.randint(0, 2, (len(images),), generator=g)
    router = KMeansRouter(num_tasks=2, dim=features.shape[1], k=len(images), distance="l1")
    for task, sign in ((0, 1.0), (1, -1.0)):
        step = torch.where(near == task, 1.0, 1.05)[:, None] * 1e-3
        router.keys[task] = features + sign * step * direction
        router.fitted[task] = True
    method.image_router = router
    stacked = router.keys.reshape(-1, features.shape[1]).double()
    expected = (torch.cdist(features.double(), stacked, p=1).argmin(dim=1) // len(images)).tolist()
    assert expected == near.tolist()
    with torch.autocast(**BF16):
        assert router.route(backbone.encode_image(images).float()).tolist() != expected  # the old query
        assert method.route_images(images).tolist() == expected
