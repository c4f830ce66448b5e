"""Tables and figures from finished runs: which files a report is made of, and writing them.

Input: the run records that ``python -m benchmark run`` writes to ``<results_dir>/runs/``
(one JSON file per method x scenario x seed, schema ``clvl-benchmark/run-record/v1``, read
through :mod:`benchmark.record`). Output, by default under ``<results_dir>/tables/`` and
``<results_dir>/figures/``:

``tables/<scenario>/`` (``tables/<scenario>/<protocol>/`` when a scenario was run under
several evaluation protocols) holds

* ``results.csv`` -- every metric of :data:`benchmark.metrics.METRICS`, for every retrieval
  direction and K, aggregated over seeds: ``mean``, ``std`` (ddof=1, empty for one seed) and
  ``n_seeds``. This is the machine-readable file; everything else is a view of it.
* ``results.md`` / ``results.tex`` -- the paper table (layout below). The Markdown caption
  holds every definition; the LaTeX caption is short enough to paste into a paper (scenario,
  seeds, protocol, what bold and daggers mean), and ``results.notes.tex`` beside it holds the
  rest (the protocol in words, metric definitions, the significance tests), as a paragraph to
  put under the table.
* ``results.compact.md`` / ``results.compact.tex`` -- the compact table: per direction the
  final average R@1, R@5, R@10 (the same cells as the paper table, bold and daggers
  included), then ``Avg`` (per run, the mean of those R@K columns) and ``BWT`` at the first K
  (per run, the mean over directions), each mean ± std over seeds.
* ``significance.csv`` -- every comparison behind the daggers, with its difference and p-value.
* ``lpi_view.csv`` / ``lpi_view.md`` -- the two metrics that the LPI paper (ACM MM 2024)
  reports, per K and averaged over the K values, for comparison with its numbers.
* ``final_per_task.csv`` -- recall on each task after the last session, mean over seeds.
* ``cost.csv`` / ``cost.md`` -- parameters, forward passes, time and memory per method.

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

The package's modules, one job each: :mod:`~benchmark.reporting.loading` (which records),
:mod:`~benchmark.reporting.frames` (the numbers), :mod:`~benchmark.reporting.table` (cells,
best values, formatting), :mod:`~benchmark.reporting.significance`,
:mod:`~benchmark.reporting.captions`, :mod:`~benchmark.reporting.markdown`,
:mod:`~benchmark.reporting.latex`, :mod:`~benchmark.reporting.figures`,
:mod:`~benchmark.reporting.paths` (file names) and :mod:`~benchmark.reporting.card` (the
protocol card of ``show``). Writing happens here only: every file is written atomically (see
:mod:`benchmark.io`), so an interrupted report never leaves a truncated table that looks
complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from benchmark.io import atomic_write_bytes, atomic_write_text
from benchmark.record import PROTOCOL_KEYS, REQUIRED_KEYS, RunRecord, protocol_label  # noqa: F401 (public names)
from benchmark.record import RECORD_SCHEMA as SCHEMA

from . import latex, markdown
from .captions import TableContext, gallery_phrase
from .card import protocol_card
from .figures import heatmap_png
from .frames import (AGGREGATE_KEYS, COST_COLUMNS, LPI_METRICS, SUMMARY_COLUMNS,  # noqa: F401 (public names)
                     aggregate_seeds, compact_frame, cost_frame, final_per_task, lpi_frame, summary_frame)
from .loading import LoadedRecords, as_records, by_scenario_and_protocol, load_records, logger
from .paths import protocol_slug, slug, table_folder_names, unique
from .significance import mark_significance
from .table import (DIRECTION_NAMES, DIRECTIONS, MAIN_METRICS_FIRST_K, MAIN_METRICS_OTHER_KS,  # noqa: F401
                    compact_table, main_table)

__all__ = [
    "SCHEMA",
    "RunRecord",
    "LoadedRecords",
    "load_records",
    "summary_frame",
    "aggregate_seeds",
    "cost_frame",
    "write_tables",
    "plot_heatmaps",
    "build_report",
    "gallery_phrase",
    "protocol_label",
    "protocol_card",
]

NOTES_NAME = "results" + latex.NOTES_SUFFIX


def write_tables(
    records: LoadedRecords | Iterable[RunRecord],
    out_dir: str | os.PathLike[str],
    *,
    ks: Sequence[int] = (1, 5, 10),
    baseline: str | None = None,
) -> list[Path]:
    """Write the CSV/Markdown/LaTeX tables (see the module docstring); return their paths.

    ``ks`` picks the K values of the paper table (the first one gets the full set of
    metrics), of the compact table and of the LPI view (which averages over them, as LPI
    does). ``baseline`` names the method that significance marks compare with (default: each
    column's best).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    all_records = as_records(records)
    frame = summary_frame(all_records)
    out_dir = Path(out_dir)
    written: list[Path] = []

    for scenario, protocols in by_scenario_and_protocol(all_records).items():
        for protocol, group in protocols.items():
            names = table_folder_names(scenario, group[0].protocol, len(protocols) > 1)
            folder = out_dir.joinpath(*names)
            runs = frame[(frame["scenario"] == scenario) & (frame["protocol"] == protocol)]
            aggregated = aggregate_seeds(runs)
            context = TableContext(scenario, group[0].protocol, group, label="tab:" + "-".join(names))

            written.append(atomic_write_text(folder / "results.csv", aggregated.to_csv(index=False)))
            main = main_table(aggregated, context.methods, ks)
            if main.columns:
                main.significance = mark_significance(main, runs, group, baseline)
                if main.significance.rows:
                    written.append(atomic_write_text(folder / "significance.csv",
                                                     pd.DataFrame(main.significance.rows).to_csv(index=False)))
                written.append(atomic_write_text(folder / "results.md", markdown.main_markdown(main, context)))
                written.append(atomic_write_text(folder / "results.tex", latex.main_latex(main, context, NOTES_NAME)))
                written.append(atomic_write_text(folder / NOTES_NAME, latex.notes_latex(main, context)))
                directions = list(dict.fromkeys(c.direction for c in main.columns))
                compact = compact_table(main, compact_frame(runs, directions, ks), ks)
                written.append(atomic_write_text(folder / "results.compact.md",
                                                 markdown.compact_markdown(compact, context)))
                written.append(atomic_write_text(folder / "results.compact.tex",
                                                 latex.compact_latex(compact, context, NOTES_NAME)))
            else:
                # Nothing to show (e.g. ks names a K no run evaluated); an empty paper
                # table would look like a result, so write none and say why.
                recorded = sorted(set(aggregated["k"]))
                logger.warning(
                    "%s (%s): no paper table, none of K=%s was recorded (recorded: %s)", scenario, protocol, list(ks), recorded
                )
            lpi = lpi_frame(runs, ks)
            written.append(atomic_write_text(folder / "lpi_view.csv", lpi.to_csv(index=False)))
            written.append(atomic_write_text(folder / "lpi_view.md", markdown.lpi_markdown(lpi, context, ks)))
            written.append(atomic_write_text(folder / "final_per_task.csv", final_per_task(group).to_csv(index=False)))
            costs = cost_frame(group)
            if not costs.empty:
                written.append(atomic_write_text(folder / "cost.csv", costs.to_csv(index=False)))
                written.append(atomic_write_text(folder / "cost.md", markdown.cost_markdown(costs, context)))
    return written


def plot_heatmaps(records: LoadedRecords | Iterable[RunRecord], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per (scenario, method): the seed-averaged R@1 matrices, i2t and t2i side by side
    (:func:`benchmark.reporting.figures.heatmap_png`)."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    used_names: set[str] = set()
    for scenario, protocols in by_scenario_and_protocol(as_records(records)).items():
        for protocol, group in protocols.items():
            by_method: dict[str, list[RunRecord]] = {}
            for record in group:
                by_method.setdefault(record.method, []).append(record)
            for method, runs in by_method.items():
                parts = [scenario] + ([protocol_slug(group[0].protocol)] if len(protocols) > 1 else []) + [method]
                name = unique("heatmap_" + "_".join(slug(p) for p in parts), used_names) + ".png"
                written.append(atomic_write_bytes(out_dir / name, heatmap_png(scenario, protocol, method, runs)))
    return written


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
