"""Tables and figures from finished runs.

Input: the run records that ``python -m benchmark run`` writes to ``<results_dir>/runs/``
(one JSON file per method x scenario x seed, schema ``clvl-benchmark/run-record/v1``).
Output, by default under ``<results_dir>/tables/`` and ``<results_dir>/figures/``:

``tables/<scenario>/`` (``tables/<scenario>/<protocol>/`` when a scenario was run under
several evaluation protocols) holds

* ``results.csv`` -- every metric of :data:`benchmark.metrics.METRICS`, for every retrieval
  direction and K, aggregated over seeds: ``mean``, ``std`` (ddof=1, empty for one seed) and
  ``n_seeds``. This is the machine-readable file; everything else is a view of it.
* ``results.md`` / ``results.tex`` -- the paper table (layout below).
* ``lpi_view.csv`` / ``lpi_view.md`` -- the two metrics that the LPI paper (ACM MM 2024)
  reports, per K and averaged over the K values, for comparison with its numbers.
* ``final_per_task.csv`` -- recall on each task after the last session, mean over seeds.

``figures/heatmap_<scenario>_<method>.png`` shows the seed-averaged R@1 matrices.

Paper table layout
------------------
One row per method. For each direction (i2t, then t2i), with K0 = the first of ``ks``
(R@1 by default): R@K0 final average, R@K0 average incremental, R@K0 BWT, R@K0 max-based forgetting,
then the final average for each remaining K (R@5, R@10). That is the usual "accuracy +
stability" summary at the strictest K plus the final level at the looser Ks, 12 columns in
all. Cells read "mean ± std" over seeds (only "mean" for one seed), one decimal. The best
value of each column is bold, judged by the metric's ``higher_is_better`` on the rounded
values that are shown (so equal-looking cells are bold together); arrows in the headers
say which way is better.

Significance marks
------------------
A dagger (†) marks a cell whose difference from the reference method of its column (the best
one, in bold, or ``baseline``) holds at p < 0.05 (:mod:`benchmark.stats`): final-average columns
by a paired bootstrap over the final session's test queries, when the records carry per-query
ranks; other columns (and final averages without per-query ranks) by Welch's t-test over seeds,
when both methods have at least three seeds. The caption names the tests used, and
``significance.csv`` lists every comparison with its difference and p-value.

Every file is written atomically (see :mod:`benchmark.io`), so an interrupted report never
leaves a truncated table that looks complete.
"""

from __future__ import annotations

import io as _stdio
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark import stats
from benchmark.errors import BenchmarkError
from benchmark.io import atomic_write_bytes, atomic_write_text
from benchmark.metrics import METRICS, MetricSpec, summarize

__all__ = [
    "SCHEMA",
    "RunRecord",
    "LoadedRecords",
    "load_records",
    "summary_frame",
    "aggregate_seeds",
    "write_tables",
    "plot_heatmaps",
    "build_report",
]

logger = logging.getLogger(__name__)

SCHEMA = "clvl-benchmark/run-record/v1"
REQUIRED_KEYS = ("schema", "run_id", "method", "scenario", "seed", "protocol", "tasks", "recall")

# Directions in the order tables show them; a record may in principle hold others, which
# land in results.csv but not in the paper table.
DIRECTIONS = ("i2t", "t2i")
DIRECTION_NAMES = {"i2t": "image→text", "t2i": "text→image"}
PROTOCOL_KEYS = ("gallery", "task_identity", "tasks")

# The paper table: metrics shown at the first K, and the one metric shown at the others.
MAIN_METRICS_FIRST_K = ("final_average", "average_incremental", "backward_transfer", "forgetting_max")
MAIN_METRICS_OTHER_KS = ("final_average",)
LPI_METRICS = ("lpi_average_over_history", "lpi_signed_forgetting")


# ============================================================================ loading


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One validated run record. Matrices are float arrays with NaN for missing cells."""

    run_id: str
    method: str
    scenario: str
    seed: int
    protocol: Mapping[str, Any]
    tasks: tuple[str, ...]
    recall: Mapping[str, Mapping[int, np.ndarray]]  # direction -> K -> T x T
    recall_initial: Mapping[str, Mapping[int, np.ndarray]] | None  # direction -> K -> T
    created: str | None
    path: Path
    raw: Mapping[str, Any] = field(repr=False)  # the JSON as read, for anything else

    @property
    def protocol_label(self) -> str:
        return protocol_label(self.protocol)


@dataclass
class LoadedRecords:
    """The valid records of a results folder plus one warning per file that was skipped."""

    records: list[RunRecord]
    warnings: list[str]
    source: Path

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


class _InvalidRecord(Exception):
    """Why one file is not a usable run record (becomes a warning, never an error)."""


def protocol_label(protocol: Mapping[str, Any]) -> str:
    """A stable one-line label such as ``gallery=union, task_identity=inferred, tasks=seen``.

    The three standard keys come first in a fixed order so two records with the same
    protocol always get the same label, whatever order their JSON keys were in.
    """
    keys = [k for k in PROTOCOL_KEYS if k in protocol] + sorted(k for k in protocol if k not in PROTOCOL_KEYS)
    return ", ".join(f"{key}={protocol[key]}" for key in keys)


def load_records(results_dir: str | os.PathLike[str]) -> LoadedRecords:
    """Read every run record in ``results_dir/runs/`` (or in ``results_dir`` itself).

    Files that are not valid JSON, are not run records, or are malformed are skipped with
    a one-line warning in :attr:`LoadedRecords.warnings`: one bad file must not hide the
    results of all the others. Raises :class:`BenchmarkError` when nothing valid is left.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise BenchmarkError(f"results folder {root} does not exist; run `python -m benchmark run ...` first")
    folder = root / "runs" if (root / "runs").is_dir() else root

    records: list[RunRecord] = []
    warnings: list[str] = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(_parse_record(path))
        except _InvalidRecord as why:
            warnings.append(f"skipped {path}: {why}")
    records = _drop_superseded(records, warnings)
    for record in records:
        if record.raw.get("recall_tie_rule") != "expected":
            # Written before ties counted as expected recall: its recall gave tied items to the query.
            warnings.append(f"{record.path}: recall computed with the old optimistic tie rule (the record has no "
                            "recall_tie_rule 'expected'); it is shown, but rerun it with --force to compare it "
                            "with newer records")

    if not records:
        raise BenchmarkError(f"no run records found in {folder}; run `python -m benchmark run ...` first")
    return LoadedRecords(records=records, warnings=warnings, source=folder)


def _parse_record(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _InvalidRecord(f"not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _InvalidRecord(f"cannot be read ({error})") from None

    if not isinstance(data, dict) or "schema" not in data:
        raise _InvalidRecord(f"not a run record (no 'schema' field; expected {SCHEMA!r})")
    if data["schema"] != SCHEMA:
        raise _InvalidRecord(f"unsupported schema {data['schema']!r} (expected {SCHEMA!r})")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise _InvalidRecord(f"missing required key(s): {', '.join(missing)}")

    for key in ("run_id", "method", "scenario"):
        if not isinstance(data[key], str) or not data[key]:
            raise _InvalidRecord(f"{key!r} must be a non-empty string")
    # bool is an int in Python; a seed of `true` is certainly a mistake.
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        raise _InvalidRecord("'seed' must be an integer")
    if not isinstance(data["protocol"], dict):
        raise _InvalidRecord("'protocol' must be an object")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise _InvalidRecord("'tasks' must be a non-empty list of task names")

    T = len(tasks)
    recall = _parse_recall(data["recall"], "recall", lambda v, where: _matrix(v, T, where))
    recall_initial = None
    if data.get("recall_initial") is not None:
        recall_initial = _parse_recall(data["recall_initial"], "recall_initial", lambda v, where: _vector(v, T, where))

    return RunRecord(
        run_id=data["run_id"],
        method=data["method"],
        scenario=data["scenario"],
        seed=data["seed"],
        protocol=dict(data["protocol"]),
        tasks=tuple(tasks),
        recall=recall,
        recall_initial=recall_initial,
        created=data.get("created") if isinstance(data.get("created"), str) else None,
        path=path,
        raw=data,
    )


def _parse_recall(block: Any, name: str, parse_cell) -> dict[str, dict[int, np.ndarray]]:
    """``{direction: {"K": values}}`` with K turned into int and values validated."""
    if not isinstance(block, dict) or not block:
        raise _InvalidRecord(f"{name!r} must be a non-empty object {{direction: {{K: ...}}}}")
    parsed: dict[str, dict[int, np.ndarray]] = {}
    for direction, by_k in block.items():
        if not isinstance(by_k, dict) or not by_k:
            raise _InvalidRecord(f"{name}[{direction!r}] must be a non-empty object {{K: ...}}")
        parsed[direction] = {}
        for k_text, values in by_k.items():
            try:
                k = int(k_text)
            except (TypeError, ValueError):
                raise _InvalidRecord(f"{name}[{direction!r}] has a non-integer K {k_text!r}") from None
            if k < 1:
                raise _InvalidRecord(f"{name}[{direction!r}] has K={k} < 1")
            parsed[direction][k] = parse_cell(values, f"{name}[{direction!r}][{k_text!r}]")
    return parsed


def _matrix(values: Any, T: int, where: str) -> np.ndarray:
    """A T x T recall matrix whose lower triangle (every seen task) is complete."""
    if not isinstance(values, list) or len(values) != T or not all(isinstance(r, list) and len(r) == T for r in values):
        raise _InvalidRecord(f"{where} must be a {T} x {T} list of lists (one row and column per task)")
    matrix = np.array([[_cell(v, where) for v in row] for row in values], dtype=float)
    # Every protocol evaluates at least the tasks seen so far, and every metric needs them:
    # a hole there means a broken run, better reported now than as a crash in a metric.
    for t in range(T):
        for j in range(t + 1):
            if math.isnan(matrix[t, j]):
                raise _InvalidRecord(f"{where} is missing cell (t={t}, j={j}) of the lower triangle")
    return matrix


def _vector(values: Any, T: int, where: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != T:
        raise _InvalidRecord(f"{where} must be a list of {T} values (one per task)")
    return np.array([_cell(v, where) for v in values], dtype=float)


def _cell(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _InvalidRecord(f"{where} holds {value!r}, expected a number or null")
    # Recall is stored in percent; a value outside 0..100 means a fraction was stored by
    # mistake somewhere else, or the file is garbage -- either way, not comparable.
    if not 0.0 <= value <= 100.0:
        raise _InvalidRecord(f"{where} holds {value!r}, outside the 0..100 percent range")
    return float(value)


def _drop_superseded(records: list[RunRecord], warnings: list[str]) -> list[RunRecord]:
    """Keep one record per (scenario, protocol, method, seed): the newest.

    Two records for the same seed (a rerun after a fix, a changed hyperparameter) would
    otherwise be averaged as if they were two seeds, silently shrinking the std.
    """
    by_key: dict[tuple[str, str, str, int], list[RunRecord]] = {}
    for record in records:
        by_key.setdefault((record.scenario, record.protocol_label, record.method, record.seed), []).append(record)
    kept: list[RunRecord] = []
    for group in by_key.values():
        # Newest last; records without a usable timestamp count as oldest. Ties: file name.
        group.sort(key=lambda r: (_timestamp(r.created), r.path.name))
        newest = group[-1]
        kept.append(newest)
        for older in group[:-1]:
            warnings.append(
                f"skipped {older.path}: same method, scenario, protocol and seed as the newer {newest.path.name}"
            )
    return kept


def _timestamp(created: str | None) -> float:
    if created is None:
        return -math.inf
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return -math.inf
    # A naive timestamp is read as local time: good enough to order reruns on one machine.
    return moment.timestamp()


def _as_records(records: LoadedRecords | Iterable[RunRecord]) -> list[RunRecord]:
    return list(records.records if isinstance(records, LoadedRecords) else records)


# ============================================================================ frames

SUMMARY_COLUMNS = ["method", "scenario", "seed", "protocol", "direction", "k", "metric", "value", "run_id"]
AGGREGATE_KEYS = ["scenario", "protocol", "method", "direction", "k", "metric"]


def summary_frame(records: LoadedRecords | Iterable[RunRecord]) -> pd.DataFrame:
    """Every computable metric of every run: one row per (run, direction, K, metric).

    Columns: method, scenario, seed, protocol (see :func:`protocol_label`), direction, k
    (int), metric (a :data:`METRICS` name), value, run_id.
    """
    rows = []
    for record in _as_records(records):
        for direction, by_k in record.recall.items():
            for k, matrix in sorted(by_k.items()):
                initial = None
                if record.recall_initial is not None:
                    initial = record.recall_initial.get(direction, {}).get(k)
                for metric, value in summarize(matrix, initial).items():
                    rows.append(
                        {
                            "method": record.method,
                            "scenario": record.scenario,
                            "seed": record.seed,
                            "protocol": record.protocol_label,
                            "direction": direction,
                            "k": k,
                            "metric": metric,
                            "value": float(value),
                            "run_id": record.run_id,
                        }
                    )
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    return frame.sort_values(["scenario", "protocol", "method", "direction", "k", "metric", "seed"], ignore_index=True)


def aggregate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1, NaN for a single seed) and n_seeds of a :func:`summary_frame`.

    ``n_seeds`` counts the seeds with a finite value, so a metric undefined for the run
    (e.g. BWT with one task) shows ``n_seeds`` 0 rather than pretending to be averaged.
    """
    grouped = frame.groupby(AGGREGATE_KEYS, sort=True)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count").reset_index()


# ============================================================================ tables


def write_tables(
    records: LoadedRecords | Iterable[RunRecord],
    out_dir: str | os.PathLike[str],
    *,
    ks: Sequence[int] = (1, 5, 10),
    baseline: str | None = None,
) -> list[Path]:
    """Write the CSV/Markdown/LaTeX tables (see the module docstring); return their paths.

    ``ks`` picks the K values of the paper table (the first one gets the full set of
    metrics) and of the LPI view (which averages over them, as LPI does). ``baseline``
    names the method that significance marks compare with (default: each column's best).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    all_records = _as_records(records)
    frame = summary_frame(all_records)
    out_dir = Path(out_dir)
    written: list[Path] = []

    for scenario, protocols in _by_scenario_and_protocol(all_records).items():
        for protocol, group in protocols.items():
            names = [_slug(scenario)]
            if len(protocols) > 1:
                names.append(_slug(_protocol_slug(group[0].protocol)))
            folder = out_dir.joinpath(*names)
            runs = frame[(frame["scenario"] == scenario) & (frame["protocol"] == protocol)]
            aggregated = aggregate_seeds(runs)
            context = _TableContext(scenario, group[0].protocol, group, label="tab:" + "-".join(names))

            written.append(atomic_write_text(folder / "results.csv", aggregated.to_csv(index=False)))
            main = _main_table(aggregated, context.methods, ks)
            if main.columns:
                main.significance = _mark_significance(main, runs, group, baseline)
                if main.significance.rows:
                    written.append(atomic_write_text(folder / "significance.csv",
                                                     pd.DataFrame(main.significance.rows).to_csv(index=False)))
                written.append(atomic_write_text(folder / "results.md", _main_markdown(main, context)))
                written.append(atomic_write_text(folder / "results.tex", _main_latex(main, context)))
            else:
                # Nothing to show (e.g. ks names a K no run evaluated); an empty paper
                # table would look like a result, so write none and say why.
                recorded = sorted(set(aggregated["k"]))
                logger.warning(
                    "%s (%s): no paper table, none of K=%s was recorded (recorded: %s)", scenario, protocol, list(ks), recorded
                )
            lpi = _lpi_frame(runs, ks)
            written.append(atomic_write_text(folder / "lpi_view.csv", lpi.to_csv(index=False)))
            written.append(atomic_write_text(folder / "lpi_view.md", _lpi_markdown(lpi, context, ks)))
            written.append(atomic_write_text(folder / "final_per_task.csv", _final_per_task(group).to_csv(index=False)))
            costs = cost_frame(group)
            if not costs.empty:
                written.append(atomic_write_text(folder / "cost.csv", costs.to_csv(index=False)))
                written.append(atomic_write_text(folder / "cost.md", _cost_markdown(costs, context)))
    return written


# What each cost column means; values come from the records' "costs" block (computed from the
# live modules and clocks by the runner), aggregated over seeds by the mean.
COST_COLUMNS = {
    "total_params": "Total params",
    "backbone_params": "Backbone params",
    "trainable_params": "Trainable params (last task)",
    "added_params": "Params added by the method",
    "params_per_task": "Added per task",
    "params_shared": "Added once (shared)",
    "forward_passes_per_query": "Forward passes / query",
    "train_time_s_per_task": "Train time / task (s)",
    "wall_time_s": "Wall time (s)",
    "peak_memory_mb": "Peak memory (MB)",
}


def cost_frame(records: LoadedRecords | Iterable[RunRecord]) -> pd.DataFrame:
    """One row per method: the costs of its runs (mean over seeds; per-task train time is the
    mean over tasks first). Records without a ``costs`` block are left out."""
    rows = []
    for record in _as_records(records):
        costs = record.raw.get("costs")
        if not isinstance(costs, dict):
            continue
        row = {"method": record.method, "seed": record.seed}
        for key in COST_COLUMNS:
            value = costs.get(key)
            if isinstance(value, list):
                value = float(np.mean(value)) if value else None
            row[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        row["peak_memory_kind"] = costs.get("peak_memory_kind")
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    numeric = frame[list(COST_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    aggregated = numeric.groupby(frame["method"], sort=False).mean()
    aggregated.insert(0, "n_seeds", frame.groupby("method", sort=False)["seed"].nunique())
    aggregated["peak_memory_kind"] = frame.groupby("method", sort=False)["peak_memory_kind"].first()
    return aggregated.reset_index()


def _cost_markdown(costs: pd.DataFrame, context: _TableContext) -> str:
    def fmt(key: str, value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        if key.endswith("params") or key in ("params_per_task", "params_shared", "forward_passes_per_query"):
            return f"{int(round(value)):,}"
        return f"{value:.1f}"

    table = pd.DataFrame({"Method": costs["method"].map(_markdown_escape)})
    for key, label in COST_COLUMNS.items():
        table[label] = [fmt(key, v) for v in costs[key]]
    kinds = sorted(set(costs["peak_memory_kind"].dropna()))
    note = (f"{context.scenario}: costs per method, mean over seeds. Parameter counts come from the live modules; "
            f"peak memory is {', '.join(kinds) or 'not recorded'} (run_peak_rss: the process's peak resident memory "
            "during the run, CPU; process_peak_rss: its peak since the command started, earlier runs included; "
            "cuda_max_allocated: the CUDA allocator's peak for the run).")
    return f"### {context.scenario}: cost\n\n" + table.to_markdown(index=False, disable_numparse=True) + f"\n\n{note}\n"


def _by_scenario_and_protocol(records: list[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    groups: dict[str, dict[str, list[RunRecord]]] = {}
    for record in sorted(records, key=lambda r: (r.scenario, r.protocol_label, r.method, r.seed)):
        groups.setdefault(record.scenario, {}).setdefault(record.protocol_label, []).append(record)
    return groups


@dataclass
class _TableContext:
    """What a caption needs to know about the runs behind one table."""

    scenario: str
    protocol: Mapping[str, Any]
    records: list[RunRecord]
    label: str  # LaTeX \\label, unique per table

    @property
    def methods(self) -> list[str]:
        return sorted({r.method for r in self.records})

    def seeds_phrase(self) -> str:
        """E.g. "3 seeds (0, 1, 2)", or per method when methods were run with different seeds."""
        seeds: dict[str, set[int]] = {}
        for record in self.records:
            seeds.setdefault(record.method, set()).add(record.seed)
        distinct = {frozenset(s) for s in seeds.values()}
        if len(distinct) == 1:
            only = sorted(next(iter(distinct)))
            noun = "seed" if len(only) == 1 else "seeds"
            return f"{len(only)} {noun} ({', '.join(map(str, only))})"
        per_method = ", ".join(f"{method} {len(s)}" for method, s in sorted(seeds.items()))
        return f"a different number of seeds per method ({per_method})"

    def max_seeds(self) -> int:
        return max(Counter(r.method for r in self.records).values())


# ---------------------------------------------------------------------------- paper table


@dataclass(frozen=True)
class _Column:
    direction: str
    k: int
    metric: str

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]


@dataclass
class _Cell:
    mean: float
    std: float
    n_seeds: int
    best: bool = False
    significant: bool = False  # differs from the column's reference method (see _mark_significance)


@dataclass
class _Significance:
    """What the significance marks of one table are based on."""

    reference: str | None  # the baseline method, or None: each column's best
    tests: set[str] = field(default_factory=set)  # tests that were run: "bootstrap", "welch"
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per comparison, for significance.csv


@dataclass
class _MainTable:
    columns: list[_Column]
    rows: dict[str, list[_Cell | None]]  # method -> one cell per column (None: no value)
    significance: _Significance | None = None


def _main_table(aggregated: pd.DataFrame, methods: list[str], ks: tuple[int, ...]) -> _MainTable:
    lookup = {
        (row.method, row.direction, row.k, row.metric): _Cell(row.mean, row.std, row.n_seeds)
        for row in aggregated.itertuples(index=False)
        if row.n_seeds > 0
    }
    present = set(aggregated["direction"])
    directions = [d for d in DIRECTIONS if d in present]
    wanted = [
        _Column(direction, k, metric)
        for direction in directions
        for k, metrics in [(ks[0], MAIN_METRICS_FIRST_K)] + [(k, MAIN_METRICS_OTHER_KS) for k in ks[1:]]
        for metric in metrics
    ]
    # A column nobody has a value for (a K that was not evaluated) would be all dashes.
    columns = [c for c in wanted if any((m, c.direction, c.k, c.metric) in lookup for m in methods)]
    rows = {m: [lookup.get((m, c.direction, c.k, c.metric)) for c in columns] for m in methods}

    for index, column in enumerate(columns):
        cells = [row[index] for row in rows.values() if row[index] is not None]
        # "Best" only means something when there is something to beat.
        if len(cells) < 2:
            continue
        shown = [_rounded(cell.mean) for cell in cells]
        best = max(shown) if column.spec.higher_is_better else min(shown)
        for cell, value in zip(cells, shown):
            cell.best = value == best
    return _MainTable(columns, rows)


def _rounded(value: float) -> float:
    # Adding 0.0 turns -0.0 into 0.0, so a tiny negative BWT does not print as "-0.0".
    return round(float(value), 1) + 0.0


def _format_value(cell: _Cell | None, pm: str, missing: str) -> str:
    if cell is None or math.isnan(cell.mean):
        return missing
    if cell.n_seeds < 2 or math.isnan(cell.std):
        return f"{_rounded(cell.mean):.1f}"
    return f"{_rounded(cell.mean):.1f} {pm} {_rounded(cell.std):.1f}"


def _markdown_escape(name: str) -> str:
    # A "|" in a method name would split the cell and shift every column after it.
    return str(name).replace("|", r"\|")


def _arrow(spec: MetricSpec, up: str, down: str) -> str:
    return up if spec.higher_is_better else down


def _main_markdown(table: _MainTable, context: _TableContext) -> str:
    headers = ["Method"] + [
        f"{c.direction} R@{c.k} {c.spec.label} {_arrow(c.spec, '↑', '↓')}" for c in table.columns
    ]
    body = []
    for method, cells in table.rows.items():
        texts = [_format_value(cell, "±", "–") for cell in cells]
        texts = [f"**{text}**" if cell is not None and cell.best else text for cell, text in zip(cells, texts)]
        texts = [f"{text}†" if cell is not None and cell.significant else text for cell, text in zip(cells, texts)]
        body.append([_markdown_escape(method)] + texts)
    frame = pd.DataFrame(body, columns=headers)
    # disable_numparse: tabulate would otherwise re-format "45.0" as "45".
    markdown = frame.to_markdown(index=False, disable_numparse=True)
    title = f"### {context.scenario}: retrieval recall (%)"
    return f"{title}\n\n{markdown}\n\n{_caption(table, context, 'md')}\n"


def _main_latex(table: _MainTable, context: _TableContext) -> str:
    # Built by hand rather than with Styler.to_latex: we need a two-level header with
    # \cmidrule per direction and bold cells, and exact control over what is escaped.
    n = len(table.columns)
    spans: list[tuple[str, int, int]] = []  # (direction, first column, last column), 1-based after "Method"
    for index, column in enumerate(table.columns, start=2):
        if spans and spans[-1][0] == column.direction:
            spans[-1] = (column.direction, spans[-1][1], index)
        else:
            spans.append((column.direction, index, index))

    def direction_title(direction: str) -> str:
        code = _latex_escape(direction)
        name = DIRECTION_NAMES.get(direction)
        return f"{_latex_arrows(name)} ({code})" if name else code

    group_row = " & ".join([""] + [rf"\multicolumn{{{last - first + 1}}}{{c}}{{{direction_title(d)}}}" for d, first, last in spans])
    rules = " ".join(rf"\cmidrule(lr){{{first}-{last}}}" for _, first, last in spans)
    up, down = r"$\uparrow$", r"$\downarrow$"
    header = " & ".join(
        ["Method"] + [f"R@{c.k} {_latex_escape(c.spec.label)} {_arrow(c.spec, up, down)}" for c in table.columns]
    )
    lines = [
        r"% Generated by benchmark.reporting; needs \usepackage{booktabs} (wrap the tabular in",
        r"% \resizebox{\textwidth}{!}{...} from graphicx if it is too wide for the page).",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_caption(table, context, 'tex')}}}",
        rf"\label{{{context.label}}}",
        rf"\begin{{tabular}}{{l{'r' * n}}}",
        r"\toprule",
        group_row + r" \\",
        rules,
        header + r" \\",
        r"\midrule",
    ]
    for method, cells in table.rows.items():
        texts = [_latex_cell(cell) for cell in cells]
        texts = [rf"\textbf{{{text}}}" if cell is not None and cell.best else text for cell, text in zip(cells, texts)]
        texts = [rf"{text}$^\dagger$" if cell is not None and cell.significant else text
                 for cell, text in zip(cells, texts)]
        lines.append(" & ".join([_latex_escape(method)] + texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _latex_cell(cell: _Cell | None) -> str:
    if cell is None or math.isnan(cell.mean):
        return "--"  # an en dash: "no value"
    # "$-$" typesets a real minus sign; a bare "-" is a hyphen in LaTeX text.
    return _format_value(cell, r"$\pm$", "--").replace("-", "$-$")


def _caption(table: _MainTable, context: _TableContext, target: str) -> str:
    """The caption under the paper table: seeds, protocol, metric definitions, conventions.

    The same sentences for Markdown and LaTeX; only the markup differs. Prose goes through
    ``text`` (LaTeX-escaped for .tex: a bare "%" would comment out the rest of the line),
    formulas through ``code`` (code span / \\texttt, so brackets and underscores show).
    """
    if target == "md":
        text, code, pm, up, down = (lambda s: s), (lambda s: f"`{s}`"), "±", "↑", "↓"
    else:
        text = lambda s: _latex_arrows(_latex_escape(s))  # noqa: E731
        code = lambda s: rf"\texttt{{{_latex_escape(s)}}}"  # noqa: E731
        pm, up, down = r"$\pm$", r"$\uparrow$", r"$\downarrow$"

    protocol = context.protocol
    protocol_parts = ", ".join(
        f"{text(label)} {code(str(protocol.get(key, '?')))}"
        for key, label in (("gallery", "gallery"), ("task_identity", "task identity"), ("tasks", "tasks evaluated"))
    )
    if context.max_seeds() > 1:
        spread = f"{text('recall@K (%), mean')} {pm} {text('std (ddof=1) over ' + context.seeds_phrase())}"
    else:
        spread = text(f"recall@K (%), single run per method, {context.seeds_phrase()}")
    ordered = sorted({c.direction for c in table.columns}, key=lambda d: (d not in DIRECTIONS, DIRECTIONS.index(d) if d in DIRECTIONS else 0, d))
    directions = "; ".join(f"{d} = {DIRECTION_NAMES.get(d, d)}" for d in ordered)
    metrics = dict.fromkeys(c.metric for c in table.columns)  # ordered, unique
    definitions = "; ".join(f"{text(METRICS[m].label)} = {code(METRICS[m].definition)}" for m in metrics)
    sentences = [
        f"{text(context.scenario)}: {spread}.",
        f"{text('Protocol:')} {protocol_parts}; {text(gallery_phrase(protocol))}.",
        f"{text(directions)}.",
        f"{text('R[t][j] is the recall on task j after training session t, T the number of tasks:')} {definitions}.",
        f"{up} {text('higher is better,')} {down} {text('lower is better; best value per column in bold.')}",
    ]
    if table.significance is not None and len(table.rows) > 1:
        sentences.append(_significance_sentence(table.significance, target, text))
    return " ".join(sentences)


def gallery_phrase(protocol: Mapping[str, Any]) -> str:
    """What each recall cell was ranked against, in words (the number depends on it)."""
    gallery, tasks = protocol.get("gallery"), protocol.get("tasks")
    if gallery == "per_task":
        return "each task's queries ranked against that task's own test items"
    if gallery == "union" and tasks == "all":
        return "queries ranked against the test items of all tasks together in every session"
    if gallery == "union":
        return "queries ranked against the test items of all tasks seen so far together"
    return f"gallery {gallery}"


def _significance_sentence(significance: _Significance, target: str, text) -> str:
    """Names the tests behind the daggers (or says why there are none)."""
    dagger, less, geq = ("†", "<", "≥") if target == "md" else (r"$^\dagger$", "$<$", r"$\geq$")
    n = stats.MIN_SEEDS_FOR_T_TEST
    if not significance.tests:
        return text(f"No significance test: the records hold no per-query ranks, and fewer than {n} seeds per method.")
    reference = (f"the baseline {significance.reference}" if significance.reference
                 else "the best method of its column (bold)")
    parts = []
    if "bootstrap" in significance.tests:
        parts.append(text(f"final-average columns by a two-sided paired bootstrap over the final session's test "
                          f"queries ({stats.RESAMPLES:,} resamples, queries redrawn within each task, per-query "
                          "hits averaged over seeds)"))
    if "welch" in significance.tests:
        where = "the other columns" if "bootstrap" in significance.tests else "all columns"
        parts.append(text(f"{where} by Welch's t-test over seeds (methods with ") + geq + text(f" {n} seeds)"))
    return (f"{dagger} " + text(f"differs from {reference} at p ") + less + text(f" {stats.ALPHA}: ")
            + text("; ").join(parts) + text("; no correction for multiple comparisons."))


def _mark_significance(table: _MainTable, runs: pd.DataFrame, records: list[RunRecord],
                       baseline: str | None) -> _Significance:
    """Mark the cells that differ significantly from their column's reference method."""
    methods = list(table.rows)
    if baseline is not None and baseline not in methods:
        logger.warning("baseline %r has no runs in this table (methods: %s); comparing with each column's best",
                       baseline, ", ".join(methods))
        baseline = None
    significance = _Significance(reference=baseline)
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
                mine = stats.seed_averaged_hits([r.raw for r in by_method[method]], column.direction, column.k)
                theirs = stats.seed_averaged_hits([r.raw for r in by_method[reference]], column.direction, column.k)
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


def _apply(significance: _Significance, table: _MainTable, index: int, method: str, reference: str,
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


def _best_method(table: _MainTable, index: int) -> str | None:
    """The method with the best unrounded mean in a column (ties: the first in table order)."""
    spec = table.columns[index].spec
    candidates = [(method, cells[index].mean) for method, cells in table.rows.items()
                  if cells[index] is not None and not math.isnan(cells[index].mean)]
    if len(candidates) < 2:
        return None
    pick = max if spec.higher_is_better else min
    return pick(candidates, key=lambda item: item[1])[0]


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_arrows(text: str) -> str:
    """The Unicode arrows used in direction names, as math-mode arrows pdflatex can typeset."""
    return text.replace("→", r"$\rightarrow$")


def _latex_escape(value: str) -> str:
    """Escape LaTeX's special characters in plain text (method names, formulas, ...)."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in str(value))


# ---------------------------------------------------------------------------- LPI view


def _lpi_frame(runs: pd.DataFrame, ks: tuple[int, ...]) -> pd.DataFrame:
    """LPI's two metrics per K and averaged over ``ks``, aggregated over seeds.

    LPI averages over K within each run; doing the same and only then aggregating over
    seeds gives a std that reflects seed variation of the number LPI reports. A run that
    lacks one of the Ks gets no K-average rather than an average over fewer Ks.
    """
    lpi = runs[runs["metric"].isin(LPI_METRICS) & runs["k"].isin(ks)]
    keys = ["scenario", "protocol", "method", "direction", "metric", "seed"]
    per_k = lpi[keys + ["k", "value"]].copy()
    per_k["k"] = per_k["k"].astype(str)
    per_run = lpi.pivot_table(index=keys, columns="k", values="value", aggfunc="first")
    per_run = per_run.reindex(columns=list(ks))
    mean_k = per_run.mean(axis=1, skipna=False).rename("value").reset_index()
    mean_k["k"] = "mean"
    combined = pd.concat([per_k, mean_k[keys + ["k", "value"]]], ignore_index=True)
    aggregated = (
        combined.groupby(["scenario", "protocol", "method", "direction", "metric", "k"], sort=False)["value"]
        .agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count")
        .reset_index()
    )
    # Sort K as "1, 5, 10, mean" (numerically, then the average), not as strings.
    order = {str(k): i for i, k in enumerate(ks)} | {"mean": len(ks)}
    aggregated["_order"] = aggregated["k"].map(order)
    aggregated = aggregated.sort_values(["direction", "metric", "method", "_order"], ignore_index=True)
    return aggregated.drop(columns="_order")


def _lpi_markdown(lpi: pd.DataFrame, context: _TableContext, ks: tuple[int, ...]) -> str:
    k_list = ", ".join(map(str, ks))
    column_keys = [(metric, k) for metric in LPI_METRICS for k in ["mean"] + [str(k) for k in ks]]

    def header(metric: str, k: str) -> str:
        spec = METRICS[metric]
        where = f"(mean R@{'/'.join(map(str, ks))})" if k == "mean" else f"R@{k}"
        return f"{spec.label} {where} {_arrow(spec, '↑', '↓')}"

    lookup = {(r.method, r.direction, r.metric, r.k): r for r in lpi.itertuples(index=False)}
    body = []
    for direction in [d for d in DIRECTIONS if d in set(lpi["direction"])]:
        for method in context.methods:
            cells = []
            for metric, k in column_keys:
                row = lookup.get((method, direction, metric, k))
                cell = None if row is None or row.n_seeds == 0 else _Cell(row.mean, row.std, row.n_seeds)
                cells.append(_format_value(cell, "±", "–"))
            body.append([_markdown_escape(method), direction] + cells)
    table = pd.DataFrame(body, columns=["Method", "Direction"] + [header(m, k) for m, k in column_keys])
    definitions = "; ".join(f"{METRICS[m].label} = `{METRICS[m].definition}`" for m in LPI_METRICS)
    caption = (
        f"Metrics as computed by LPI (Low-rank Prompt Interaction, ACM MM 2024), for comparison with its "
        f"reported numbers: per run, each metric is averaged over K = {k_list}, then mean ± std (ddof=1) "
        f"over {context.seeds_phrase()}. {definitions}. LPI forget is negative when the model forgets. "
        f"Protocol: {protocol_label(context.protocol)} ({gallery_phrase(context.protocol)})."
    )
    markdown = table.to_markdown(index=False, disable_numparse=True)
    return f"### {context.scenario}: LPI-comparable view\n\n{markdown}\n\n{caption}\n"


# ---------------------------------------------------------------------------- per task


def _final_per_task(records: list[RunRecord]) -> pd.DataFrame:
    """Recall on each task after the last session, mean over seeds, one column per task.

    Tasks are matched by name, not position, so runs whose task order differs (a
    per-seed task permutation) are still averaged correctly.
    """
    rows = []
    for record in records:
        for direction, by_k in record.recall.items():
            for k, matrix in by_k.items():
                for task, value in zip(record.tasks, matrix[-1]):
                    rows.append((record.method, direction, k, record.seed, task, value))
    long = pd.DataFrame(rows, columns=["method", "direction", "k", "seed", "task", "value"])
    wide = long.pivot_table(index=["method", "direction", "k"], columns="task", values="value", aggfunc="mean")
    # Columns in task order (first record's order, then any task only other runs have).
    task_order = list(dict.fromkeys(t for r in records for t in r.tasks))
    wide = wide.reindex(columns=task_order)
    wide.columns.name = None
    n_seeds = long.groupby(["method", "direction", "k"])["seed"].nunique().rename("n_seeds")
    wide = wide.join(n_seeds).reset_index()
    wide.insert(0, "protocol", records[0].protocol_label)
    wide.insert(0, "scenario", records[0].scenario)
    leading = ["scenario", "protocol", "method", "direction", "k", "n_seeds"]
    return wide[leading + task_order]


# ============================================================================ figures


def plot_heatmaps(records: LoadedRecords | Iterable[RunRecord], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per (scenario, method): the seed-averaged R@1 matrices, i2t and t2i side by side.

    Rows are "after session t", columns "task j"; unevaluated cells stay blank. Uses a bare
    :class:`matplotlib.figure.Figure` (rendered by Agg) instead of pyplot, so producing a
    report never switches the caller's backend or leaks open figures.
    """
    from matplotlib.figure import Figure  # imported here: only plotting pays for matplotlib

    out_dir = Path(out_dir)
    written: list[Path] = []
    used_names: set[str] = set()
    for scenario, protocols in _by_scenario_and_protocol(_as_records(records)).items():
        for protocol, group in protocols.items():
            by_method: dict[str, list[RunRecord]] = {}
            for record in group:
                by_method.setdefault(record.method, []).append(record)
            for method, runs in by_method.items():
                parts = [scenario] + ([_protocol_slug(group[0].protocol)] if len(protocols) > 1 else []) + [method]
                name = _unique("heatmap_" + "_".join(_slug(p) for p in parts), used_names) + ".png"
                figure = _heatmap_figure(Figure, scenario, protocol, method, runs)
                buffer = _stdio.BytesIO()
                figure.savefig(buffer, format="png", dpi=150)
                written.append(atomic_write_bytes(out_dir / name, buffer.getvalue()))
    return written


def _heatmap_figure(Figure, scenario: str, protocol: str, method: str, runs: list[RunRecord]):
    # Averaging matrices cell by cell only makes sense when all seeds share a task order;
    # if they do not, plot the most common order and say what was left out.
    orders = Counter(r.tasks for r in runs)
    tasks = orders.most_common(1)[0][0]
    if len(orders) > 1:
        logger.warning(
            "heatmap %s/%s: runs use different task orders; averaging only the %d run(s) with order %s",
            scenario, method, orders[tasks], list(tasks),
        )
    runs = [r for r in runs if r.tasks == tasks]
    directions = [d for d in DIRECTIONS if any(d in r.recall for r in runs)] or sorted(runs[0].recall)
    T = len(tasks)

    figure = Figure(figsize=(1.0 + 4.2 * len(directions) * max(1.0, T / 5), 1.2 + 3.4 * max(1.0, T / 5)), layout="constrained")
    axes = figure.subplots(1, len(directions), squeeze=False)[0]
    image = None
    for ax, direction in zip(axes, directions):
        k = 1 if all(1 in r.recall.get(direction, {}) for r in runs) else min(min(r.recall[direction]) for r in runs if direction in r.recall)
        matrices = [r.recall[direction][k] for r in runs if k in r.recall.get(direction, {})]
        mean = _nanmean_cells(matrices)
        cmap = _colormap()
        image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0.0, vmax=100.0)
        font = max(5.0, 9.0 - 0.25 * T)
        for t in range(T):
            for j in range(T):
                if not math.isnan(mean[t, j]):
                    # Dark text on the bright end of the colour map, light text on the dark end.
                    color = "black" if mean[t, j] > 60 else "white"
                    ax.text(j, t, f"{mean[t, j]:.1f}", ha="center", va="center", fontsize=font, color=color)
        ax.set_xticks(range(T), labels=list(tasks), rotation=30, ha="right")
        ax.set_yticks(range(T), labels=[f"{t}: {name}" for t, name in enumerate(tasks)])
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training session")
        ax.set_title(f"{direction} ({DIRECTION_NAMES.get(direction, direction)}) R@{k}")
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="recall (%)", shrink=0.8)
    seeds = sorted(r.seed for r in runs)
    figure.suptitle(
        f"{method} on {scenario}: mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))})\nprotocol: {protocol}",
        fontsize=10,
    )
    return figure


def _nanmean_cells(matrices: list[np.ndarray]) -> np.ndarray:
    """Cell-wise mean ignoring NaN; NaN where no matrix has the cell (np.nanmean would warn)."""
    stack = np.stack(matrices)
    finite = ~np.isnan(stack)
    counts = finite.sum(axis=0)
    sums = np.where(finite, stack, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _colormap():
    import matplotlib

    # Unevaluated cells are left blank (white), not coloured as 0 %.
    return matplotlib.colormaps["viridis"].with_extremes(bad="white")


# ============================================================================ entry point


def build_report(results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                 baseline: str | None = None) -> list[Path]:
    """Load the run records of ``results_dir`` and write all tables and figures.

    Tables go to ``<out_dir>/tables/`` and figures to ``<out_dir>/figures/``, where
    ``out_dir`` defaults to ``results_dir``. Skipped files are logged as warnings.
    Returns the paths written.
    """
    loaded = load_records(results_dir)
    for warning in loaded.warnings:
        logger.warning(warning)
    base = Path(out_dir) if out_dir is not None else Path(results_dir)
    written = write_tables(loaded, base / "tables", baseline=baseline)
    written += plot_heatmaps(loaded, base / "figures")
    logger.info("report: %d run(s) from %s, wrote %d file(s) under %s", len(loaded), loaded.source, len(written), base)
    return written


# ============================================================================ names


def _slug(name: str) -> str:
    """A file-name-safe version of ``name``: letters, digits, '.', '-' and '_' only."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return slug or "unnamed"


def _protocol_slug(protocol: Mapping[str, Any]) -> str:
    keys = [k for k in PROTOCOL_KEYS if k in protocol] + sorted(k for k in protocol if k not in PROTOCOL_KEYS)
    return "-".join(str(protocol[k]) for k in keys) or "default"


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... if two raw names sanitise to the same file name."""
    candidate, counter = name, 1
    while candidate in used:
        counter += 1
        candidate = f"{name}-{counter}"
    used.add(candidate)
    return candidate
