"""The bench's two files: ``bench.json`` (every figure, with the machine and the options) and
``bench.md`` (the same as tables a person reads), both written atomically
(:mod:`benchmark.io`) into the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_write_json, atomic_write_text
from .options import GOAL_MODEL, GOAL_PAIRS_PER_S

SCHEMA = "clvl-benchmark/bench/v1"


def goal(report: dict[str, Any]) -> dict[str, Any]:
    """lpi's pairs/s against the goal, and whether this bench's setting is the goal's."""
    options = report["options"]
    training = report["sections"].get("training", {})
    rows = {r["feed"]: r for r in training.get("rows", [])
            if r.get("method") == "lpi" and r.get("status") == "measured"}
    comparable = options["model"] == GOAL_MODEL and options["device"].startswith("cuda")
    result: dict[str, Any] = {"target_pairs_per_s": GOAL_PAIRS_PER_S, "comparable": comparable,
                              "pipeline_pairs_per_s": rows.get("pipeline", {}).get("pairs_per_s"),
                              "memory_pairs_per_s": rows.get("memory", {}).get("pairs_per_s")}
    for feed in ("pipeline", "memory"):
        value = result[f"{feed}_pairs_per_s"]
        result[f"{feed}_vs_target"] = None if value is None else value / GOAL_PAIRS_PER_S
    if not rows:
        result["line"] = "lpi was not measured (add it to --methods and the training section to --sections)"
    else:
        setting = "" if comparable else (f" (not the goal's setting: measured on {options['device']} with "
                                         f"{options['model']}; the goal is {GOAL_MODEL} on a GPU in bf16)")
        parts = [f"{_num(result[f'{feed}_pairs_per_s'])} pairs/s with the {label} "
                 f"({_num(result[f'{feed}_vs_target'], 3)}x the goal)"
                 for feed, label in (("pipeline", "real data pipeline"), ("memory", "in-memory tensors"))
                 if result[f"{feed}_pairs_per_s"] is not None]
        result["line"] = f"lpi: {'; '.join(parts)}, against the goal of {GOAL_PAIRS_PER_S:,.0f} pairs/s{setting}."
    return result


def write_report(report: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    folder = Path(output_dir)
    json_path = atomic_write_json(folder / "bench.json", report)
    md_path = atomic_write_text(folder / "bench.md", markdown(report))
    return json_path, md_path


# ============================================================================ Markdown


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table: significant digits, thousands separators, '-' when unknown."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value:  # NaN
        return "-"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    text = f"{value:.{digits}g}"
    return f"{float(text):,}" if "e" in text else text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_num(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    options, machine, sections = report["options"], report["machine"], report["sections"]
    lines = ["# Bench", "",
             f"{machine.get('device_name')} ({options['device']}), {machine.get('cpu_cores_usable')} CPU cores, "
             f"torch {machine.get('versions', {}).get('torch')}, model {options['model']} (random weights), "
             f"batch {options['batch_size']}, {options['steps']} timed steps after {options['warmup']} warm-up, "
             f"{report['created']}; the whole bench took {_num(report['wall_s'], 3)} s.", "",
             f"**Goal.** {report['goal']['line']}", ""]
    for name, section in sections.items():
        lines += [f"## {name}", ""]
        if section.get("status") != "measured":
            lines += [f"{section.get('status')}: {section.get('reason', '')}", ""]
            continue
        lines += RENDER[name](section)
        if section.get("definition"):
            lines += [f"_{section['definition']}._", ""]
    return "\n".join(lines).rstrip() + "\n"


def _hooks(section):
    rows = [[r["tower"], r["pass"], r["variant"], r["ms_per_call"], r["time_ratio"], r["flop_ratio"], r["overhead"]]
            for r in section["rows"]]
    plain = [f"{r['tower']} {r['pass']} {_num(r['time_ratio'], 3)}x" for r in section["rows"]
             if r["variant"] == "hooks, none"]
    return [f"Hook path without prompts against open_clip: {', '.join(plain)} (the claim to keep: 0.99-1.01x "
            "at ViT-B/16 shapes).", "",
            f"Precision {section['precision']}; prompt sizes: " +
            ", ".join(f"{k} {v}" for k, v in section["prompt_sizes"].items()) + ".", ""] + _table(
        ["tower", "pass", "variant", "ms/call", "time ratio", "FLOP ratio", "overhead"], rows)


def _training(section):
    rows = []
    for r in section["rows"]:
        if r.get("status") != "measured":
            rows.append([r["method"], r["feed"], r["status"], "", "", "", "", "", ""])
            continue
        share = r["share"]
        rows.append([r["method"], r["feed"], r["pairs_per_s"], r.get("pipeline_vs_memory"), _pct(share["data"]),
                     _pct(share["device"]), _pct(share["launch"]), r["gflop_per_pair"], r["achieved_tflops"]])
    return [section["precision_note"] + ".", ""] + _table(
        ["method", "feed", "pairs/s", "pipeline / memory", "data", "device", "launch", "GFLOP/pair", "TFLOP/s"], rows)


def _data(section):
    rows = [[r["decode_path"], r["workers"], r["pairs_per_s"], r["pairs_per_s_per_worker"], r["item_bytes"] / 1024,
             f"{r['image_dtype']} {'x'.join(map(str, r['image_shape']))}"] for r in section["rows"]]
    return _table(["decode path", "workers", "pairs/s", "pairs/s per worker", "KiB per item", "item"], rows)


def _evaluation(section):
    rows = [[r["method"], r["variant"], f"{r['gallery_images']} x {r['gallery_captions']}", r["eval_s"],
             r["items_per_s"], r["key_fit_s"] if r["fits_keys"] else "no keys", r["key_fit_pairs_per_s"]]
            for r in section["rows"]]
    return [f"{section['protocol']}, {section['tasks']} tasks, eval batch {section['eval_batch_size']}.", ""] + _table(
        ["method", "variant", "gallery (images x captions)", "eval s", "items/s", "key fitting s", "key pairs/s"], rows)


def _checkpoints(section):
    rows = [[r["method"], r["file_mib"], r["save_s"], r["frozen_backbone_mib"], _pct(r["frozen_backbone_share"]),
             r["slim_file_mib"], r["slim_save_s"], f"{_num(r['size_ratio'])}x", f"{_num(r['save_ratio'])}x"]
            for r in section["rows"]]
    return [f"Checkpoint {section['kind']}: the whole state (before) and what a run saves now, without the "
            "unchanged backbone.", ""] + _table(
        ["method", "whole MiB", "whole save s", "frozen backbone MiB", "frozen share", "saved MiB", "saved s",
         "size ratio", "save-time ratio"], rows)


def _device(section):
    peak = section["bf16_peak_tflops"]
    known = f"{_num(peak)} TFLOP/s ({section['peak_source']})" if peak else "unknown (no share of peak)"
    lines = [f"Device {section['device_name']}: bf16 dense peak {known}.", ""]
    rows = [[r["method"], r["feed"], r["achieved_tflops"], "-" if r["peak_share"] is None else _pct(r["peak_share"])]
            for r in section["rows"]]
    return lines + _table(["method", "feed", "achieved TFLOP/s", "share of bf16 peak"], rows)


RENDER = {"hooks": _hooks, "training": _training, "data": _data, "evaluation": _evaluation,
          "checkpoints": _checkpoints, "device": _device}
