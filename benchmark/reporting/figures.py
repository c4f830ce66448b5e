"""The figures of a report: seed-averaged recall heatmaps, rendered to PNG bytes.

matplotlib is imported inside the functions: only plotting pays for it, and a bare
:class:`matplotlib.figure.Figure` (rendered by Agg) never switches the caller's backend or
leaks open figures as pyplot would.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter

import numpy as np

from benchmark.record import RunRecord

from .table import DIRECTION_NAMES, DIRECTIONS

logger = logging.getLogger("benchmark.reporting")  # the package's one logger name


def heatmap_png(scenario: str, protocol: str, method: str, runs: list[RunRecord]) -> bytes:
    """The seed-averaged R@1 matrices of one method, i2t and t2i side by side, as a PNG.

    Rows are "after session t", columns "task j"; unevaluated cells stay blank.
    """
    from matplotlib.figure import Figure  # imported here: only plotting pays for matplotlib

    figure = _heatmap_figure(Figure, scenario, protocol, method, runs)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


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
