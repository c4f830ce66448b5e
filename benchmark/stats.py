"""Significance tests between methods, for the marks in the paper table.

Two tests, each where it applies:

* **Paired bootstrap over test queries** (final-average columns). A run record keeps, for its
  final session, the rank of every test query (``final_session_queries``), so two methods
  evaluated on the same queries can be compared query by query. The statistic is the
  difference in final average recall@K (the mean over tasks of each task's hit rate, exactly
  the table's number). Each bootstrap sample redraws, with replacement, the queries of every
  task separately (the task sizes stay fixed, as the metric weighs tasks equally), and applies
  the same draw to both methods: that is the pairing. With several seeds, a query's hit is
  averaged over the seeds first, so the test is about the seed-averaged number the table
  shows. Two-sided p-value: ``min(1, 2 * min(P(d* <= 0), P(d* >= 0)))`` over the bootstrap
  differences ``d*``, each probability counted as ``(1 + count) / (1 + resamples)`` so that it
  is never 0. Resamples are drawn from a fixed seed: a table is reproducible.
* **Welch's t-test over seeds** (every other column, and final averages when per-query ranks
  are missing): the per-seed values of the two methods, unequal variances. Only run when both
  methods have at least :data:`MIN_SEEDS_FOR_T_TEST` seeds: with two values per method the
  variance estimates have one degree of freedom each and the test rests on normality alone.

Neither corrects for multiple comparisons (a table makes many); the caption says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ALPHA = 0.05
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_SEEDS_FOR_T_TEST = 3
RANK_BEYOND = "x"  # the runner's code for "rank 10 or worse"


@dataclass(frozen=True)
class Comparison:
    test: str  # "bootstrap" | "welch"
    delta: float  # mean(a) - mean(b), in the metric's unit
    p_value: float

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < ALPHA


# ============================================================================ per-query hits


def query_ranks(record: Mapping, direction: str) -> tuple[str, list[np.ndarray]] | None:
    """``(query_set, [ranks of task j's queries for each evaluated task])`` of a record's final
    session, or None when the record has none. Rank 10 stands for "10 or worse"."""
    block = record.get("final_session_queries")
    if not isinstance(block, Mapping) or not isinstance(block.get(direction), Mapping):
        return None
    entry = block[direction]
    text, counts = entry.get("ranks"), entry.get("counts")
    if not isinstance(text, str) or not isinstance(counts, list) or sum(counts) != len(text):
        return None
    values = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) - ord("0")
    values[values == ord(RANK_BEYOND) - ord("0")] = 10
    if values.min(initial=0) < 0 or values.max(initial=0) > 10:
        return None
    bounds = np.cumsum([0, *counts])
    return str(block.get("query_set")), [values[bounds[i]:bounds[i + 1]] for i in range(len(counts))]


def seed_averaged_hits(records: Sequence[Mapping], direction: str, k: int) -> tuple[str, list[np.ndarray]] | None:
    """Per task, each query's hit at K averaged over the records (seeds); None if any record
    lacks per-query ranks or the records disagree on the queries."""
    if k > 10:
        return None
    found = [query_ranks(record, direction) for record in records]
    if not found or any(f is None for f in found):
        return None
    query_set = found[0][0]
    shapes = [len(r) for r in found[0][1]]
    if any(f[0] != query_set or [len(r) for r in f[1]] != shapes for f in found):
        return None
    tasks = len(shapes)
    return query_set, [np.mean([(f[1][t] < k).astype(np.float64) for f in found], axis=0) for t in range(tasks)]


# ============================================================================ paired bootstrap


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Test the difference in final average recall (%) between ``a`` and ``b``: per task, the
    per-query hits (0/1, or seed-averaged) of the same queries in the same order."""
    return paired_bootstrap_many([(a, b)], resamples=resamples, seed=seed)[0]


def paired_bootstrap_many(pairs: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *,
                          resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, chunk: int = 1000) -> list[Comparison]:
    """:func:`paired_bootstrap` for several pairs over the *same* queries at once: every pair
    sees the same resampled queries (one draw per bootstrap sample), which is both consistent
    and much faster than drawing per pair."""
    if not pairs:
        return []
    sizes = [len(task) for task in pairs[0][0]]
    if not sizes or min(sizes) == 0:
        raise ValueError("every task needs at least one query")
    diffs = []  # per task: [n_t, P] hit differences
    for t, n in enumerate(sizes):
        columns = []
        for a, b in pairs:
            if len(a) != len(sizes) or len(b) != len(sizes) or len(a[t]) != n or len(b[t]) != n:
                raise ValueError("paired samples need the same tasks and the same number of queries per task")
            columns.append(np.asarray(a[t], dtype=np.float64) - np.asarray(b[t], dtype=np.float64))
        diffs.append(np.stack(columns, axis=1))
    observed = 100.0 * np.mean([d.mean(axis=0) for d in diffs], axis=0)  # [P], percent

    rng = np.random.default_rng(seed)
    below = np.zeros(len(pairs))
    above = np.zeros(len(pairs))
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        total = np.zeros((size, len(pairs)))
        for d, n in zip(diffs, sizes):
            # How often each query is drawn in each bootstrap sample (rows sum to n).
            draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
            counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
            total += counts @ d / n
        deltas = 100.0 * total / len(sizes)
        below += (deltas <= 0).sum(axis=0)
        above += (deltas >= 0).sum(axis=0)
        done += size
    p_values = np.minimum(1.0, 2.0 * np.minimum((1 + below) / (1 + resamples), (1 + above) / (1 + resamples)))
    return [Comparison("bootstrap", float(delta), float(p)) for delta, p in zip(observed, p_values)]


# ============================================================================ over seeds


def welch_test(a: Sequence[float], b: Sequence[float]) -> Comparison | None:
    """Welch's two-sided t-test on per-seed values; None with fewer than
    :data:`MIN_SEEDS_FOR_T_TEST` finite values on either side, or without scipy."""
    a = [float(v) for v in a if v is not None and math.isfinite(v)]
    b = [float(v) for v in b if v is not None and math.isfinite(v)]
    if min(len(a), len(b)) < MIN_SEEDS_FOR_T_TEST:
        return None
    delta = float(np.mean(a) - np.mean(b))
    if np.var(a) == 0 and np.var(b) == 0:
        # No spread at all: any difference is exact (p=0), none is no evidence (p=1).
        return Comparison("welch", delta, 0.0 if delta != 0 else 1.0)
    try:
        from scipy import stats
    except ImportError:  # scipy comes with avalanche-lib's scikit-learn; without it, no seed-level test
        return None
    result = stats.ttest_ind(a, b, equal_var=False)
    return Comparison("welch", delta, float(result.pvalue))
