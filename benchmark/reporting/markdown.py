"""The Markdown tables: paper table, compact table, LPI view and costs, each with its caption."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.metrics import METRICS

from .captions import TableContext, caption, compact_caption, cost_note, lpi_caption
from .escape import markdown_escape
from .frames import COST_COLUMNS, LPI_METRICS
from .table import DIRECTIONS, Cell, Column, CompactTable, MainTable, arrow, format_value


def _pipe_table(frame: pd.DataFrame) -> str:
    # disable_numparse: tabulate would otherwise re-format "45.0" as "45".
    return frame.to_markdown(index=False, disable_numparse=True)


def _marked(cells: list[Cell | None]) -> list[str]:
    texts = [format_value(cell, "±", "–") for cell in cells]
    texts = [f"**{text}**" if cell is not None and cell.best else text for cell, text in zip(cells, texts)]
    return [f"{text}†" if cell is not None and cell.significant else text for cell, text in zip(cells, texts)]


def _recall_table(title: str, headers: list[str], rows: dict, text_below: str) -> str:
    """A titled pipe table of marked cells (one row per method) with its caption below."""
    body = [[markdown_escape(method)] + _marked(cells) for method, cells in rows.items()]
    markdown = _pipe_table(pd.DataFrame(body, columns=["Method", *headers]))
    return f"{title}\n\n{markdown}\n\n{text_below}\n"


def main_markdown(table: MainTable, context: TableContext) -> str:
    headers = [f"{c.direction} R@{c.k} {c.spec.label} {arrow(c.spec, '↑', '↓')}" for c in table.columns]
    return _recall_table(f"### {context.scenario}: retrieval recall (%)", headers, table.rows,
                         caption(table, context, "md"))


def compact_header(column) -> str:
    """A compact-table header: ``i2t R@1``, ``Avg``, ``BWT R@1``."""
    if isinstance(column, Column):
        return f"{column.direction} R@{column.k}"
    return "Avg" if column.key == "average" else f"BWT R@{column.k}"


def compact_markdown(table: CompactTable, context: TableContext) -> str:
    headers = [f"{compact_header(c)} {arrow(c.spec, '↑', '↓')}" for c in table.columns]
    return _recall_table(f"### {context.scenario}: retrieval recall (%), compact", headers, table.rows,
                         compact_caption(table, context))


def lpi_markdown(lpi: pd.DataFrame, context: TableContext, ks: tuple[int, ...]) -> str:
    column_keys = [(metric, k) for metric in LPI_METRICS for k in ["mean"] + [str(k) for k in ks]]

    def header(metric: str, k: str) -> str:
        spec = METRICS[metric]
        where = f"(mean R@{'/'.join(map(str, ks))})" if k == "mean" else f"R@{k}"
        return f"{spec.label} {where} {arrow(spec, '↑', '↓')}"

    lookup = {(r.method, r.direction, r.metric, r.k): r for r in lpi.itertuples(index=False)}
    body = []
    for direction in [d for d in DIRECTIONS if d in set(lpi["direction"])]:
        for method in context.methods:
            cells = []
            for metric, k in column_keys:
                row = lookup.get((method, direction, metric, k))
                cell = None if row is None or row.n_seeds == 0 else Cell(row.mean, row.std, row.n_seeds)
                cells.append(format_value(cell, "±", "–"))
            body.append([markdown_escape(method), direction] + cells)
    table = pd.DataFrame(body, columns=["Method", "Direction"] + [header(m, k) for m, k in column_keys])
    return f"### {context.scenario}: LPI-comparable view\n\n{_pipe_table(table)}\n\n{lpi_caption(context, ks)}\n"


def cost_markdown(costs: pd.DataFrame, context: TableContext) -> str:
    def fmt(key: str, value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        if key.endswith("params") or key in ("params_per_task", "params_shared", "forward_passes_per_query"):
            return f"{int(round(value)):,}"
        return f"{value:.1f}"

    table = pd.DataFrame({"Method": costs["method"].map(markdown_escape)})
    for key, label in COST_COLUMNS.items():
        table[label] = [fmt(key, v) for v in costs[key]]
    kinds = sorted(set(costs["peak_memory_kind"].dropna()))
    return f"### {context.scenario}: cost\n\n" + _pipe_table(table) + f"\n\n{cost_note(context, kinds)}\n"
