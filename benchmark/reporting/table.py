"""The paper tables as cells: which columns, each cell's mean ± std, the best value of each
column, and how a value is written (one decimal, the same in every format)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from benchmark.metrics import METRICS, MetricSpec

# Directions in the order tables show them; a record may in principle hold others, which
# land in results.csv but not in the paper table.
DIRECTIONS = ("i2t", "t2i")
DIRECTION_NAMES = {"i2t": "image→text", "t2i": "text→image"}

# The paper table: metrics shown at the first K, and the one metric shown at the others.
MAIN_METRICS_FIRST_K = ("final_average", "average_incremental", "backward_transfer", "forgetting_max")
MAIN_METRICS_OTHER_KS = ("final_average",)


@dataclass(frozen=True)
class Column:
    direction: str
    k: int
    metric: str

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]


@dataclass(frozen=True)
class SummaryColumn:
    """A compact-table column that spans directions: ``average`` or ``backward_transfer``."""

    key: str
    metric: str  # the metric whose direction of "better" it follows
    k: int  # the K it is about (the first K for BWT; the first of several for the average)

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]


@dataclass
class Cell:
    mean: float
    std: float
    n_seeds: int
    best: bool = False
    significant: bool = False  # differs from the column's reference method (benchmark.reporting.significance)


@dataclass
class Significance:
    """What the significance marks of one table are based on."""

    reference: str | None  # the baseline method, or None: each column's best
    tests: set[str] = field(default_factory=set)  # tests that were run: "bootstrap", "welch"
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per comparison, for significance.csv


@dataclass
class MainTable:
    columns: list[Column]
    rows: dict[str, list[Cell | None]]  # method -> one cell per column (None: no value)
    significance: Significance | None = None


@dataclass
class CompactTable:
    """R@K final averages per direction, then their average and BWT; cells shared with the full table."""

    columns: list[Column | SummaryColumn]
    rows: dict[str, list[Cell | None]]
    ks: tuple[int, ...]
    significance: Significance | None = None


def main_table(aggregated: pd.DataFrame, methods: list[str], ks: tuple[int, ...]) -> MainTable:
    lookup = {
        (row.method, row.direction, row.k, row.metric): Cell(row.mean, row.std, row.n_seeds)
        for row in aggregated.itertuples(index=False)
        if row.n_seeds > 0
    }
    present = set(aggregated["direction"])
    directions = [d for d in DIRECTIONS if d in present]
    wanted = [
        Column(direction, k, metric)
        for direction in directions
        for k, metrics in [(ks[0], MAIN_METRICS_FIRST_K)] + [(k, MAIN_METRICS_OTHER_KS) for k in ks[1:]]
        for metric in metrics
    ]
    # A column nobody has a value for (a K that was not evaluated) would be all dashes.
    columns = [c for c in wanted if any((m, c.direction, c.k, c.metric) in lookup for m in methods)]
    rows = {m: [lookup.get((m, c.direction, c.k, c.metric)) for c in columns] for m in methods}
    mark_best(columns, rows)
    return MainTable(columns, rows)


def compact_table(main: MainTable, summary: pd.DataFrame, ks: tuple[int, ...]) -> CompactTable:
    """The compact view of ``main``: its final-average columns (the same cells, with their bold
    and daggers), then the average of those and the BWT at the first K (``summary``:
    :func:`benchmark.reporting.frames.compact_frame`)."""
    wanted = [i for i, c in enumerate(main.columns) if c.metric == "final_average" and c.k in ks]
    columns: list[Column | SummaryColumn] = [main.columns[i] for i in wanted]
    rows = {method: [cells[i] for i in wanted] for method, cells in main.rows.items()}
    lookup = {(row.method, row.column): Cell(row.mean, row.std, row.n_seeds)
              for row in summary.itertuples(index=False) if row.n_seeds > 0}
    extra = [SummaryColumn("average", "final_average", ks[0]), SummaryColumn("backward_transfer", "backward_transfer", ks[0])]
    extra = [c for c in extra if any((m, c.key) in lookup for m in rows)]
    for method in rows:
        rows[method] = rows[method] + [lookup.get((method, c.key)) for c in extra]
    offset = len(columns)
    columns += extra
    mark_best(columns, rows, start=offset)
    return CompactTable(columns, rows, ks, main.significance)


def mark_best(columns: Sequence[Column | SummaryColumn], rows: dict[str, list[Cell | None]], start: int = 0) -> None:
    """Bold the best value of each column from ``start`` on, judged on the rounded values shown
    (so equal-looking cells are bold together)."""
    for index in range(start, len(columns)):
        cells = [row[index] for row in rows.values() if row[index] is not None]
        # "Best" only means something when there is something to beat.
        if len(cells) < 2:
            continue
        shown = [rounded(cell.mean) for cell in cells]
        best = max(shown) if columns[index].spec.higher_is_better else min(shown)
        for cell, value in zip(cells, shown):
            cell.best = value == best


def rounded(value: float) -> float:
    # Adding 0.0 turns -0.0 into 0.0, so a tiny negative BWT does not print as "-0.0".
    return round(float(value), 1) + 0.0


def format_value(cell: Cell | None, pm: str, missing: str) -> str:
    if cell is None or math.isnan(cell.mean):
        return missing
    if cell.n_seeds < 2 or math.isnan(cell.std):
        return f"{rounded(cell.mean):.1f}"
    return f"{rounded(cell.mean):.1f} {pm} {rounded(cell.std):.1f}"


def arrow(spec: MetricSpec, up: str, down: str) -> str:
    return up if spec.higher_is_better else down


def ordered_directions(directions) -> list[str]:
    """Known directions in table order, then any other in name order."""
    return sorted(set(directions), key=lambda d: (d not in DIRECTIONS, DIRECTIONS.index(d) if d in DIRECTIONS else 0, d))
