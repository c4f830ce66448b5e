"""Significance tests (benchmark.stats) and the marks they put in the tables.

The bootstrap is checked against answers that are obvious (all hits vs none, identical methods),
against a normal approximation and an independent, loop-by-loop resampling written here, and
pinned on one fixed-seed number. Welch's test is checked against the textbook formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark import stats
from benchmark.cli import main
from benchmark.record import RunRecord
from benchmark.reporting import load_records, write_tables

TASKS = ["a", "b", "c"]


def hits_record(method: str, seed: int, hits: list[list[int]], query_set: str = "q", with_queries: bool = True,
                final: list[float] | None = None) -> dict:
    """A run record whose final-session recall is the hit rate of ``hits`` (per task, 0/1 per query)."""
    T = len(hits)
    final = final if final is not None else [100.0 * sum(h) / len(h) for h in hits]
    matrix = [[final[j] if j <= t else None for j in range(T)] for t in range(T)]
    record = {
        "schema": "clvl-benchmark/run-record/v1", "run_id": f"{method}__s__seed{seed}__00000000", "method": method,
        "scenario": "s", "seed": seed, "protocol": {"gallery": "union", "task_identity": "inferred", "tasks": "seen"},
        "tasks": TASKS[:T], "recall": {d: {str(k): matrix for k in (1, 5, 10)} for d in ("i2t", "t2i")},
        "recall_initial": None, "recall_tie_rule": "expected", "created": "2026-11-24T08:00:00+00:00",
    }
    if with_queries:
        ranks = "".join("0" if h else "x" for task in hits for h in task)
        block = {"tasks": list(range(T)), "counts": [len(h) for h in hits], "ranks": ranks}
        record["final_session_queries"] = {"query_set": query_set, "i2t": block, "t2i": block}
    return record


def typed(record: dict) -> RunRecord:
    """What the statistics read: the record as benchmark.record validates it."""
    return RunRecord.from_json(record)


def with_queries(block: dict | None) -> RunRecord:
    """A valid record whose ``final_session_queries`` is ``block`` (None: the key is absent)."""
    record = hits_record("m", 0, [[1]], with_queries=False)
    if block is not None:
        record["final_session_queries"] = block
    return typed(record)


def write(runs: Path, record: dict) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{record['run_id']}.json").write_text(json.dumps(record))


def normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


# ============================================================================ per-query ranks


def test_query_ranks_decode_and_hits_at_k():
    record = with_queries({"query_set": "q", "i2t": {"tasks": [0, 1], "counts": [2, 3], "ranks": "0x19x"}})
    query_set, ranks = stats.query_ranks(record, "i2t")
    assert query_set == "q" and [r.tolist() for r in ranks] == [[0, 10], [1, 9, 10]]
    _, hits = stats.seed_averaged_hits([record], "i2t", 1)
    assert [h.tolist() for h in hits] == [[1, 0], [0, 0, 0]]
    _, hits = stats.seed_averaged_hits([record], "i2t", 10)
    assert [h.tolist() for h in hits] == [[1, 0], [1, 1, 0]]
    assert stats.query_ranks(with_queries({"i2t": {"counts": [3], "ranks": "01"}}), "i2t") is None
    assert stats.query_ranks(with_queries(None), "i2t") is None


def test_seed_averaged_hits_average_seeds_and_refuse_other_queries():
    one = typed(hits_record("m", 0, [[1, 0, 1, 1]]))
    two = typed(hits_record("m", 1, [[1, 1, 0, 1]]))
    _, hits = stats.seed_averaged_hits([one, two], "t2i", 1)
    assert hits[0].tolist() == [1.0, 0.5, 0.5, 1.0]
    other = typed(hits_record("m", 2, [[1, 0, 1, 1]], query_set="other"))
    assert stats.seed_averaged_hits([one, other], "t2i", 1) is None
    assert stats.seed_averaged_hits([one, typed(hits_record("m", 2, [[1, 0, 1]]))], "t2i", 1) is None


# ============================================================================ bootstrap


def test_bootstrap_obvious_answers():
    all_hits = [np.ones(30), np.ones(20)]
    none = [np.zeros(30), np.zeros(20)]
    result = stats.paired_bootstrap(all_hits, none, resamples=2000)
    assert result.delta == pytest.approx(100.0)
    assert result.p_value == pytest.approx(2 / 2001) and result.significant
    same = stats.paired_bootstrap(all_hits, all_hits, resamples=2000)
    assert same.delta == 0.0 and same.p_value == 1.0 and not same.significant
    mixed = [np.array([1, 0] * 15), np.array([0, 1] * 10)]
    assert stats.paired_bootstrap(mixed, mixed, resamples=500).p_value == 1.0


def test_bootstrap_weighs_tasks_equally_like_the_final_average():
    a = [np.ones(10), np.zeros(90)]  # task hit rates 100 % and 0 %: final average 50 %
    b = [np.zeros(10), np.zeros(90)]  # 0 % and 0 %
    assert stats.paired_bootstrap(a, b, resamples=200).delta == pytest.approx(50.0)  # not 10 % as pooled


def test_bootstrap_agrees_with_the_normal_approximation():
    rng = np.random.default_rng(7)
    a = (rng.random(600) < 0.55).astype(float)
    b = np.where(rng.random(600) < 0.8, a, 1 - a)  # correlated with a, as two models on the same queries are
    b[:30] = 0
    d = a - b
    z = d.mean() / (d.std() / math.sqrt(len(d)))
    expected = normal_two_sided(z)
    assert 0.01 < expected < 0.3  # a case where the answer is not trivial
    result = stats.paired_bootstrap([a], [b], resamples=20_000)
    assert result.delta == pytest.approx(100 * d.mean())
    assert result.p_value == pytest.approx(expected, abs=0.02)


def test_bootstrap_agrees_with_an_independent_resampling():
    """The same test written the slow, obvious way: draw query indices per task, recompute."""
    rng = np.random.default_rng(11)
    a = [(rng.random(n) < p).astype(float) for n, p in ((40, 0.6), (25, 0.5), (60, 0.45))]
    b = [np.where(rng.random(len(x)) < 0.75, x, rng.random(len(x)) < 0.4).astype(float) for x in a]
    resamples = 4000
    draw = np.random.default_rng(12345)
    deltas = []
    for _ in range(resamples):
        per_task = []
        for x, y in zip(a, b):
            index = draw.choice(len(x), size=len(x), replace=True)
            per_task.append(x[index].mean() - y[index].mean())
        deltas.append(100 * np.mean(per_task))
    deltas = np.array(deltas)
    independent = min(1.0, 2 * min((1 + (deltas <= 0).sum()) / (1 + resamples),
                                   (1 + (deltas >= 0).sum()) / (1 + resamples)))
    result = stats.paired_bootstrap(a, b, resamples=resamples)
    assert result.delta == pytest.approx(100 * np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    assert result.p_value == pytest.approx(independent, abs=0.04)


def test_bootstrap_is_reproducible_and_pinned():
    a = [np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=float), np.array([1, 0, 0, 1, 1, 0], dtype=float)]
    b = [np.array([1, 0, 0, 1, 0, 0, 1, 0, 1, 0], dtype=float), np.array([0, 0, 0, 1, 1, 0], dtype=float)]
    first = stats.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert stats.paired_bootstrap(a, b, resamples=2000, seed=0) == first
    assert first.delta == pytest.approx(100 * ((0.7 - 0.4) + (0.5 - 1 / 3)) / 2)
    # Pinned value for numpy's PCG64 stream; a change means the resampling changed.
    assert first.p_value == pytest.approx(38 / 2001)
    many = stats.paired_bootstrap_many([(a, b), (b, a), (a, a)], resamples=2000, seed=0)
    assert many[0] == first and many[1].p_value == first.p_value and many[2].p_value == 1.0
    with pytest.raises(ValueError, match="same tasks"):
        stats.paired_bootstrap(a, [b[0]], resamples=10)


def test_bootstrap_exact_zero_differences_count_on_both_sides():
    # The review's case: seed-averaged hits (3 seeds) whose task means are equal. Floating point
    # left 2/3 - 1/3 - (1 - 2/3) = -5.6e-17 and counted those resamples on one side: p = 0.487.
    # Every resample of two queries with differences +1/3 and -1/3 has a difference in
    # {-2/3, 0, +2/3}, symmetric around 0, and the observed one is 0: p is exactly 1.
    assert stats.paired_bootstrap([np.array([2 / 3, 2 / 3])], [np.array([1 / 3, 1.0])]).p_value == 1.0


@pytest.mark.parametrize("seeds", [3, 5, 6, 7])
def test_bootstrap_on_seed_averaged_records_is_exact(seeds):
    """Seed-averaged hits of two methods over unequal tasks, tested against the same resamples
    evaluated in rational arithmetic: the p-value must be exactly that of exact arithmetic."""
    from fractions import Fraction

    rng = np.random.default_rng(seeds)
    sizes = (4, 6, 9)  # unequal task sizes: the cross-task sum must be exact too
    a_records, b_records = [], []
    for seed in range(seeds):
        hits = [list((rng.random(n) < 0.5).astype(int)) for n in sizes]
        a_records.append(typed(hits_record("a", seed, hits)))
        b_records.append(typed(hits_record("b", seed, [list(reversed(h)) for h in hits])))
    _, a = stats.seed_averaged_hits(a_records, "i2t", 1)
    _, b = stats.seed_averaged_hits(b_records, "i2t", 1)
    resamples = 1000  # one chunk: the draws below are the implementation's, task after task
    result = stats.paired_bootstrap(a, b, resamples=resamples)

    draw = np.random.default_rng(stats.BOOTSTRAP_SEED)
    exact = [[Fraction(round(x * seeds), seeds) - Fraction(round(y * seeds), seeds) for x, y in zip(p, q)]
             for p, q in zip(a, b)]
    totals = [Fraction(0)] * resamples
    for d in exact:
        index = draw.integers(0, len(d), size=(resamples, len(d)))
        totals = [total + sum(d[i] for i in row) / len(d) for total, row in zip(totals, index)]
    below, above = sum(t <= 0 for t in totals), sum(t >= 0 for t in totals)
    assert result.p_value == min(1.0, 2 * min((1 + below) / (1 + resamples), (1 + above) / (1 + resamples)))
    assert result.delta == pytest.approx(100 * float(sum(sum(d) / len(d) for d in exact) / len(exact)), abs=1e-12)


def test_as_counts_recovers_seed_fractions_and_refuses_others():
    counts, denominator = stats.as_counts([np.array([0, 1 / 3, 2 / 3, 1.0]), np.array([0.5])])
    assert denominator == 6 and counts[0].tolist() == [0, 2, 4, 6] and counts[1].tolist() == [3]
    assert stats.as_counts([np.array([1 / 7919])]) is None


def test_query_hits_use_the_recorded_ties():
    # Query 1 of task 0 has 0 items above and 3 non-matching tied (one true): expected hit@1 =
    # 1/4, hit@5 = 1. Query 0 of task 1 has 2 above and 4 tied with 2 true: hit@5 = 1 -
    # C(4,3)/C(6,3) = 1 - 4/20.
    record = with_queries({"query_set": "q", "i2t": {
        "tasks": [0, 1], "counts": [2, 2], "ranks": "0020", "ties": [[1, 3, 1], [2, 4, 2]]}})
    _, hits = stats.query_hits(record, "i2t", 1)
    assert [h.tolist() for h in hits] == [[1.0, 0.25], [0.0, 1.0]]
    _, hits = stats.query_hits(record, "i2t", 5)
    assert [h.tolist() for h in hits] == [[1.0, 1.0], [pytest.approx(0.8), 1.0]]
    for ties in ([[5, 1, 1]], [[1, 2, 1, 1, 2, 1]], [[1, 2, 1], [1, 3, 1]], [[0, 1, 0]]):
        bad = with_queries({"query_set": "q", "i2t": {"counts": [2], "ranks": "00", "ties": ties}})
        assert stats.query_hits(bad, "i2t", 1) is None, ties


# ============================================================================ Welch


def test_welch_matches_the_textbook_formula():
    from scipy import stats as scipy_stats

    a, b = [50.0, 52.5, 49.0, 51.0], [45.0, 47.5, 44.0]
    ma, mb = np.mean(a), np.mean(b)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    expected = 2 * scipy_stats.t.sf(abs(t), df)
    result = stats.welch_test(a, b)
    assert result.test == "welch" and result.delta == pytest.approx(ma - mb)
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.significant


def test_welch_needs_three_seeds_and_handles_no_spread():
    assert stats.welch_test([1.0, 2.0], [3.0, 4.0, 5.0]) is None
    assert stats.welch_test([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]).p_value == 1.0
    assert stats.welch_test([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]).p_value == 0.0
    assert stats.welch_test([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]) is None  # only two finite values


# ============================================================================ marks in the tables


def test_tables_mark_significant_differences_from_the_best(tmp_path):
    strong = [[1] * 40, [1] * 30 + [0] * 10, [1] * 35 + [0] * 5]
    twin = [list(h) for h in strong]
    twin[0][0] = 0  # one query apart: not a difference that holds
    weak = [[1] * 10 + [0] * 30, [0] * 40, [1] * 5 + [0] * 35]
    runs = tmp_path / "results" / "runs"
    for method, hits in (("strong", strong), ("twin", twin), ("weak", weak)):
        write(runs, hits_record(method, 0, hits))
    write_tables(load_records(tmp_path / "results"), tmp_path / "tables")
    markdown = (tmp_path / "tables" / "s" / "results.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    header = [c.strip() for c in markdown.splitlines()[2].split("|")[2:-1]]
    final = header.index("i2t R@1 Final avg ↑")
    assert rows["strong"][final].startswith("**") and "†" not in rows["strong"][final]
    assert "†" not in rows["twin"][final]
    assert rows["weak"][final].endswith("†")
    bwt = header.index("i2t R@1 BWT ↑")
    assert not any("†" in row[bwt] for row in rows.values())  # one seed: no test on BWT
    assert "paired bootstrap over the final session's test queries" in markdown
    assert "Welch" not in markdown
    tex = (tmp_path / "tables" / "s" / "results.tex").read_text(encoding="utf-8")
    assert r"$^\dagger$" in tex and "paired bootstrap" in tex and r"p $<$ 0.05" in tex
    caption = tex[tex.index(r"\caption{"):tex.index(r"\label")]
    assert len(caption) <= 400 and r"$^\dagger$ differs from the best method of its column (bold)" in caption
    notes = (tmp_path / "tables" / "s" / "results.notes.tex").read_text(encoding="utf-8")
    assert "10,000 resamples, queries redrawn within each task" in notes and "no correction for multiple" in notes
    compact = (tmp_path / "tables" / "s" / "results.compact.md").read_text(encoding="utf-8")
    weak = next(line for line in compact.splitlines() if line.startswith("| weak"))
    assert weak.split("|")[2].strip().endswith("†")  # i2t R@1: the same cell as in the full table

    table = pd.read_csv(tmp_path / "tables" / "s" / "significance.csv")
    weak_final = table[(table.method == "weak") & (table.metric == "final_average") & (table.k == 1)
                       & (table.direction == "i2t")].iloc[0]
    assert weak_final["reference"] == "strong" and weak_final["test"] == "bootstrap"
    assert weak_final["significant"] and weak_final["p_value"] < 0.05


def test_table_baseline_option_changes_the_reference(tmp_path, capsys):
    strong = [[1] * 40, [1] * 40, [1] * 40]
    weak = [[0] * 40, [0] * 40, [1] * 10 + [0] * 30]
    runs = tmp_path / "runs"
    write(runs, hits_record("strong", 0, strong))
    write(runs, hits_record("weak", 0, weak))
    assert main(["table", str(tmp_path), "--baseline", "weak"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "s" / "significance.csv")
    assert set(table["reference"]) == {"weak"} and set(table["method"]) == {"strong"}
    markdown = (tmp_path / "tables" / "s" / "results.md").read_text(encoding="utf-8")
    assert "differs from the baseline weak" in markdown


def test_seed_level_test_marks_other_columns_with_three_seeds(tmp_path):
    runs = tmp_path / "results" / "runs"
    for seed, (good, bad) in enumerate([(60, 20), (62, 21), (61, 19)]):
        hits = [[1, 0]] * 3
        write(runs, hits_record("steady", seed, hits, with_queries=False, final=[good, good, good]))
        write(runs, hits_record("shaky", seed, hits, with_queries=False, final=[bad, bad, bad]))
    write_tables(load_records(tmp_path / "results"), tmp_path / "tables")
    markdown = (tmp_path / "tables" / "s" / "results.md").read_text(encoding="utf-8")
    assert "Welch's t-test over seeds" in markdown and "bootstrap" not in markdown
    table = pd.read_csv(tmp_path / "tables" / "s" / "significance.csv")
    final = table[(table.metric == "final_average") & (table.direction == "i2t") & (table.k == 1)].iloc[0]
    assert final["test"] == "welch" and final["method"] == "shaky" and final["significant"]


def test_records_on_different_queries_are_not_paired(tmp_path):
    runs = tmp_path / "results" / "runs"
    write(runs, hits_record("one", 0, [[1] * 30] * 3, query_set="first"))
    write(runs, hits_record("two", 0, [[0] * 30] * 3, query_set="second"))
    write_tables(load_records(tmp_path / "results"), tmp_path / "tables")
    markdown = (tmp_path / "tables" / "s" / "results.md").read_text(encoding="utf-8")
    assert "†" not in markdown and "No significance test" in markdown
    assert not (tmp_path / "tables" / "s" / "significance.csv").exists()


def test_recorded_ranks_and_ties_reproduce_the_recall_matrix():
    """What the runner writes per query (ranks + ties) gives back the tie-aware recall that
    evaluation computed, so bootstrap and table agree on tied galleries."""
    import torch

    from benchmark.retrieval import retrieval_ranks
    from benchmark.record import encode_ranks, encode_ties

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2, (30, 3), generator=generator).float()  # many exact ties
    texts = torch.randint(0, 2, (60, 3), generator=generator).float()
    ranks = retrieval_ranks(images, texts, torch.arange(30).repeat_interleave(2))
    for direction in ("i2t", "t2i"):
        tied, tied_true = ranks.ties(direction)
        columns = torch.stack([getattr(ranks, direction), tied, tied_true], dim=1)
        assert encode_ties(columns), "the gallery must contain ties for this test to mean anything"
        record = with_queries({"query_set": "q", direction: {
            "tasks": [0], "counts": [len(columns)], "ranks": encode_ranks(columns[:, 0]),
            "ties": encode_ties(columns)}})
        for k in (1, 5, 10):
            _, (hits,) = stats.query_hits(record, direction, k)
            assert 100 * hits.mean() == pytest.approx(ranks.recall(direction, ks=(k,))[k])
