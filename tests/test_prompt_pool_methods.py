"""L2P, DualPrompt and CODA-Prompt (methods/l2p.py, dualprompt.py, coda.py) and the key-query
selection they share (methods/common/selection.py).

Everything runs on the CPU with the random-weight ``clvl-tiny`` backbone (3 vision blocks, width
96, 17 image tokens) and the tiny two-task synthetic scenario of ``benchmark.testing``; one test
builds a ViT-B/16 *without* weights to check the published L2P parameter count.

Most tests run L2P with ``top_k=3`` (15 prompt tokens) to keep them quick; one checks that the
paper's 5 × 5 = 25 prompt tokens work too on a backbone with only 17 image tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from benchmark.backbone import Prompts
from benchmark.cli import main
from benchmark.testing import CHECKS, check_method, tiny_setup
from methods import get_method
from methods.base import TrainData
from methods.coda import CodaPrompt, CodaPromptConfig
from methods.common.selection import (clip_layers, cosine_similarity, frozen_cls_query, gram_schmidt, pull_loss,
                                      select_top_k)
from methods.dualprompt import DualPrompt, DualPromptConfig
from methods.l2p import L2P, L2PConfig

TINY_L2P = L2PConfig(top_k=3)  # 15 prompt tokens: quicker than the paper's 25
CASES = [(L2P, TINY_L2P), (DualPrompt, None), (CodaPrompt, None)]
IDS = ["l2p", "dualprompt", "coda"]


def _train_data(task: int) -> TrainData:
    """Enough of a TrainData for before_training_exp (the methods only read task_id)."""
    return TrainData(task_id=task, task_name=f"task{task}", dataset=None, encode_batch_size=8, device=torch.device("cpu"))


# ------------------------------------------------------------------------------ registry, conformance
def test_methods_are_registered():
    assert get_method("l2p") is L2P and get_method("dualprompt") is DualPrompt and get_method("coda") is CodaPrompt
    citations = {L2P: "Wang et al., CVPR 2022", DualPrompt: "Wang et al., ECCV", CodaPrompt: "Smith et al., CVPR 2023"}
    for cls, citation in citations.items():
        assert cls.forward_passes == 2
        assert cls.task_identity == frozenset({"inferred", "given"})
        module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__
        assert citation in module_doc and "adapted to image-text retrieval" in module_doc and "Text side" in module_doc


@pytest.mark.parametrize("cls, config", CASES, ids=IDS)
def test_conformance(cls, config):
    report = check_method(cls, config)
    assert report.checks == list(CHECKS)
    counts = report.parameter_counts
    assert {"per_task", "shared"} <= set(counts)
    assert counts["added"] == counts["shared"] + 2 * counts["per_task"]  # two tasks


def test_l2p_takes_more_prompt_tokens_than_the_image_has():
    """The paper's 5 prompts × 5 tokens (25) on clvl-tiny's 17 image tokens: the sequence grows to
    42, and the feature is still the [CLS] output (it equals the backbone's own prompted pass)."""
    setup = tiny_setup(L2P, L2PConfig())
    method = setup.method
    images, _, _ = setup.probe_batch()
    indices, _ = method.select(frozen_cls_query(setup.backbone, images))
    assert indices.shape[1] == 5
    tokens = method.prompts[indices].flatten(1, 2)
    assert tokens.shape[1] == 25 > setup.backbone.visual.positional_embedding.shape[0]
    expected = setup.backbone.encode_image(images, Prompts(tokens=tokens))
    torch.testing.assert_close(method.encode_images(images), expected)
    assert torch.isfinite(expected).all()


# ------------------------------------------------------------------------------ the shared mechanism
def test_frozen_query_is_the_pre_projection_cls_feature():
    setup = tiny_setup(L2P, TINY_L2P)
    images, _, _ = setup.probe_batch()
    query = frozen_cls_query(setup.backbone, images)
    visual = setup.backbone.visual
    assert query.shape == (len(images), setup.backbone.vision_width) and not query.requires_grad
    # Projected, it is exactly the pretrained image feature (unnormalised).
    torch.testing.assert_close(query @ visual.proj, setup.backbone.encode_image(images, normalize=False))


def test_top_k_selection_and_pull_loss_on_a_constructed_example():
    keys = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [1.0, 1.0, 0, 0]])
    queries = torch.tensor([[0.9, 0.1, 0, 0],    # closest: key 0, then key 4 (cos .78), then key 1
                            [0, 0, 0.2, 1.0],    # key 3, then key 2
                            [1.0, 0.9, 0, 0.1]])  # key 4, then key 0 (cos .74) before key 1 (.67)
    indices, similarity = select_top_k(queries, keys, 2)
    assert indices.tolist() == [[0, 4], [3, 2], [4, 0]]
    expected = torch.stack([F.cosine_similarity(q[None], keys) for q in queries])
    torch.testing.assert_close(similarity, expected)
    # pull loss = mean over queries of the summed cosine distances to the chosen keys
    manual = sum(sum(1 - F.cosine_similarity(q, keys[j], dim=0) for j in row) for q, row in
                 zip(queries, indices.tolist())) / len(queries)
    torch.testing.assert_close(pull_loss(similarity, indices), manual)
    torch.testing.assert_close(pull_loss(similarity, torch.tensor([1, 2, 3])),
                               (3 - expected[0, 1] - expected[1, 2] - expected[2, 3]) / 3)
    with pytest.raises(ValueError):
        select_top_k(queries, keys, 6)


def test_clip_layers_keeps_the_blocks_that_exist():
    assert clip_layers([0, 1], 3) == (0, 1)
    assert clip_layers([2, 3, 4], 3) == (2,)
    assert clip_layers([4, 0, 2, 2], 12) == (0, 2, 4)
    with pytest.raises(ValueError):
        clip_layers([-1], 3)


def test_gram_schmidt_is_orthonormal_against_earlier_rows_until_the_space_is_full():
    torch.manual_seed(0)
    earlier = torch.randn(5, 16) * 3  # trained rows are neither unit-norm nor orthogonal
    new = gram_schmidt(6, 16, earlier)
    torch.testing.assert_close(new @ new.T, torch.eye(6), atol=1e-5, rtol=0)
    assert (new @ earlier.T).abs().max() < 1e-4
    full = gram_schmidt(4, 8, torch.randn(6, 8))  # only 2 directions are left in 8 dimensions
    torch.testing.assert_close(full.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(full[:2] @ full[:2].T, torch.eye(2), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ per-method selection
def test_l2p_selects_by_its_keys_and_adds_the_pull_loss():
    setup = tiny_setup(L2P, L2PConfig(top_k=2, pull_weight=0.1))
    method = setup.method
    images, tokens, tasks = setup.probe_batch()
    query = frozen_cls_query(setup.backbone, images)
    with torch.no_grad():  # keys 3 and 7 point at the query of image 0, keys 1 and 5 away from it
        method.keys.copy_(torch.randn_like(method.keys) * 0.01)
        method.keys[3] = query[0]
        method.keys[7] = query[0] + 0.3 * query[0].norm() * F.normalize(torch.randn_like(query[0]), dim=0)
        method.keys[1] = -query[0]
    indices, _ = method.select(query)
    assert indices[0].tolist() == [3, 7]
    assert 1 not in indices[0].tolist()
    method.training_features(images, tokens, tasks)
    chosen = method.keys[indices]  # [B, 2, D]
    manual = 0.1 * (1 - F.cosine_similarity(query[:, None, :], chosen, dim=-1)).sum(dim=1).mean()
    torch.testing.assert_close(method.extra_loss(), manual)
    # the prompted image is encoded with exactly the chosen prompts, most similar first
    expected = setup.backbone.encode_image(images, Prompts(tokens=method.prompts[indices].flatten(1, 2)))
    torch.testing.assert_close(method.encode_images(images), expected)
    torch.testing.assert_close(method.encode_images(images, tasks), expected)  # task-agnostic
    assert method.route_images(images) is None


def test_dualprompt_uses_the_true_task_in_training_and_matched_keys_at_test():
    # Fresh E-prompts per task: untrained, a shared pool would hand task 0's prompt to task 1
    # unchanged and the two tasks' features could not differ.
    setup = tiny_setup(DualPrompt, DualPromptConfig(match_weight=0.5, shared_prompt_pool=False))
    method = setup.method
    for task in range(2):
        method.before_training_exp(setup.train_data(task))
    images, tokens, tasks = setup.probe_batch()  # 4 images of task 0, then 4 of task 1
    query = frozen_cls_query(setup.backbone, images)
    with torch.no_grad():  # key t = mean query of task t's probe images
        for t in range(2):
            method.e_keys[t].copy_(query[tasks == t].mean(dim=0))
    expected_route = cosine_similarity(query, torch.stack(list(method.e_keys))).argmax(dim=1)
    assert torch.equal(method.route_images(images), expected_route)
    # Construct keys with a known answer: image i matches key (i % 2).
    with torch.no_grad():
        method.e_keys[0].copy_(query[0])
        method.e_keys[1].copy_(query[1])
    assert method.route_images(images)[:2].tolist() == [0, 1]

    method.training_features(images, tokens, tasks)  # matching loss with the *true* task's key
    keys = torch.stack(list(method.e_keys))
    manual = 0.5 * (1 - F.cosine_similarity(query, keys[tasks], dim=-1)).mean()
    torch.testing.assert_close(method.extra_loss(), manual)

    # given: the given task's E-prompt; inferred: the matched one
    routed = method.route_images(images)
    torch.testing.assert_close(method.encode_images(images), method.encode_images(images, routed))
    ones = torch.ones_like(tasks)
    assert not torch.allclose(method.encode_images(images, ones)[0], method.encode_images(images)[0])
    # a task without an E-prompt yet (tasks=all protocol) falls back to key matching
    torch.testing.assert_close(method.encode_images(images, torch.full_like(tasks, 5)), method.encode_images(images))


def test_dualprompt_prefixes_go_to_the_paper_layers_clipped_to_the_backbone():
    setup = tiny_setup(DualPrompt)
    method = setup.method
    assert method.g_layers == (0, 1) and method.e_layers == (2,)  # paper: G 0-1, E 2-4; clvl-tiny has 3 blocks
    assert method._prompts(None, 2).prefix.keys() == {0, 1}  # before the first task: G-prompt only
    method.before_training_exp(setup.train_data(0))
    prompts = method._prompts(torch.tensor([0, 0]), 2)
    assert prompts.prefix.keys() == {0, 1, 2}
    assert prompts.prefix[0][0].shape == (2, 5, 96) and prompts.prefix[2][0].shape == (2, 20, 96)
    assert torch.equal(prompts.prefix[2][1][0], method.e_prompts[0][0, 1])  # value half of block 2's E-prompt


def test_coda_attention_weights_and_prompt_mixing_match_the_formula():
    setup = tiny_setup(CodaPrompt, CodaPromptConfig(pool_size=8))
    method = setup.method
    for task in range(2):
        method.before_training_exp(setup.train_data(task))
    assert method.layers == (0, 1, 2) and method.num_components == 8  # 4 per task
    # New components are orthonormal to the earlier task's, block by block.
    for params in (method.keys, method.attention):
        for layer in range(3):
            old, new = params[0][layer].detach(), params[1][layer].detach()
            assert (new @ old.T).abs().max() < 1e-5
            torch.testing.assert_close(new @ new.T, torch.eye(4), atol=1e-5, rtol=0)
    flat = [p[0].detach().reshape(4, -1) for p in method.prompts]
    assert (flat[1] @ flat[0].T).abs().max() < 1e-5
    images, _, _ = setup.probe_batch()
    query = frozen_cls_query(setup.backbone, images)
    prompts, keys, attention = method._components()
    alpha = method.attention_weights(query)
    manual = F.cosine_similarity(query[:, None, None, :] * attention[None], keys[None], dim=-1)  # [B, layer, M]
    torch.testing.assert_close(alpha, manual)
    # A component whose key equals the attended query gets weight 1.
    with torch.no_grad():
        method.keys[1][0, 2] = query[0] * method.attention[1][0, 2]
    assert math.isclose(float(method.attention_weights(query)[0, 0, 6].detach()), 1.0, rel_tol=1e-5)
    mixed = torch.einsum("bm,mpd->bpd", method.attention_weights(query)[:, 1], method._components()[0][1])
    key, value = method._prompts(query).prefix[1]
    torch.testing.assert_close(key, mixed[:, :4])
    torch.testing.assert_close(value, mixed[:, 4:])
    assert method.route_images(images) is None
    torch.testing.assert_close(method.encode_images(images, torch.zeros(len(images), dtype=torch.long)),
                               method.encode_images(images))  # task-agnostic


# ------------------------------------------------------------------------------ training two tasks
class Snapshots(SupervisedPlugin):
    """Method parameters at the start of each task (after before_training_exp) and at its end."""

    def __init__(self, method):
        super().__init__()
        self.method = method
        self.start: dict[int, dict] = {}
        self.end: dict[int, dict] = {}

    def _state(self):
        return {n: p.detach().clone() for n, p in self.method.named_parameters() if not n.startswith("backbone.")}

    def before_training_exp(self, strategy, **kwargs):
        self.start[strategy.experience.current_experience] = self._state()

    def after_training_exp(self, strategy, **kwargs):
        self.end[strategy.experience.current_experience] = self._state()


EXPECTED_CHANGES = {  # parameters each task may (and must) change
    "l2p": [{"prompts", "keys"}, {"prompts", "keys"}],
    "dualprompt": [{"g_prompt", "e_prompts.0", "e_keys.0"}, {"g_prompt", "e_prompts.1", "e_keys.1"}],
    "coda": [{"prompts.0", "keys.0", "attention.0"}, {"prompts.1", "keys.1", "attention.1"}],
}


@pytest.mark.parametrize("cls, config", CASES, ids=IDS)
def test_training_two_tasks_changes_only_the_intended_parameters(cls, config):
    setup = tiny_setup(cls, config)
    method = setup.method
    backbone_before = {n: p.detach().clone() for n, p in setup.backbone.named_parameters()}
    snapshots = Snapshots(method)
    strategy = setup.make_strategy(plugins=[snapshots])
    for experience in setup.streams.train_stream:
        strategy.train(experience)

    for name, param in setup.backbone.named_parameters():
        assert torch.equal(param, backbone_before[name]), f"backbone parameter {name} changed"
        assert not param.requires_grad
    for task, expected in enumerate(EXPECTED_CHANGES[cls.name]):
        start, end = snapshots.start[task], snapshots.end[task]
        changed = {n for n in end if n not in start or not torch.equal(start[n], end[n])}
        assert changed == expected, f"task {task}: changed {sorted(changed)}, expected {sorted(expected)}"
    if cls is not L2P:  # task 0's own parameters are bit-identical after task 1
        final = snapshots.end[1]
        for name in EXPECTED_CHANGES[cls.name][0] - {"g_prompt"}:
            assert torch.equal(final[name], snapshots.end[0][name]), f"{name} changed after its task"


# ------------------------------------------------------------------------------ parameter counts
def test_parameter_counts_follow_the_formula_on_the_tiny_backbone():
    D, depth = 96, 3
    l2p = tiny_setup(L2P, TINY_L2P).method
    assert l2p.parameter_counts()["added"] == l2p.parameter_counts()["shared"] == 10 * 5 * D + 10 * D == 5_760

    dual = tiny_setup(DualPrompt).method
    for task in range(2):
        dual.before_training_exp(_train_data(task))
    counts = dual.parameter_counts()
    assert counts["shared"] == 2 * 2 * 5 * D  # G: blocks 0-1, key + value, length 5
    assert counts["per_task"] == 1 * 2 * 20 * D + D  # E: block 2 only (clipped), length 20, plus its key
    assert counts["added"] == counts["shared"] + 2 * counts["per_task"]
    assert counts["trainable"] == counts["shared"] + counts["per_task"]  # G + the current task's E-prompt

    coda = tiny_setup(CodaPrompt).method
    for task in range(2):
        coda.before_training_exp(_train_data(task))
    counts = coda.parameter_counts()
    n = 100 // 2
    assert counts["per_task"] == depth * n * (8 * D + 2 * D)  # P, K, A in blocks 0-2
    assert counts["shared"] == 0 and counts["added"] == 2 * counts["per_task"]
    assert counts["trainable"] == counts["per_task"]
    assert counts["total"] == counts["backbone"] + counts["added"]


def test_parameter_counts_on_vit_b16_match_the_papers(vit_b16):
    D = 768
    assert vit_b16.vision_width == D and len(vit_b16.vision_blocks) == 12
    l2p = L2P(vit_b16)  # paper defaults: pool 10, length 5, top 5
    assert l2p.prompts.numel() + l2p.keys.numel() == 46_080  # L2P's published pool + key count
    assert l2p.parameter_counts()["added"] == l2p.parameter_counts()["shared"] == 46_080

    dual = DualPrompt(vit_b16, num_tasks=10)
    coda = CodaPrompt(vit_b16, num_tasks=10)
    for task in range(10):
        dual.before_training_exp(_train_data(task))
        coda.before_training_exp(_train_data(task))
    counts = dual.parameter_counts()
    assert counts["shared"] == 2 * 2 * 5 * D == 15_360
    assert counts["per_task"] == 3 * 2 * 20 * D + D == 92_928
    assert counts["added"] == 15_360 + 10 * 92_928 == 944_640
    counts = coda.parameter_counts()
    assert counts["per_task"] == 5 * 10 * (8 * D + 2 * D) == 384_000
    assert counts["added"] == 10 * 384_000 == 3_840_000 and counts["shared"] == 0


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_run_on_the_synthetic_scenario(tmp_path):
    out = tmp_path / "out"
    code = main(["run", "--methods", "l2p,dualprompt,coda", "--backbone", "clvl-tiny", "--device", "cpu",
                 "--epochs", "1", "--batch-size", "8", "--set", "scenario_options.train_images=8",
                 "--set", "scenario_options.test_images=4", "--set", "scenario_options.captions_per_image=2",
                 "--set", "scenario_options.tasks=[colours,backdrops]",
                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--no-tables"])
    assert code == 0
    records = {}
    for path in (out / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        records[record["method"]] = record
    assert set(records) == {"l2p", "dualprompt", "coda"}
    for name, record in records.items():
        costs = record["costs"]
        assert costs["forward_passes_per_query"] == 2
        assert costs["added_params"] == costs["params_shared"] + 2 * costs["params_per_task"]
        r1 = record["recall"]["i2t"]["1"]
        assert all(isinstance(v, float) for v in (r1[0][0], r1[1][0], r1[1][1]))
    assert records["dualprompt"]["routing_accuracy"] is not None  # it routes by E-prompt keys
    assert records["l2p"]["routing_accuracy"] is None and records["coda"]["routing_accuracy"] is None
