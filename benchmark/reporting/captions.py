"""What the words around a table say: seeds, protocol, metric definitions, what bold and daggers mean.

The Markdown table carries everything in its caption. The LaTeX table gets a caption short
enough to paste into a paper (:func:`short_caption`); the definitions it leaves out go to the
notes file beside it (:func:`caption`, the same sentences as the Markdown caption).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from benchmark.metrics import METRICS
from benchmark.record import RunRecord, protocol_label

from .escape import latex_arrows, latex_escape
from .significance import short_significance_sentence, significance_sentence
from .table import DIRECTION_NAMES, CompactTable, MainTable, SummaryColumn, ordered_directions

PROTOCOL_PARTS = (("gallery", "gallery"), ("task_identity", "task identity"), ("tasks", "tasks evaluated"))


@dataclass
class TableContext:
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


def _markup(target: str) -> tuple[Callable[[str], str], Callable[[str], str], str, str, str]:
    """``(text, code, ±, ↑, ↓)`` for ``target`` "md" or "tex". Prose goes through ``text``
    (LaTeX-escaped for .tex: a bare "%" would comment out the rest of the line), formulas
    through ``code`` (code span / \\texttt, so brackets and underscores show)."""
    if target == "md":
        return (lambda s: s), (lambda s: f"`{s}`"), "±", "↑", "↓"
    return ((lambda s: latex_arrows(latex_escape(s))), (lambda s: rf"\texttt{{{latex_escape(s)}}}"),
            r"$\pm$", r"$\uparrow$", r"$\downarrow$")


def _spread(context: TableContext, text, pm: str, what: str = "recall@K (%)") -> str:
    if context.max_seeds() > 1:
        return f"{text(what + ', mean')} {pm} {text('std (ddof=1) over ' + context.seeds_phrase())}"
    return text(f"{what}, single run per method, {context.seeds_phrase()}")


def _protocol_parts(protocol: Mapping[str, Any], text, code) -> str:
    return ", ".join(f"{text(label)} {code(str(protocol.get(key, '?')))}" for key, label in PROTOCOL_PARTS)


def caption(table: MainTable, context: TableContext, target: str) -> str:
    """The full caption of the paper table: seeds, protocol, metric definitions, conventions.

    The caption of results.md, and the text of results.notes.tex; the same sentences for
    both, only the markup differs.
    """
    text, code, pm, up, down = _markup(target)
    protocol = context.protocol
    directions = "; ".join(f"{d} = {DIRECTION_NAMES.get(d, d)}" for d in ordered_directions(c.direction for c in table.columns))
    metrics = dict.fromkeys(c.metric for c in table.columns)  # ordered, unique
    definitions = "; ".join(f"{text(METRICS[m].label)} = {code(METRICS[m].definition)}" for m in metrics)
    sentences = [
        f"{text(context.scenario)}: {_spread(context, text, pm)}.",
        f"{text('Protocol:')} {_protocol_parts(protocol, text, code)}; {text(gallery_phrase(protocol))}.",
        f"{text(directions)}.",
        f"{text('R[t][j] is the recall on task j after training session t, T the number of tasks:')} {definitions}.",
        f"{up} {text('higher is better,')} {down} {text('lower is better; best value per column in bold.')}",
    ]
    if table.significance is not None and len(table.rows) > 1:
        sentences.append(significance_sentence(table.significance, target, text))
    return " ".join(sentences)


def short_caption(table: MainTable | CompactTable, context: TableContext, target: str = "tex") -> str:
    """A caption to paste into a paper: what was run, how it reads, what bold and daggers mean.
    Definitions and test details are in :func:`caption` (the notes file)."""
    text, code, pm, up, down = _markup(target)
    sentences = [
        f"{text(context.scenario)}: {_spread(context, text, pm)}.",
        f"{text('Protocol:')} {_protocol_parts(context.protocol, text, code)}.",
    ]
    if isinstance(table, CompactTable):
        sentences.append(_compact_columns_sentence(table, text))
    sentences.append(f"{text('Bold: best per column;')} {up}/{down} {text('higher/lower is better.')}")
    if table.significance is not None and len(table.rows) > 1:
        sentence = short_significance_sentence(table.significance, target, text)
        if sentence:
            sentences.append(sentence)
    return " ".join(sentences)


def _compact_columns_sentence(table: CompactTable, text) -> str:
    ks = "/".join(str(k) for k in table.ks)
    parts = [f"R@K = final average recall@K (K = {ks})"]
    for column in table.columns:
        if isinstance(column, SummaryColumn) and column.key == "average":
            parts.append("Avg = mean of the R@K columns")
        elif isinstance(column, SummaryColumn) and column.key == "backward_transfer":
            parts.append(f"BWT = backward transfer of R@{column.k}, mean of the directions")
    return text("; ".join(parts) + ".")


def compact_caption(table: CompactTable, context: TableContext) -> str:
    """The caption of results.compact.md: the short caption, plus where the definitions are."""
    return short_caption(table, context, "md") + " Definitions and tests: the caption of results.md."


def lpi_caption(context: TableContext, ks: tuple[int, ...]) -> str:
    k_list = ", ".join(map(str, ks))
    lpi_metrics = ("lpi_average_over_history", "lpi_signed_forgetting")
    definitions = "; ".join(f"{METRICS[m].label} = `{METRICS[m].definition}`" for m in lpi_metrics)
    return (
        f"Metrics as computed by LPI (Low-rank Prompt Interaction, ACM MM 2024), for comparison with its "
        f"reported numbers: per run, each metric is averaged over K = {k_list}, then mean ± std (ddof=1) "
        f"over {context.seeds_phrase()}. {definitions}. LPI forget is negative when the model forgets. "
        f"Protocol: {protocol_label(context.protocol)} ({gallery_phrase(context.protocol)})."
    )


def cost_note(context: TableContext, kinds: list[str]) -> str:
    return (f"{context.scenario}: costs per method, mean over seeds. Parameter counts come from the live modules; "
            f"peak memory is {', '.join(kinds) or 'not recorded'} (run_peak_rss: the process's peak resident memory "
            "during the run, CPU; process_peak_rss: its peak since the command started, earlier runs included; "
            "cuda_max_allocated: the CUDA allocator's peak for the run).")
