"""`python -m benchmark bench`: the CI's tiny run through the command line, the report's
consistency (every ratio is the quotient of the figures it came from), the FLOP counting path
against hand counts, the peak table, and one-line errors for bad options.

No test asserts on a timing: speeds depend on the machine; only their presence, sign and the
arithmetic that relates them are checked.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from benchmark.bench import SECTIONS
from benchmark.bench.device import bf16_peak, count_flops
from benchmark.bench.options import GOAL_PAIRS_PER_S, TINY_METHODS

from helpers import error_line, run_main


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One `bench --tiny` through the CLI (what CI runs), on the CPU, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    code, stdout, stderr = run_main(["bench", "--tiny", "--device", "cpu", "--output-dir", str(out)])
    assert code == 0, stderr
    return out, stdout, json.loads((out / "bench.json").read_text(encoding="utf-8")), \
        (out / "bench.md").read_text(encoding="utf-8")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_bench_writes_every_section(tiny_bench):
    out, stdout, report, md = tiny_bench
    assert report["schema"] == "clvl-benchmark/bench/v1"
    assert list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "measured", (name, section)
    assert report["options"]["methods"] == list(TINY_METHODS)
    assert report["machine"]["device"] == "cpu" and report["machine"]["cpu_cores"] >= 1
    assert f"wrote {out / 'bench.json'}" in stdout and f"wrote {out / 'bench.md'}" in stdout
    # No temporary folder (checkpoints) is left in the output folder.
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]
    # The Markdown has a table per section and the goal line.
    for name in SECTIONS:
        assert f"## {name}\n" in md
    for header in ("| tower | pass | variant |", "| method | feed | pairs/s |", "| decode path | workers |",
                   "| method | variant | gallery", "| method | whole MiB | whole save s |", "| method | feed | achieved TFLOP/s |"):
        assert header in md
    assert "**Goal.** lpi:" in md and "3,800 pairs/s" in md


def test_figures_are_positive_and_finite(tiny_bench):
    _, _, report, _ = tiny_bench
    sections = report["sections"]
    hooks = sections["hooks"]["rows"]
    assert len(hooks) == 2 * 2 * 5 + 2  # towers x passes x (open_clip + 4 hook variants), + text cut per pass
    assert all(_positive(r["ms_per_call"]) and _positive(r["forward_gflop"]) for r in hooks)
    measured = [r for r in sections["training"]["rows"] if r["status"] == "measured"]
    assert {(r["method"], r["feed"]) for r in measured} == {(m, f) for m in ("finetune", "lpi")
                                                           for f in ("pipeline", "memory")}
    for row in measured:
        for key in ("pairs_per_s", "s_per_step", "gflop_per_step", "achieved_tflops"):
            assert _positive(row[key]), (key, row)
        assert row["steps"] == report["options"]["steps"] and row["warmup_steps"] == report["options"]["warmup"]
        assert 0.0 <= row["share"]["data"] <= 1.0
        assert row["share"]["device"] is None and row["share"]["launch"] is None  # CPU: no device split
    assert [r["status"] for r in sections["training"]["rows"] if r["method"] == "zeroshot"] == ["does not train"] * 2
    assert all(_positive(r["pairs_per_s"]) and _positive(r["item_bytes"]) for r in sections["data"]["rows"])
    evaluation = {r["method"]: r for r in sections["evaluation"]["rows"]}
    assert set(evaluation) == {"zeroshot", "lpi"}
    assert {(r["method"], r["variant"]) for r in sections["evaluation"]["rows"]} == {
        (m, v) for m in ("zeroshot", "lpi") for v in ("no caches", "caches, warm")}
    data_rows = {r["decode_path"]: r for r in sections["data"]["rows"]}
    assert set(data_rows) == {"pil, float32 (before)", "pil", "pil-draft", "torchvision"}
    assert data_rows["pil, float32 (before)"]["image_dtype"] == "float32"
    assert all(data_rows[p]["image_dtype"] == "uint8" for p in ("pil", "pil-draft", "torchvision"))
    assert data_rows["pil"]["item_bytes"] * 4 == data_rows["pil, float32 (before)"]["item_bytes"]
    for row in evaluation.values():
        assert _positive(row["eval_s"]) and row["gallery_captions"] == 5 * row["gallery_images"]
        assert row["items_encoded"] == row["gallery_images"] + row["gallery_captions"]
    assert evaluation["lpi"]["fits_keys"] and _positive(evaluation["lpi"]["key_fit_s"])
    assert not evaluation["zeroshot"]["fits_keys"] and evaluation["zeroshot"]["key_fit_s"] == 0.0
    assert all(_positive(r["file_mib"]) and _positive(r["save_s"]) for r in sections["checkpoints"]["rows"])
    assert sections["device"]["bf16_peak_tflops"] is None  # a CPU has no entry in the peak table
    assert all(r["peak_share"] is None for r in sections["device"]["rows"])


def test_ratios_are_quotients_of_their_figures(tiny_bench):
    _, _, report, _ = tiny_bench
    sections = report["sections"]
    hooks = sections["hooks"]["rows"]
    for row in hooks:
        base = next(r for r in hooks
                    if (r["tower"], r["pass"], r["variant"]) == (row["tower"], row["pass"], "open_clip"))
        assert row["time_ratio"] == pytest.approx(row["ms_per_call"] / base["ms_per_call"], rel=1e-9)
        assert row["flop_ratio"] == pytest.approx(row["forward_gflop"] / base["forward_gflop"], rel=1e-9)
        assert row["overhead"] == pytest.approx(row["time_ratio"] / row["flop_ratio"], rel=1e-9)
        assert row["ms_per_call"] == pytest.approx(statistics.median(row["repeats_ms"]))
    # Without prompts the hook path does exactly open_clip's arithmetic.
    assert all(r["flop_ratio"] == 1.0 for r in hooks if r["variant"] == "hooks, none")
    # Cutting the captions to the batch's longest does less text-tower arithmetic.
    cut = [r for r in hooks if r["variant"] == "hooks, none, cut"]
    assert len(cut) == 2 and all(r["tower"] == "text" and 0 < r["flop_ratio"] < 1.0 for r in cut)
    rows = {(r["method"], r["feed"]): r for r in sections["training"]["rows"]}
    for method in ("finetune", "lpi"):
        pipeline, memory = rows[(method, "pipeline")], rows[(method, "memory")]
        assert pipeline["pipeline_vs_memory"] == pytest.approx(pipeline["pairs_per_s"] / memory["pairs_per_s"])
        for row in (pipeline, memory):
            assert row["pairs_per_s"] == pytest.approx(row["batch"] / row["s_per_step"])
            assert row["achieved_tflops"] == pytest.approx(row["gflop_per_step"] / 1e3 / row["s_per_step"])
            assert row["gflop_per_pair"] == pytest.approx(row["gflop_per_step"] / row["batch"])
    goal = report["goal"]
    assert goal["comparable"] is False  # CPU and the tiny model: not the goal's setting
    assert goal["pipeline_pairs_per_s"] == rows[("lpi", "pipeline")]["pairs_per_s"]
    assert goal["pipeline_vs_target"] == pytest.approx(goal["pipeline_pairs_per_s"] / GOAL_PAIRS_PER_S)
    assert goal["memory_vs_target"] == pytest.approx(goal["memory_pairs_per_s"] / GOAL_PAIRS_PER_S)
    for row in sections["data"]["rows"]:
        assert row["pairs_per_s_per_worker"] == pytest.approx(row["pairs_per_s"] / max(1, row["workers"]))
    for row in sections["checkpoints"]["rows"]:
        assert row["frozen_backbone_share"] == pytest.approx(row["frozen_backbone_mib"] / row["file_mib"])
        assert row["mib_per_s"] == pytest.approx(row["file_mib"] / row["save_s"])
        assert row["size_ratio"] == pytest.approx(row["file_mib"] / row["slim_file_mib"])
        assert row["save_ratio"] == pytest.approx(row["save_s"] / row["slim_save_s"])
    device_rows = {(r["method"], r["feed"]): r for r in sections["device"]["rows"]}
    assert {k: r["achieved_tflops"] for k, r in device_rows.items()} == {
        k: r["achieved_tflops"] for k, r in rows.items() if r["status"] == "measured"}


def test_checkpoint_frozen_share_counts_the_backbone_parameters(tiny_bench):
    """zeroshot trains nothing: its frozen part is every backbone parameter (counted here from
    a freshly built clvl-tiny), and the file holds at least that much."""
    from benchmark.backbone import load_backbone

    _, _, report, _ = tiny_bench
    rows = {r["method"]: r for r in report["sections"]["checkpoints"]["rows"]}
    backbone = load_backbone("clvl-tiny")
    params_mib = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2 ** 20
    assert rows["zeroshot"]["frozen_backbone_mib"] == pytest.approx(params_mib)
    assert rows["zeroshot"]["file_mib"] >= params_mib
    assert rows["finetune"]["frozen_backbone_mib"] == 0.0  # fine-tuning trains the whole backbone
    # What a run saves leaves the untouched backbone out: zeroshot's file loses at least the
    # backbone's bytes; fine-tuning changed every weight, so it keeps them.
    assert rows["zeroshot"]["slim_file_mib"] <= rows["zeroshot"]["file_mib"] - params_mib + 0.01
    assert rows["finetune"]["slim_file_mib"] >= params_mib


def test_flop_count_of_known_ops_equals_the_hand_count():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(5, 6)
    # Forward x @ w, backward: grad_x = grad @ w.T (x's gradient only; w needs none).
    assert count_flops(lambda: (x @ w).sum().backward()) == 2 * 4 * 5 * 6 * 2
    # Attention on the CPU (torch's own table has no entry for its kernel): QK^T and AV.
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 2 * 3 * 5 * 7 * 4)
    # nn.MultiheadAttention's fused inference kernel: four projections and the two products.
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    tokens = torch.randn(3, 6, 8)
    with torch.no_grad():
        counted = count_flops(lambda: mha(tokens, tokens, tokens, need_weights=False))
    assert counted == 4 * (2 * 3 * 6 * 8 * 8) + 2 * (2 * 3 * 6 * 6 * 8)


def test_peak_table():
    assert bf16_peak("NVIDIA H100 80GB HBM3") == (989.0, "H100 SXM")
    assert bf16_peak("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert bf16_peak("NVIDIA H200") == (989.0, "H200 SXM")
    assert bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bf16_peak("NVIDIA L40S")[0] == 362.0
    assert bf16_peak("NVIDIA GeForce RTX 4090")[0] == 165.0
    assert bf16_peak("NVIDIA H100 NVL") == (None, None)  # not in the table: no guess
    assert bf16_peak("x86_64") == (None, None)


@pytest.mark.parametrize("argv, fragments", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "many"], ["--steps", "integer"]),
    (["--batch-size", "1"], ["--batch-size", "at least 2"]),
    (["--methods", "nosuch"], ["nosuch"]),
    (["--sections", "hooks,trainin"], ["--sections", "trainin", "training"]),
    (["--precision", "fp8"], ["--precision", "bf16, fp16, fp32"]),
    (["--model", "ViT-B-16:openai"], ["--model", "random weights"]),
    (["--num-workers", "-1"], ["--num-workers"]),
])
def test_bad_options_are_one_line_errors(tmp_path, argv, fragments):
    code, _, err = run_main(["bench", "--tiny", "--output-dir", str(tmp_path / "out"), *argv])
    assert code == 2
    error_line(err, *fragments)
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path):
    code, _, err = run_main(["bench", "--tiny", "--device", "cuda", "--output-dir", str(tmp_path)])
    assert code == 2
    error_line(err, "CUDA is not available")


def test_bench_help_is_plain_text(capsys):
    from benchmark.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: clvl-benchmark bench ")
    for option in ("--tiny", "--model", "--methods", "--steps", "--batch-size", "--device", "--precision",
                   "--sections", "--output-dir"):
        assert option in text
    assert "`" not in text


def test_step_shares_split_the_window():
    """data = loader waits / window; on CUDA device = kernel time of the timed steps / window and
    launch = the rest; on the CPU the device is the host (no device/launch split)."""
    from types import SimpleNamespace

    from benchmark.bench.training import shares

    timer = SimpleNamespace(window_s=2.0, data_s=[0.1, 0.3, 0.1, 0.0], step_s=[0.4, 0.4, 0.3, 0.4],
                            device_busy_s=0.25)
    cuda = shares(timer, torch.device("cuda"))
    assert cuda["data"] == pytest.approx(0.5 / 2.0)
    assert cuda["device"] == pytest.approx(4 * 0.25 / 2.0)
    assert cuda["launch"] == pytest.approx(1 - 0.25 - 0.5)
    cpu = shares(timer, torch.device("cpu"))
    assert cpu == {"data": pytest.approx(0.25), "compute": pytest.approx(0.75), "device": None, "launch": None}
    # A profiler that gave no kernel times leaves the split unknown rather than guessed.
    unknown = shares(SimpleNamespace(**{**vars(timer), "device_busy_s": None}), torch.device("cuda"))
    assert unknown["device"] is None and unknown["launch"] is None
