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

  A resampled difference that is exactly zero counts on *both* sides, so it must be computed
  exactly: in floating point, seed-averaged hits such as 2/3 - 1/3 leave residues of ±1e-17
  that land on one side only and make p too small. Hits are therefore turned back into
  integer counts (a seed-averaged hit is a multiple of 1/seeds; the smallest common
  denominator is recovered) and every resampled difference is an exact integer combination
  of them. Only hits that are no such fraction (tie-aware expected hits, see
  :mod:`benchmark.retrieval`) fall back to floating point, where differences within
  :data:`FLOAT_ZERO` of zero count as zero.
* **Welch's t-test over seeds** (every other column, and final averages when per-query ranks
  are missing): the per-seed values of the two methods, unequal variances. Only run when both
  methods have at least :data:`MIN_SEEDS_FOR_T_TEST` seeds: with two values per method the
  variance estimates have one degree of freedom each and the test rests on normality alone.

Neither corrects for multiple comparisons (a table makes many); the caption says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .record import RANK_BEYOND, RANK_CAP, RunRecord  # noqa: F401 (RANK_BEYOND: its old home was here)
from .retrieval import hits_at_k

ALPHA = 0.05
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_SEEDS_FOR_T_TEST = 3
MAX_DENOMINATOR = 5040  # hits are recovered as exact fractions up to this denominator (7!: any 1..10 seeds)
FLOAT_ZERO = 1e-9  # float fallback only: |resampled difference in hit-rate units| below this is zero


@dataclass(frozen=True)
class Comparison:
    test: str  # "bootstrap" | "welch"
    delta: float  # mean(a) - mean(b), in the metric's unit
    p_value: float

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < ALPHA


# ============================================================================ per-query hits


def query_ranks(record: RunRecord, direction: str) -> tuple[str, list[np.ndarray]] | None:
    """``(query_set, [ranks of task j's queries for each evaluated task])`` of a record's final
    session, or None when the record has none. A rank is the number of gallery items strictly
    above the query's best true match; 10 stands for "10 or worse"."""
    found = record.final_queries.get(direction)
    if found is None:
        return None
    return found.query_set, found.per_task()


def query_hits(record: RunRecord, direction: str, k: int) -> tuple[str, list[np.ndarray]] | None:
    """``(query_set, [hit at K of each query of task j, for each task])`` of the final session,
    ties counted as in :func:`benchmark.retrieval.hits_at_k` (``ties`` of the record; a record
    without them has none). None when the record has no per-query ranks or ``k > 10``."""
    found = record.final_queries.get(direction)
    if found is None or k > RANK_CAP:
        return None
    values, ties = found.ranks, found.ties
    hits = (values < k).astype(np.float64)
    if ties is not None and len(ties):
        index, tied, tied_true = ties[:, 0], ties[:, 1], ties[:, 2]
        hits[index] = hits_at_k(torch.from_numpy(values[index]), k, tied=torch.from_numpy(tied),
                                tied_true=torch.from_numpy(tied_true)).numpy()
    return found.query_set, found.per_task(hits)


def seed_averaged_hits(records: Sequence[RunRecord], direction: str, k: int) -> tuple[str, list[np.ndarray]] | None:
    """Per task, each query's hit at K averaged over the records (seeds); None if any record
    lacks per-query ranks or the records disagree on the queries."""
    found = [query_hits(record, direction, k) for record in records]
    if not found or any(f is None for f in found):
        return None
    query_set = found[0][0]
    shapes = [len(r) for r in found[0][1]]
    if any(f[0] != query_set or [len(r) for r in f[1]] != shapes for f in found):
        return None
    tasks = len(shapes)
    return query_set, [np.mean([f[1][t] for f in found], axis=0) for t in range(tasks)]


def as_counts(values: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int] | None:
    """``(integer counts, denominator)`` with ``values == counts / denominator`` for every
    array, the smallest such denominator up to :data:`MAX_DENOMINATOR`; None if there is none
    (e.g. tie-aware expected hits with large denominators)."""
    # Few distinct values (k / seeds for 0/1 hits): search the denominator on those alone.
    distinct = np.unique(np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values]))
    for denominator in range(1, MAX_DENOMINATOR + 1):
        scaled = distinct * denominator
        # Seed averaging leaves errors of ~1e-16; a true fraction is far inside this bound, and
        # a value that is no such fraction is very unlikely to fall within it.
        if np.all(np.abs(scaled - np.rint(scaled)) <= 1e-12 * denominator):
            break
    else:
        return None
    return [np.rint(np.asarray(v, dtype=np.float64) * denominator).astype(np.int64) for v in values], denominator


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
    for a, b in pairs:
        if len(a) != len(sizes) or len(b) != len(sizes) or any(len(a[t]) != n or len(b[t]) != n
                                                              for t, n in enumerate(sizes)):
            raise ValueError("paired samples need the same tasks and the same number of queries per task")
    counts = as_counts([task for a, b in pairs for task in (*a, *b)])
    if counts is not None:
        numbers, denominator = counts
        dtype = np.int64
    else:
        numbers, denominator = [np.asarray(task, dtype=np.float64) for a, b in pairs for task in (*a, *b)], 1
        dtype = np.float64
    T = len(sizes)
    # Per task: [n_t, P] hit differences, in units of 1/denominator (exact integers when counts).
    diffs = [np.stack([numbers[p * 2 * T + t] - numbers[p * 2 * T + T + t] for p in range(len(pairs))], axis=1)
             .astype(dtype) for t in range(T)]
    observed = 100.0 * np.mean([d.mean(axis=0) for d in diffs], axis=0) / denominator  # [P], percent
    # The statistic is proportional to sum_t S_t / n_t (S_t: a task's resampled sum of differences).
    # Its sign is taken exactly from sum_t S_t * (L / n_t), L = lcm(n_t): int64 when that cannot
    # overflow, Python integers otherwise.
    weights = [math.lcm(*sizes) // n for n in sizes]
    bound = len(sizes) * math.lcm(*sizes) * max(1, int(np.abs(np.concatenate(diffs)).max(initial=0)))
    exact_dtype = np.int64 if bound < 2 ** 62 else object

    rng = np.random.default_rng(seed)
    below = np.zeros(len(pairs))
    above = np.zeros(len(pairs))
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        if dtype is np.int64:
            total = np.zeros((size, len(pairs)), dtype=exact_dtype)
        else:
            total = np.zeros((size, len(pairs)))
        for d, n, weight in zip(diffs, sizes, weights):
            # How often each query is drawn in each bootstrap sample (rows sum to n).
            draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
            drawn = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
            if dtype is np.int64:
                total += (drawn @ d).astype(exact_dtype) * weight
            else:
                total += drawn @ d / n
        if dtype is not np.int64:
            total = np.where(np.abs(total) <= FLOAT_ZERO * len(sizes), 0.0, total)
        below += (total <= 0).sum(axis=0)
        above += (total >= 0).sum(axis=0)
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
