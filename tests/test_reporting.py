"""Tests for benchmark.reporting and benchmark.io.

The fixture writes hand-made run records (2 methods x 2 seeds x 3 tasks) whose matrices are
chosen so that each method wins some columns: ``finetune`` learns each new task well but
forgets a lot, ``lora_ft`` forgets little. Expected numbers are computed here from the
matrices with plain Python, independently of benchmark.metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark import io as bio
from benchmark.errors import BenchmarkError
from benchmark.reporting import build_report, load_records, plot_heatmaps, summary_frame, write_tables

SCHEMA = "clvl-benchmark/run-record/v1"
TASKS = ["shapes", "textures", "scenes"]
PROTOCOL = {"gallery": "union", "task_identity": "inferred", "tasks": "seen"}
N = None  # not evaluated (upper triangle: only seen tasks are evaluated)

# i2t R@1 matrices, R[t][j] = recall on task j after session t.
I2T_R1 = {
    ("finetune", 0): [[60, N, N], [40, 70, N], [30, 45, 80]],
    ("finetune", 1): [[62, N, N], [42, 72, N], [28, 47, 78]],
    ("lora_ft", 0): [[50, N, N], [48, 55, N], [46, 52, 58]],
    ("lora_ft", 1): [[52, N, N], [47, 57, N], [45, 53, 60]],
}
# The other (direction, K) matrices are the i2t R@1 one shifted by a constant, so that a
# mix-up of direction or K in the code shows as a wrong number.
OFFSETS = {("i2t", 1): 0, ("i2t", 5): 10, ("i2t", 10): 15, ("t2i", 1): -5, ("t2i", 5): 5, ("t2i", 10): 12}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shifted(matrix, offset):
    return [[None if v is None else v + offset for v in row] for row in matrix]


def make_record(method, seed, scenario="synthetic", created="2026-11-24T08:00:00+00:00", matrix=None):
    if matrix is None:
        matrix = I2T_R1.get((method, seed), I2T_R1[("finetune", 0)])
    base = matrix
    recall = {"i2t": {}, "t2i": {}}
    for (direction, k), offset in OFFSETS.items():
        recall[direction][str(k)] = shifted(base, offset)
    return {
        "schema": SCHEMA,
        "run_id": f"{method}__{scenario}__seed{seed}__1a2b3c4d",
        "method": method,
        "scenario": scenario,
        "seed": seed,
        "config": {"lr": 1e-5},
        "config_hash": "1a2b3c4d5e6f",
        "protocol": dict(PROTOCOL),
        "tasks": list(TASKS),
        "recall": recall,
        "recall_initial": None,
        "recall_tie_rule": "expected",
        "costs": {"trainable_params": 1, "total_params": 2, "wall_time_s": 1.0},
        "provenance": {"device": "cpu"},
        "created": created,
    }


def write_record(runs_dir: Path, record: dict, name: str | None = None) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / (name or f"{record['run_id']}.json")
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for method, seed in I2T_R1:
        write_record(root / "runs", make_record(method, seed))
    return root


# ---------------------------------------------------------------- hand-computed metrics


def final_avg(m):
    return sum(m[-1]) / len(m[-1])


def avg_incremental(m):
    return sum(sum(m[t][: t + 1]) / (t + 1) for t in range(len(m))) / len(m)


def bwt(m):
    T = len(m)
    return sum(m[T - 1][j] - m[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(m):
    T = len(m)
    return sum(max(m[s][j] for s in range(j, T - 1)) - m[T - 1][j] for j in range(T - 1)) / (T - 1)


def lpi_avg(m):
    T = len(m)
    return sum(sum(m[s][j] for s in range(j, T)) / (T - j) for j in range(T)) / T


def over_seeds(method, fn, direction="i2t", k=1):
    """(mean, sample std) of fn over the two seeds of ``method``."""
    values = [fn(shifted(I2T_R1[(method, seed)], OFFSETS[(direction, k)])) for seed in (0, 1)]
    return statistics.mean(values), statistics.stdev(values)


# ---------------------------------------------------------------- markdown helpers


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the first pipe table in ``text``; asserts it is well formed."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, text
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header, separator, body = split(lines[0]), split(lines[1]), [split(line) for line in lines[2:]]
    assert all(re.fullmatch(r":?-{3,}:?", cell) for cell in separator), lines[1]
    assert all(len(row) == len(header) == len(separator) for row in body)
    return header, body


def column(header, body, name):
    index = header.index(name)
    return {row[0]: row[index] for row in body}


# ================================================================ load_records


def test_load_records_reads_runs_folder_and_plain_folder(results_dir):
    loaded = load_records(results_dir)
    assert sorted((r.method, r.seed) for r in loaded) == sorted(I2T_R1)
    assert loaded.warnings == []
    record = next(r for r in loaded if r.method == "finetune" and r.seed == 0)
    assert record.recall["i2t"][1].shape == (3, 3)
    assert math.isnan(record.recall["i2t"][1][0, 2])  # null -> NaN
    assert record.recall["t2i"][5][2, 2] == 80 + OFFSETS[("t2i", 5)]
    # The runs/ folder itself is accepted as well.
    assert len(load_records(results_dir / "runs")) == 4


def test_corrupt_and_foreign_files_are_skipped_with_a_warning(results_dir, tmp_path, caplog):
    runs = results_dir / "runs"
    (runs / "corrupt.json").write_text('{"schema": "clvl-benchmark/run-record/v1", "run_id": ', encoding="utf-8")
    (runs / "foreign.json").write_text(json.dumps({"name": "some other tool", "version": 3}), encoding="utf-8")
    broken = make_record("broken", 0)
    broken["recall"]["i2t"]["1"] = [[50, N], [40, 45]]  # 2 x 2 for 3 tasks
    write_record(runs, broken)

    loaded = load_records(results_dir)
    assert len(loaded) == 4
    assert {r.method for r in loaded} == {"finetune", "lora_ft"}
    assert len(loaded.warnings) == 3
    joined = "\n".join(loaded.warnings)
    for name in ("corrupt.json", "foreign.json", "broken__synthetic"):
        assert name in joined
    assert all("\n" not in warning for warning in loaded.warnings)

    with caplog.at_level(logging.WARNING, logger="benchmark.reporting"):
        written = build_report(results_dir, out_dir=tmp_path / "report")
    assert sum("corrupt.json" in message for message in caplog.messages) == 1
    frame = pd.read_csv(tmp_path / "report" / "tables" / "synthetic" / "results.csv")
    assert set(frame["method"]) == {"finetune", "lora_ft"}
    assert all(path.exists() for path in written)


def _without_seed(record):
    del record["seed"]


def _fractions(record):
    record["recall"]["i2t"]["1"][2][2] = 180  # not a percentage


def _hole(record):
    record["recall"]["t2i"]["5"][1][0] = None  # a seen task left unevaluated


def _future_schema(record):
    record["schema"] = "clvl-benchmark/run-record/v2"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_without_seed, "missing required key(s): seed"),
        (_fractions, "outside the 0..100 percent range"),
        (_hole, "missing cell (t=1, j=0)"),
        (_future_schema, "unsupported schema"),
    ],
)
def test_malformed_records_are_skipped_with_the_reason(results_dir, damage, reason):
    record = make_record("damaged", 0)
    damage(record)
    write_record(results_dir / "runs", record, name="damaged.json")
    loaded = load_records(results_dir)
    assert "damaged" not in {r.method for r in loaded} and len(loaded) == 4
    assert len(loaded.warnings) == 1
    assert "damaged.json" in loaded.warnings[0] and reason in loaded.warnings[0]


def test_empty_folder_raises_benchmark_error(tmp_path):
    (tmp_path / "results" / "runs").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="no run records found"):
        load_records(tmp_path / "results")
    # Only invalid files is the same as none.
    (tmp_path / "results" / "runs" / "x.json").write_text("not json", encoding="utf-8")
    with pytest.raises(BenchmarkError, match="python -m benchmark run"):
        build_report(tmp_path / "results")


def test_a_rerun_of_the_same_seed_replaces_the_older_record(results_dir):
    rerun = make_record("finetune", 0, created="2026-11-25T08:00:00+00:00", matrix=[[80, N, N], [80, 80, N], [80, 80, 80]])
    write_record(results_dir / "runs", rerun, name="finetune_rerun.json")
    loaded = load_records(results_dir)
    finetune0 = [r for r in loaded if r.method == "finetune" and r.seed == 0]
    assert len(finetune0) == 1 and finetune0[0].path.name == "finetune_rerun.json"
    assert finetune0[0].recall["i2t"][1][2, 0] == 80
    assert len(loaded.warnings) == 1 and "same method, scenario, protocol and seed" in loaded.warnings[0]


# ================================================================ frames and CSV


def test_summary_frame_is_tidy(results_dir):
    frame = summary_frame(load_records(results_dir))
    for name in ("method", "scenario", "seed", "protocol", "direction", "k", "metric", "value"):
        assert name in frame.columns
    # No R_init in these records, so FWT is absent: 4 runs x 2 directions x 3 K x 7 metrics.
    assert len(frame) == 4 * 2 * 3 * 7
    assert "forward_transfer" not in set(frame["metric"])
    row = frame.query("method == 'lora_ft' and seed == 1 and direction == 't2i' and k == 10 and metric == 'final_average'")
    assert row["value"].item() == pytest.approx(final_avg(shifted(I2T_R1[("lora_ft", 1)], 12)))


def test_results_csv_holds_hand_computed_means_and_stds(results_dir, tmp_path):
    write_tables(load_records(results_dir), tmp_path / "tables")
    frame = pd.read_csv(tmp_path / "tables" / "synthetic" / "results.csv")

    def get(method, direction, k, metric):
        row = frame[(frame.method == method) & (frame.direction == direction) & (frame.k == k) & (frame.metric == metric)]
        assert len(row) == 1
        return row.iloc[0]

    cases = [
        ("finetune", "i2t", 1, "final_average", final_avg),
        ("lora_ft", "i2t", 1, "average_incremental", avg_incremental),
        ("finetune", "t2i", 5, "backward_transfer", bwt),
        ("lora_ft", "t2i", 10, "forgetting_max", forgetting),
        ("finetune", "i2t", 10, "lpi_average_over_history", lpi_avg),
    ]
    for method, direction, k, metric, fn in cases:
        mean, std = over_seeds(method, fn, direction, k)
        row = get(method, direction, k, metric)
        assert row["mean"] == pytest.approx(mean), (method, direction, k, metric)
        assert row["std"] == pytest.approx(std), (method, direction, k, metric)
        assert row["n_seeds"] == 2
    # Worked by hand: finetune final averages are 155/3 and 153/3 -> mean 51.333.
    assert get("finetune", "i2t", 1, "final_average")["mean"] == pytest.approx(154 / 3)


def test_final_per_task_and_lpi_view(results_dir, tmp_path):
    write_tables(load_records(results_dir), tmp_path)
    per_task = pd.read_csv(tmp_path / "synthetic" / "final_per_task.csv")
    assert list(per_task.columns[-3:]) == TASKS  # in task order, not alphabetical
    row = per_task[(per_task.method == "finetune") & (per_task.direction == "i2t") & (per_task.k == 1)].iloc[0]
    assert (row["shapes"], row["textures"], row["scenes"]) == (29.0, 46.0, 79.0)

    lpi = pd.read_csv(tmp_path / "synthetic" / "lpi_view.csv", dtype={"k": str})
    pick = lpi[(lpi.method == "lora_ft") & (lpi.direction == "i2t") & (lpi.metric == "lpi_average_over_history")]
    # Per run: average over K = 1, 5, 10 first, then over seeds.
    per_run = [
        statistics.mean(lpi_avg(shifted(I2T_R1[("lora_ft", seed)], OFFSETS[("i2t", k)])) for k in (1, 5, 10))
        for seed in (0, 1)
    ]
    mean_row = pick[pick.k == "mean"].iloc[0]
    assert mean_row["mean"] == pytest.approx(statistics.mean(per_run))
    assert mean_row["std"] == pytest.approx(statistics.stdev(per_run))
    assert pick[pick.k == "5"].iloc[0]["mean"] == pytest.approx(over_seeds("lora_ft", lpi_avg, "i2t", 5)[0])
    markdown = (tmp_path / "synthetic" / "lpi_view.md").read_text(encoding="utf-8")
    header, body = markdown_table(markdown)
    assert len(body) == 4  # 2 methods x 2 directions
    assert any("LPI forget" in h for h in header)


# ================================================================ paper table


def test_markdown_table_layout_bold_and_arrows(results_dir, tmp_path):
    write_tables(load_records(results_dir), tmp_path)
    text = (tmp_path / "synthetic" / "results.md").read_text(encoding="utf-8")
    header, body = markdown_table(text)
    assert [row[0] for row in body] == ["finetune", "lora_ft"]
    assert header[0] == "Method" and len(header) == 1 + 12
    assert all(h.endswith(("↑", "↓")) for h in header[1:])
    assert "i2t R@1 Forget (max) ↓" in header and "t2i R@1 BWT ↑" in header

    # finetune learns new tasks better (avg incremental), lora_ft forgets less.
    mean, std = over_seeds("finetune", avg_incremental)
    assert column(header, body, "i2t R@1 Avg incr ↑") == {
        "finetune": f"**{mean:.1f} ± {std:.1f}**",
        "lora_ft": f"{over_seeds('lora_ft', avg_incremental)[0]:.1f} ± {over_seeds('lora_ft', avg_incremental)[1]:.1f}",
    }
    # Lower is better for forgetting: the smaller value is bold, the larger is not.
    forget = column(header, body, "i2t R@1 Forget (max) ↓")
    assert forget["lora_ft"].startswith("**") and not forget["finetune"].startswith("**")
    assert forget["lora_ft"] == f"**{over_seeds('lora_ft', forgetting)[0]:.1f} ± {over_seeds('lora_ft', forgetting)[1]:.1f}**"
    # Higher is better for BWT, which is negative here: -4.5 beats -28.5.
    bwt_cells = column(header, body, "t2i R@1 BWT ↑")
    assert bwt_cells == {"finetune": "-28.5 ± 1.4", "lora_ft": "**-4.5 ± 1.4**"}
    assert column(header, body, "i2t R@10 Final avg ↑")["lora_ft"].startswith("**")

    caption = text.split(body[-1][-1])[-1]
    for expected in ("2 seeds", "gallery `union`", "task identity `inferred`", "tasks evaluated `seen`"):
        assert expected in caption
    assert "BWT = `(1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])`" in caption
    assert "Forget (max) = `" in caption and "max_" in caption
    assert "ranked against the test items of all tasks seen so far together" in caption


def test_records_from_before_tie_aware_recall_are_flagged(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    old = make_record("finetune", 0)
    del old["recall_tie_rule"]  # as every record written before the tie rule was declared
    (runs / "old.json").write_text(json.dumps(old), encoding="utf-8")
    (runs / "new.json").write_text(json.dumps(make_record("finetune", 1)), encoding="utf-8")
    loaded = load_records(tmp_path)
    assert len(loaded) == 2
    assert len(loaded.warnings) == 1 and "old.json" in loaded.warnings[0] and "optimistic" in loaded.warnings[0]


def test_gallery_phrase_tells_the_three_galleries_apart():
    from benchmark.reporting import gallery_phrase

    phrases = {gallery_phrase({"gallery": g, "tasks": t})
               for g, t in (("union", "seen"), ("union", "all"), ("per_task", "seen"))}
    assert len(phrases) == 3
    assert "all tasks together in every session" in gallery_phrase({"gallery": "union", "tasks": "all"})
    assert gallery_phrase({"gallery": "per_task", "tasks": "all"}) == gallery_phrase({"gallery": "per_task",
                                                                                       "tasks": "seen"})


def test_latex_table_is_booktabs_escaped_and_bolds_best(results_dir, tmp_path):
    write_tables(load_records(results_dir), tmp_path)
    tex = (tmp_path / "synthetic" / "results.tex").read_text(encoding="utf-8")
    for command in (r"\begin{table}", r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\end{table}"):
        assert command in tex
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"$\uparrow$" in tex and r"$\downarrow$" in tex
    # Method names are escaped; an unescaped underscore would not compile.
    assert r"lora\_ft &" in tex
    assert not re.search(r"(?<!\\)_", tex.replace(r"\_", "")), "unescaped underscore"
    # A bare % would comment out the rest of the caption.
    assert not re.search(r"(?<!\\)%", "\n".join(l for l in tex.splitlines() if not l.startswith("%")))

    rows = {line.split(" & ")[0]: line.rstrip(" \\").split(" & ") for line in tex.splitlines() if " & " in line and line.split(" & ")[0] in ("finetune", r"lora\_ft")}
    forgetting_column = 4  # Method, final avg, avg incr, BWT, forgetting
    assert rows[r"lora\_ft"][forgetting_column] == r"\textbf{4.5 $\pm$ 1.4}"
    assert rows["finetune"][forgetting_column] == r"28.5 $\pm$ 1.4"
    assert rows["finetune"][2].startswith(r"\textbf{")  # avg incremental
    assert rows["finetune"][3] == r"$-$28.5 $\pm$ 1.4"  # a real minus sign
    caption = tex[tex.index(r"\caption{") : tex.index(r"\label")]
    assert "2 seeds" in caption and r"\texttt{union}" in caption and "bold" in caption.lower()


# Short enough to paste into a paper's table caption; the one before the notes file was ~900.
MAX_LATEX_CAPTION = 400


def latex_caption(tex: str) -> str:
    return tex[tex.index(r"\caption{") + len(r"\caption{") : tex.index("}\n" + r"\label")]


def test_latex_caption_is_short_and_the_definitions_are_in_the_notes(results_dir, tmp_path):
    written = write_tables(load_records(results_dir), tmp_path)
    folder = tmp_path / "synthetic"
    assert folder / "results.notes.tex" in written
    tex = (folder / "results.tex").read_text(encoding="utf-8")
    caption = latex_caption(tex)
    assert len(caption) <= MAX_LATEX_CAPTION, (len(caption), caption)
    # The what stays in the caption: scenario, seeds, protocol, what bold means.
    for expected in ("synthetic", "2 seeds (0, 1)", r"gallery \texttt{union}", r"task identity \texttt{inferred}",
                     r"tasks evaluated \texttt{seen}", "Bold: best per column"):
        assert expected in caption, expected
    assert r"BWT = \texttt{" not in caption and "R[t][j]" not in caption
    assert "results.notes.tex" in tex  # the table says where its definitions are
    notes = (folder / "results.notes.tex").read_text(encoding="utf-8")
    for expected in (r"BWT = \texttt{(1/(T-1)) sum\_\{j<T-1\} (R[T-1][j] - R[j][j])}", "Forget (max) = ",
                     "R[t][j] is the recall on task j after training session t",
                     "ranked against the test items of all tasks seen so far together", "No significance test"):
        assert expected in notes, expected
    body = "\n".join(line for line in notes.splitlines() if not line.startswith("%"))
    assert not re.search(r"(?<!\\)%", body) and not re.search(r"(?<!\\)_", body.replace(r"\_", ""))
    # The Markdown table keeps its full caption.
    markdown = (folder / "results.md").read_text(encoding="utf-8")
    assert "BWT = `(1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])`" in markdown


def compact_expected(method: str) -> dict[str, tuple[float, float]]:
    """The compact table's numbers, recomputed from the fixture matrices: per seed, final average
    at each (direction, K), their mean, and R@1 BWT averaged over directions; then over seeds."""
    per_seed: dict[str, list[float]] = {}
    for seed in (0, 1):
        finals = {}
        for direction in ("i2t", "t2i"):
            for k in (1, 5, 10):
                finals[f"{direction} R@{k}"] = final_avg(shifted(I2T_R1[(method, seed)], OFFSETS[(direction, k)]))
        values = dict(finals)
        values["Avg"] = sum(finals.values()) / len(finals)
        values["BWT R@1"] = (bwt(shifted(I2T_R1[(method, seed)], OFFSETS[("i2t", 1)]))
                             + bwt(shifted(I2T_R1[(method, seed)], OFFSETS[("t2i", 1)]))) / 2
        for name, value in values.items():
            per_seed.setdefault(name, []).append(value)
    return {name: (statistics.mean(v), statistics.stdev(v)) for name, v in per_seed.items()}


def test_compact_table_holds_values_recomputed_from_the_records(results_dir, tmp_path):
    written = write_tables(load_records(results_dir), tmp_path)
    folder = tmp_path / "synthetic"
    assert {folder / "results.compact.md", folder / "results.compact.tex"} <= set(written)
    header, body = markdown_table((folder / "results.compact.md").read_text(encoding="utf-8"))
    names = ["i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "Avg", "BWT R@1"]
    assert header == ["Method"] + [f"{name} ↑" for name in names]
    tex = (folder / "results.compact.tex").read_text(encoding="utf-8")
    tex_rows = {line.split(" & ")[0]: line.rstrip(" \\").split(" & ")[1:] for line in tex.splitlines()
                if line.split(" & ")[0] in ("finetune", r"lora\_ft")}
    expected = {method: compact_expected(method) for method in ("finetune", "lora_ft")}
    for row in body:
        method = row[0]
        for name, cell, tex_cell in zip(names, row[1:], tex_rows[method.replace("_", r"\_")]):
            mean, std = expected[method][name]
            other = "lora_ft" if method == "finetune" else "finetune"
            best = round(mean, 1) >= round(expected[other][name][0], 1)  # every column: higher is better
            text = f"{mean:.1f} ± {std:.1f}"
            assert cell == (f"**{text}**" if best else text), (method, name)
            latex = text.replace("±", r"$\pm$").replace("-", "$-$")
            assert tex_cell == (rf"\textbf{{{latex}}}" if best else latex), (method, name)
    # finetune forgets more: lora_ft's BWT is the bold one, as in the full table.
    assert column(header, body, "BWT R@1 ↑")["lora_ft"].startswith("**")
    caption = latex_caption(tex)
    assert len(caption) <= MAX_LATEX_CAPTION and "Avg = mean of the R@K columns" in caption
    for command in (r"\toprule", r"\cmidrule(lr){2-4}", r"\cmidrule(lr){5-7}", r"\midrule", r"\bottomrule"):
        assert command in tex
    assert r"\label{tab:synthetic-compact}" in tex


def test_table_command_writes_the_compact_table_and_notes(results_dir, tmp_path, capsys):
    from benchmark.cli import main

    assert main(["table", str(results_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("results.compact.md", "results.compact.tex", "results.notes.tex"):
        path = tmp_path / "tables" / "synthetic" / name
        assert path.is_file() and f"wrote {path}" in out


def test_single_seed_tables_have_no_plus_minus(tmp_path):
    for method in ("finetune", "lora_ft"):
        write_record(tmp_path / "results" / "runs", make_record(method, 0))
    write_tables(load_records(tmp_path / "results"), tmp_path / "tables")
    markdown = (tmp_path / "tables" / "synthetic" / "results.md").read_text(encoding="utf-8")
    tex = (tmp_path / "tables" / "synthetic" / "results.tex").read_text(encoding="utf-8")
    header, body = markdown_table(markdown)
    assert "±" not in markdown and r"\pm" not in tex
    # finetune seed 0 final average: (30 + 45 + 80) / 3 = 51.666... -> "51.7" (not "51.67" or "52").
    final = column(header, body, "i2t R@1 Final avg ↑")
    assert final["finetune"] == "51.7"
    # lora_ft: (46 + 52 + 58) / 3 = 52 exactly; still one decimal, and bold (the best).
    assert final["lora_ft"] == "**52.0**"
    assert "1 seed (0)" in markdown
    frame = pd.read_csv(tmp_path / "tables" / "synthetic" / "results.csv")
    assert frame["std"].isna().all() and (frame["n_seeds"] == 1).all()


def test_single_method_is_not_bold_and_keeps_one_decimal(tmp_path):
    write_record(tmp_path / "results" / "runs", make_record("lora_ft", 0))
    write_tables(load_records(tmp_path / "results"), tmp_path / "tables")
    header, body = markdown_table((tmp_path / "tables" / "synthetic" / "results.md").read_text(encoding="utf-8"))
    assert len(body) == 1 and not any("**" in cell for cell in body[0])
    # A column of plain numbers must not be re-formatted by tabulate ("52.0" -> "52").
    assert column(header, body, "i2t R@1 Final avg ↑") == {"lora_ft": "52.0"}


def test_one_folder_per_scenario(results_dir, tmp_path):
    write_record(results_dir / "runs", make_record("finetune", 0, scenario="flickr/coco"), name="other.json")
    written = write_tables(load_records(results_dir), tmp_path)
    folders = {path.parent.name for path in written}
    assert folders == {"synthetic", "flickr-coco"}
    other = pd.read_csv(tmp_path / "flickr-coco" / "results.csv")
    assert set(other["method"]) == {"finetune"} and (other["n_seeds"] == 1).all()


def test_several_protocols_of_one_scenario_get_separate_tables(results_dir, tmp_path):
    oracle = make_record("finetune", 0)
    oracle["protocol"] = {"tasks": "all", "gallery": "task", "task_identity": "oracle"}  # key order differs
    write_record(results_dir / "runs", oracle, name="oracle.json")
    write_tables(load_records(results_dir), tmp_path)
    union = pd.read_csv(tmp_path / "synthetic" / "union-inferred-seen" / "results.csv")
    task = pd.read_csv(tmp_path / "synthetic" / "task-oracle-all" / "results.csv")
    assert set(task["protocol"]) == {"gallery=task, task_identity=oracle, tasks=all"}
    assert (task["n_seeds"] == 1).all() and (union["n_seeds"] == 2).all()
    labels = {(tmp_path / "synthetic" / sub / "results.tex").read_text().split(r"\label{")[1].split("}")[0] for sub in ("union-inferred-seen", "task-oracle-all")}
    assert len(labels) == 2  # LaTeX labels must not collide


# ================================================================ figures and report


def test_heatmaps_are_png_files(results_dir, tmp_path):
    write_record(results_dir / "runs", make_record("my method/v2", 0), name="odd_name.json")
    paths = plot_heatmaps(load_records(results_dir), tmp_path / "figures")
    names = sorted(path.name for path in paths)
    assert names == ["heatmap_synthetic_finetune.png", "heatmap_synthetic_lora_ft.png", "heatmap_synthetic_my-method-v2.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_build_report_writes_everything_without_leftover_temp_files(results_dir):
    written = build_report(results_dir)
    assert all(path.is_file() and path.stat().st_size > 0 for path in written)
    assert {p.parent for p in written} == {results_dir / "tables" / "synthetic", results_dir / "figures"}
    every_file = [p for p in results_dir.rglob("*") if p.is_file()]
    assert not [p for p in every_file if p.name.startswith(".") or p.suffix == ".tmp"]
    # Writing again over existing outputs works too, and still leaves nothing behind.
    assert build_report(results_dir) == written
    assert len([p for p in results_dir.rglob("*") if p.is_file()]) == len(every_file)


# ================================================================ benchmark.io


def test_atomic_write_json_turns_nan_into_null_and_keeps_key_order(tmp_path):
    path = bio.atomic_write_json(
        tmp_path / "sub" / "record.json",
        {"z": float("nan"), "a": np.float32(1.5), "m": [np.inf, np.int64(3)], "arr": np.array([1.0, np.nan])},
    )
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"z": None, "a": 1.5, "m": [None, 3], "arr": [1.0, None]}
    assert list(json.loads(text)) == ["z", "a", "m", "arr"]
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("failing", ["replace", "write"])
def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "results.csv"
    bio.atomic_write_text(target, "old contents\n")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # Fail either at the final rename or while the temp file is being written.
    monkeypatch.setattr(bio.os, "replace" if failing == "replace" else "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        bio.atomic_write_text(target, "new contents\n")
    assert target.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == ["results.csv"]  # the temp file was removed


def test_atomic_write_replaces_content_and_cleans_up(tmp_path):
    target = tmp_path / "a.txt"
    bio.atomic_write_text(target, "one")
    bio.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_cost_table_averages_each_method_over_seeds(tmp_path):
    """cost.csv: one row per method, the mean of its seeds' costs (per-task time averaged first)."""
    runs = tmp_path / "runs"
    costs = {("lpi", 0): {"trainable_params": 100, "total_params": 1100, "backbone_params": 1000,
                          "added_params": 200, "params_per_task": 50, "params_shared": 50,
                          "forward_passes_per_query": 2, "train_time_s_per_task": [1.0, 3.0, 5.0],
                          "wall_time_s": 20.0, "peak_memory_mb": 300.0, "peak_memory_kind": "process_peak_rss"},
             ("lpi", 1): {"trainable_params": 100, "total_params": 1100, "backbone_params": 1000,
                          "added_params": 200, "params_per_task": 50, "params_shared": 50,
                          "forward_passes_per_query": 2, "train_time_s_per_task": [2.0, 2.0, 2.0],
                          "wall_time_s": 30.0, "peak_memory_mb": 500.0, "peak_memory_kind": "process_peak_rss"},
             ("zeroshot", 0): {"trainable_params": 0, "total_params": 1000, "backbone_params": 1000,
                               "added_params": 0, "forward_passes_per_query": 1, "train_time_s_per_task": [0, 0, 0],
                               "wall_time_s": 5.0, "peak_memory_mb": 100.0, "peak_memory_kind": "process_peak_rss"}}
    for (method, seed), cost in costs.items():
        record = make_record(method, seed, matrix=I2T_R1[("finetune", 0)])
        record["costs"] = cost
        write_record(runs, record)
    written = build_report(tmp_path)
    assert tmp_path / "tables" / "synthetic" / "cost.md" in written
    frame = pd.read_csv(tmp_path / "tables" / "synthetic" / "cost.csv").set_index("method")
    assert frame.loc["lpi", "n_seeds"] == 2
    assert frame.loc["lpi", "train_time_s_per_task"] == pytest.approx((3.0 + 2.0) / 2)
    assert frame.loc["lpi", "wall_time_s"] == pytest.approx(25.0)
    assert frame.loc["lpi", "peak_memory_mb"] == pytest.approx(400.0)
    assert frame.loc["lpi", "params_per_task"] == 50
    assert np.isnan(frame.loc["zeroshot", "params_per_task"])
    assert frame.loc["zeroshot", "forward_passes_per_query"] == 1
    markdown = (tmp_path / "tables" / "synthetic" / "cost.md").read_text()
    assert "| lpi " in markdown and "1,100" in markdown
