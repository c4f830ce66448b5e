"""The numbers of a report as data frames: per run, aggregated over seeds, costs, LPI's view, per task.

Everything else in the package is a view of these frames; the CSV files are them as written.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from benchmark.metrics import summarize
from benchmark.record import Costs, RunRecord

from .loading import LoadedRecords, as_records

SUMMARY_COLUMNS = ["method", "scenario", "seed", "protocol", "direction", "k", "metric", "value", "run_id"]
AGGREGATE_KEYS = ["scenario", "protocol", "method", "direction", "k", "metric"]
LPI_METRICS = ("lpi_average_over_history", "lpi_signed_forgetting")

# What each cost column means; values come from the records' costs (computed from the live
# modules and clocks by the runner), aggregated over seeds by the mean.
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


def summary_frame(records: LoadedRecords | Iterable[RunRecord]) -> pd.DataFrame:
    """Every computable metric of every run: one row per (run, direction, K, metric).

    Columns: method, scenario, seed, protocol (see :func:`benchmark.record.protocol_label`),
    direction, k (int), metric (a :data:`benchmark.metrics.METRICS` name), value, run_id.
    """
    rows = []
    for record in as_records(records):
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


def _complete_mean(values: pd.Series, needed: int) -> float:
    """The mean of ``values`` when all ``needed`` parts are there and finite, else NaN."""
    return float(values.mean()) if len(values) == needed and values.notna().all() else math.nan


def _mean_std_count(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.groupby(keys, sort=False)["value"].agg(mean="mean", std=lambda v: v.std(ddof=1),
                                                        n_seeds="count").reset_index()


# ---------------------------------------------------------------------------- compact table


def compact_frame(runs: pd.DataFrame, directions: Sequence[str], ks: Sequence[int]) -> pd.DataFrame:
    """The two summary columns of the compact table, per method over seeds.

    Per run: ``average`` = the mean of the final averages at every (direction, K) of the
    table, ``backward_transfer`` = the mean over directions of BWT at the first K; then mean,
    std (ddof=1) and n_seeds over seeds, as for every other cell. A run that lacks one of the
    parts gets no value rather than an average over fewer parts.
    """
    keys = ["method", "seed"]
    parts = {
        "average": (runs["metric"] == "final_average") & runs["k"].isin(ks) & runs["direction"].isin(directions),
        "backward_transfer": ((runs["metric"] == "backward_transfer") & (runs["k"] == ks[0])
                              & runs["direction"].isin(directions)),
    }
    needed = {"average": len(directions) * len(ks), "backward_transfer": len(directions)}
    frames = []
    for name, mask in parts.items():
        per_run = (runs[mask].groupby(keys, sort=False)["value"]
                   .agg(lambda values, n=needed[name]: _complete_mean(values, n)).rename("value").reset_index())
        per_run["column"] = name
        frames.append(per_run[keys + ["column", "value"]])
    combined = pd.concat(frames, ignore_index=True)
    if combined.empty:
        return pd.DataFrame(columns=["method", "column", "mean", "std", "n_seeds"])
    return _mean_std_count(combined, ["method", "column"])


# ---------------------------------------------------------------------------- costs


def cost_frame(records: LoadedRecords | Iterable[RunRecord]) -> pd.DataFrame:
    """One row per method: the costs of its runs (mean over seeds; per-task train time is the
    mean over tasks first). Records without costs are left out."""
    rows = []
    for record in as_records(records):
        costs: Costs | None = record.costs
        if costs is None:
            continue
        row = {"method": record.method, "seed": record.seed}
        for key in COST_COLUMNS:
            value = getattr(costs, key)
            if isinstance(value, tuple):
                value = float(np.mean(value)) if value else None
            row[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        row["peak_memory_kind"] = costs.peak_memory_kind
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    numeric = frame[list(COST_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    aggregated = numeric.groupby(frame["method"], sort=False).mean()
    aggregated.insert(0, "n_seeds", frame.groupby("method", sort=False)["seed"].nunique())
    aggregated["peak_memory_kind"] = frame.groupby("method", sort=False)["peak_memory_kind"].first()
    return aggregated.reset_index()


# ---------------------------------------------------------------------------- LPI view


def lpi_frame(runs: pd.DataFrame, ks: tuple[int, ...]) -> pd.DataFrame:
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


# ---------------------------------------------------------------------------- per task


def final_per_task(records: list[RunRecord]) -> pd.DataFrame:
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
