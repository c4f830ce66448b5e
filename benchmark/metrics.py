"""Continual-learning summaries of a recall matrix.

A run stores, for each retrieval direction (i2t / t2i) and each K, a T x T matrix ``R``
where ``R[t][j]`` is the recall (in percent) on task ``j``'s test split measured after
training session ``t`` (both 0-based; session t trains on task t). Cells that were not
evaluated are ``None`` or NaN; when only the tasks seen so far are evaluated the upper
triangle (j > t) is missing. ``R_init[j]``, when present, is the recall on task ``j`` of
the model before any training.

Every metric below is a plain function of ``R`` (and ``R_init``) whose docstring gives its
exact formula; ``docs/metrics.md`` has the same definitions with a worked example.
``METRICS`` describes them for reporting code and :func:`summarize` computes all of them.

Metrics that compare two sessions (BWT, forgetting, FWT, LPI forgetting) have no value
for a single task (T == 1): they return NaN rather than raising, so a one-task run still
produces a summary table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "MissingCellError",
    "MetricSpec",
    "METRICS",
    "final_average",
    "average_incremental",
    "backward_transfer",
    "forgetting",
    "last_forgetting",
    "forward_transfer",
    "lpi_average_over_history",
    "lpi_signed_forgetting",
    "summarize",
    "rsum",
]


class MissingCellError(ValueError):
    """A cell a metric needs was not evaluated (None / NaN)."""

    def __init__(self, metric: str, cell: tuple[int, int] | int, hint: str = "") -> None:
        # A tuple is a cell (t, j) of R; an int is an entry j of R_init.
        if isinstance(cell, tuple):
            where = f"cell (t={cell[0]}, j={cell[1]}) of R"
        else:
            where = f"R_init[{cell}]"
        message = f"{metric} needs {where} but it is missing (None/NaN)"
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.metric = metric
        self.cell = cell


# ---------------------------------------------------------------------------- helpers


def _as_matrix(R: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """``R`` as a float T x T array with None turned into NaN; checks the shape."""
    try:
        matrix = np.array(R, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"R must be a square T x T table of numbers/None: {error}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"R must be a square T x T matrix with T >= 1, got shape {matrix.shape}")
    return matrix


def _require(matrix: np.ndarray, cells: Iterable[tuple[int, int]], metric: str, hint: str = "") -> None:
    """Raise :class:`MissingCellError` for the first needed cell that is NaN."""
    for t, j in cells:
        if math.isnan(matrix[t, j]):
            raise MissingCellError(metric, (t, j), hint)


def _lower_triangle(T: int) -> list[tuple[int, int]]:
    return [(t, j) for t in range(T) for j in range(t + 1)]


# ---------------------------------------------------------------------------- metrics


def final_average(R) -> float:
    """Average recall over all tasks after the last session.

    final_average = (1/T) * sum_{j=0}^{T-1} R[T-1][j]
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    _require(matrix, [(T - 1, j) for j in range(T)], "final_average")
    return float(matrix[T - 1].mean())


def average_incremental(R) -> float:
    """Average incremental recall (Rebuffi et al. 2017, iCaRL).

    After each session, average over the tasks seen so far; then average those over
    sessions:

        average_incremental = (1/T) * sum_{t=0}^{T-1} [ (1/(t+1)) * sum_{j=0}^{t} R[t][j] ]
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    _require(matrix, _lower_triangle(T), "average_incremental")
    per_session = [matrix[t, : t + 1].mean() for t in range(T)]
    return float(np.mean(per_session))


def backward_transfer(R) -> float:
    """Backward transfer, BWT (Lopez-Paz & Ranzato 2017, GEM).

    How much training on later tasks changed the recall on earlier tasks, relative to
    the recall just after learning them:

        BWT = (1/(T-1)) * sum_{j=0}^{T-2} ( R[T-1][j] - R[j][j] )

    Sign: negative means forgetting, positive means later tasks helped. NaN when T == 1.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    _require(matrix, [(j, j) for j in range(T - 1)] + [(T - 1, j) for j in range(T - 1)], "backward_transfer")
    return float(np.mean([matrix[T - 1, j] - matrix[j, j] for j in range(T - 1)]))


def forgetting(R) -> float:
    """Average forgetting, max-based (Chaudhry et al. 2018, RWalk); ``forgetting_max`` in tables.

    For each old task, the drop from the best recall it ever had (after learning it and
    before the last session) to its final recall:

        forgetting = (1/(T-1)) * sum_{j=0}^{T-2} ( max_{s=j}^{T-2} R[s][j] - R[T-1][j] )

    Sign: positive means forgetting (higher is worse). NaN when T == 1.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    _require(matrix, [(s, j) for j in range(T - 1) for s in range(j, T)], "forgetting")
    drops = [matrix[j : T - 1, j].max() - matrix[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def last_forgetting(R) -> float:
    """Average forgetting, last-based, as Avalanche computes it; ``forgetting_last`` in tables.

    For each old task, the drop from its recall just after it was learned to its final recall:

        forgetting_last = (1/(T-1)) * sum_{j=0}^{T-2} ( R[j][j] - R[T-1][j] )

    This is Avalanche's ``StreamForgetting`` at the end of the stream
    (``avalanche/evaluation/metrics/forgetting_bwt.py``: an experience's "initial" value is the
    evaluation right after training on it, "last" the latest one, and the experience just
    trained is left out), so numbers from Avalanche-based papers compare with this one. It
    equals ``-BWT``; the max-based :func:`forgetting` is never smaller. Sign: positive means
    forgetting. NaN when T == 1.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    _require(matrix, [(j, j) for j in range(T - 1)] + [(T - 1, j) for j in range(T - 1)], "last_forgetting")
    return float(np.mean([matrix[j, j] - matrix[T - 1, j] for j in range(T - 1)]))


def forward_transfer(R, R_init) -> float:
    """Forward transfer, FWT (Lopez-Paz & Ranzato 2017), with the untrained model as reference.

    How much training up to session j-1 helps task j before it is trained on, relative
    to the model before any training (b_j = R_init[j]):

        FWT = (1/(T-1)) * sum_{j=1}^{T-1} ( R[j-1][j] - R_init[j] )

    Needs the upper cells R[j-1][j], i.e. a run that evaluates all tasks after every
    session. Sign: positive means earlier training helped unseen tasks. NaN when T == 1.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    init = np.array([math.nan if v is None else v for v in R_init], dtype=float)
    if init.shape != (T,):
        raise ValueError(f"R_init must have one value per task ({T}), got shape {init.shape}")
    if T == 1:
        return math.nan
    _require(
        matrix,
        [(j - 1, j) for j in range(1, T)],
        "forward_transfer",
        hint="FWT needs recall on tasks not yet trained on: evaluate with tasks 'all', not 'seen'",
    )
    for j in range(1, T):
        if math.isnan(init[j]):
            raise MissingCellError("forward_transfer", j, "the pre-training evaluation is incomplete")
    return float(np.mean([matrix[j - 1, j] - init[j] for j in range(1, T)]))


def lpi_average_over_history(R) -> float:
    """LPI's "average" (Low-rank Prompt Interaction, ACM MM 2024, reshandle.py).

    Each task's recall averaged over every session from the one that learned it to the
    last, then averaged over tasks:

        lpi_average = (1/T) * sum_{j=0}^{T-1} [ (1/(T-j)) * sum_{s=j}^{T-1} R[s][j] ]

    This is neither final_average (last row only) nor average_incremental (averages rows,
    not columns); it exists to compare with numbers reported in that paper.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    _require(matrix, [(s, j) for j in range(T) for s in range(j, T)], "lpi_average_over_history")
    return float(np.mean([matrix[j:, j].mean() for j in range(T)]))


def lpi_signed_forgetting(R) -> float:
    """LPI's forgetting (ACM MM 2024, reshandle.py): max-based forgetting with the sign flipped.

        lpi_forgetting = (1/(T-1)) * sum_{j=0}^{T-2} ( R[T-1][j] - max_{s=j}^{T-2} R[s][j] )

    Sign: NEGATIVE when the model forgets (it equals -forgetting(R)); higher is better.
    NaN when T == 1.
    """
    matrix = _as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    _require(matrix, [(s, j) for j in range(T - 1) for s in range(j, T)], "lpi_signed_forgetting")
    changes = [matrix[T - 1, j] - matrix[j : T - 1, j].max() for j in range(T - 1)]
    return float(np.mean(changes))


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricSpec:
    """How reporting code should present one metric."""

    name: str
    function: Callable[..., float]  # f(R) or, when needs_init, f(R, R_init)
    higher_is_better: bool
    needs_init: bool
    label: str  # short column header
    definition: str  # one-line formula


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in [
        MetricSpec(
            "final_average", final_average, True, False, "Final avg",
            "(1/T) sum_j R[T-1][j]",
        ),
        MetricSpec(
            "average_incremental", average_incremental, True, False, "Avg incr",
            "(1/T) sum_t (1/(t+1)) sum_{j<=t} R[t][j]",
        ),
        MetricSpec(
            "backward_transfer", backward_transfer, True, False, "BWT",
            "(1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])",
        ),
        MetricSpec(
            "forgetting_max", forgetting, False, False, "Forget (max)",
            "(1/(T-1)) sum_{j<T-1} (max_{j<=s<=T-2} R[s][j] - R[T-1][j])",
        ),
        MetricSpec(
            "forgetting_last", last_forgetting, False, False, "Forget (last)",
            "(1/(T-1)) sum_{j<T-1} (R[j][j] - R[T-1][j])",
        ),
        MetricSpec(
            "forward_transfer", forward_transfer, True, True, "FWT",
            "(1/(T-1)) sum_{j>=1} (R[j-1][j] - R_init[j])",
        ),
        MetricSpec(
            "lpi_average_over_history", lpi_average_over_history, True, False, "LPI avg",
            "(1/T) sum_j (1/(T-j)) sum_{s>=j} R[s][j]",
        ),
        MetricSpec(
            "lpi_signed_forgetting", lpi_signed_forgetting, True, False, "LPI forget",
            "(1/(T-1)) sum_{j<T-1} (R[T-1][j] - max_{j<=s<=T-2} R[s][j])",
        ),
    ]
}


def summarize(R, R_init=None) -> dict[str, float]:
    """Every metric of :data:`METRICS` that can be computed, keyed by metric name.

    Metrics needing ``R_init`` (FWT) are skipped when ``R_init`` is None or when the
    cells they need are missing (a run that evaluated only seen tasks). Any other
    missing cell is an error, since every run evaluates at least the lower triangle.
    Metrics undefined for T == 1 appear as NaN.
    """
    summary: dict[str, float] = {}
    for name, spec in METRICS.items():
        if spec.needs_init:
            if R_init is None:
                continue
            try:
                summary[name] = spec.function(R, R_init)
            except MissingCellError:
                continue
        else:
            summary[name] = spec.function(R)
    return summary


def rsum(recalls: Mapping[str, Mapping[int, float]]) -> float:
    """RSUM: R@1 + R@5 + R@10 of image->text plus the same of text->image (0..600).

    ``recalls`` is ``{"i2t": {1: r1, 5: r5, 10: r10}, "t2i": {...}}``. String keys
    ("1", "5", "10"), as found after a JSON round trip, are accepted too.
    """
    total = 0.0
    for direction in ("i2t", "t2i"):
        if direction not in recalls:
            raise ValueError(f"rsum needs recalls for direction {direction!r}; got {sorted(recalls)}")
        by_k = recalls[direction]
        for k in (1, 5, 10):
            if k in by_k:
                value = by_k[k]
            elif str(k) in by_k:
                value = by_k[str(k)]
            else:
                raise ValueError(f"rsum needs R@{k} for {direction}; got keys {sorted(map(str, by_k))}")
            total += float(value)
    return total
