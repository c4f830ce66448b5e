"""Significance marks: which cells differ from their column's reference method, by which test,
and the sentence that says so (:mod:`benchmark.stats` runs the tests)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from benchmark import stats
from benchmark.record import RunRecord

from .table import MainTable, Significance

logger = logging.getLogger("benchmark.reporting")  # the package's one logger name


def mark_significance(table: MainTable, runs: pd.DataFrame, records: list[RunRecord],
                      baseline: str | None) -> Significance:
    """Mark the cells that differ significantly from their column's reference method."""
    methods = list(table.rows)
    if baseline is not None and baseline not in methods:
        logger.warning("baseline %r has no runs in this table (methods: %s); comparing with each column's best",
                       baseline, ", ".join(methods))
        baseline = None
    significance = Significance(reference=baseline)
    by_method: dict[str, list[RunRecord]] = {}
    for record in records:
        by_method.setdefault(record.method, []).append(record)
    per_seed = {key: group["value"].tolist() for key, group in runs.groupby(["method", "direction", "k", "metric"])}

    # Final-average columns get the bootstrap, all pairs over the same queries at once (shared resamples).
    planned: dict[tuple[str, str], list[tuple[int, str, str, Any, Any]]] = {}
    for index, column in enumerate(table.columns):
        reference = baseline or _best_method(table, index)
        if reference is None or table.rows[reference][index] is None:
            continue
        for method in methods:
            cell = table.rows[method][index]
            if method == reference or cell is None:
                continue
            result = None
            if column.metric == "final_average":
                mine = stats.seed_averaged_hits(by_method[method], column.direction, column.k)
                theirs = stats.seed_averaged_hits(by_method[reference], column.direction, column.k)
                if mine is not None and theirs is not None and mine[0] == theirs[0]:
                    planned.setdefault((column.direction, mine[0]), []).append(
                        (index, method, reference, mine[1], theirs[1]))
                    continue
            result = stats.welch_test(per_seed.get((method, column.direction, column.k, column.metric), []),
                                      per_seed.get((reference, column.direction, column.k, column.metric), []))
            _apply(significance, table, index, method, reference, result)
    for comparisons in planned.values():
        results = stats.paired_bootstrap_many([(mine, theirs) for _, _, _, mine, theirs in comparisons])
        for (index, method, reference, _, _), result in zip(comparisons, results):
            _apply(significance, table, index, method, reference, result)
    significance.rows.sort(key=lambda row: (row["direction"], row["k"], row["metric"], row["method"]))
    return significance


def _apply(significance: Significance, table: MainTable, index: int, method: str, reference: str,
           result: stats.Comparison | None) -> None:
    if result is None:
        return
    column = table.columns[index]
    significance.tests.add(result.test)
    table.rows[method][index].significant = result.significant
    significance.rows.append({"direction": column.direction, "k": column.k, "metric": column.metric,
                              "method": method, "reference": reference, "test": result.test,
                              "difference": result.delta, "p_value": result.p_value,
                              "significant": result.significant})


def _best_method(table: MainTable, index: int) -> str | None:
    """The method with the best unrounded mean in a column (ties: the first in table order)."""
    spec = table.columns[index].spec
    candidates = [(method, cells[index].mean) for method, cells in table.rows.items()
                  if cells[index] is not None and not math.isnan(cells[index].mean)]
    if len(candidates) < 2:
        return None
    pick = max if spec.higher_is_better else min
    return pick(candidates, key=lambda item: item[1])[0]


def reference_phrase(significance: Significance) -> str:
    return (f"the baseline {significance.reference}" if significance.reference
            else "the best method of its column (bold)")


def significance_sentence(significance: Significance, target: str, text) -> str:
    """Names the tests behind the daggers (or says why there are none)."""
    dagger, less, geq = ("†", "<", "≥") if target == "md" else (r"$^\dagger$", "$<$", r"$\geq$")
    n = stats.MIN_SEEDS_FOR_T_TEST
    if not significance.tests:
        return text(f"No significance test: the records hold no per-query ranks, and fewer than {n} seeds per method.")
    parts = []
    if "bootstrap" in significance.tests:
        parts.append(text(f"final-average columns by a two-sided paired bootstrap over the final session's test "
                          f"queries ({stats.RESAMPLES:,} resamples, queries redrawn within each task, per-query "
                          "hits averaged over seeds)"))
    if "welch" in significance.tests:
        where = "the other columns" if "bootstrap" in significance.tests else "all columns"
        parts.append(text(f"{where} by Welch's t-test over seeds (methods with ") + geq + text(f" {n} seeds)"))
    return (f"{dagger} " + text(f"differs from {reference_phrase(significance)} at p ") + less
            + text(f" {stats.ALPHA}: ") + text("; ").join(parts) + text("; no correction for multiple comparisons."))


def short_significance_sentence(significance: Significance, target: str, text) -> str:
    """The daggers in a few words, for a caption that must stay short (the tests: the notes)."""
    if not significance.tests:
        return ""
    dagger, less = ("†", "<") if target == "md" else (r"$^\dagger$", "$<$")
    names = [name for test, name in (("bootstrap", "paired bootstrap over test queries"),
                                     ("welch", "Welch's t-test over seeds")) if test in significance.tests]
    return (f"{dagger} " + text(f"differs from {reference_phrase(significance)} at p ") + less
            + text(f" {stats.ALPHA} ({'; '.join(names)})."))
