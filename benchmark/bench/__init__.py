"""``python -m benchmark bench``: how fast the harness is on this machine, measured in one run.

Sections (each a module here, each a function that returns one part of the report):

============  ==================================================================================
hooks         the backbone's prompt hooks against plain open_clip (:mod:`.hooks`)
training      pairs/s of each method's training step, real data pipeline and in-memory, and the
              share of a step spent on data, launching and the device (:mod:`.training`)
data          data-pipeline pairs/s per worker for each decode path (:mod:`.data`)
evaluation    key fitting and evaluation time of a union gallery of N images x 5N captions
              (:mod:`.evaluation`)
checkpoints   checkpoint size and save time (:mod:`.checkpoints`)
device        the device, its bf16 peak and the achieved TFLOP/s (:mod:`.device`)
============  ==================================================================================

:func:`run_bench` runs the chosen sections with a progress bar each and writes ``bench.json``
and ``bench.md`` (:mod:`.report`). Everything runs on random weights at the shapes of the chosen
model (ViT-B/16 by default): nothing is downloaded. Timing rules are in :mod:`.timing`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .options import SECTIONS, BenchOptions, resolve_options

__all__ = ["SECTIONS", "BenchOptions", "resolve_options", "run_bench"]

log = logging.getLogger(__name__)


def run_bench(options: BenchOptions) -> tuple[dict[str, Any], Path, Path]:
    """Measure the chosen sections; returns the report and the paths of ``bench.json`` and ``bench.md``."""
    import torch
    from tqdm.auto import tqdm

    from .data import captioned, write_photos
    from .device import machine_facts
    from .report import SCHEMA, goal, write_report

    started = time.perf_counter()
    check_writable(Path(options.output_dir))
    torch.manual_seed(0)
    report: dict[str, Any] = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "options": options.to_json(), "machine": machine_facts(options.device),
                              "sections": {}}
    with tempfile.TemporaryDirectory(prefix="clvl-bench-photos-") as photos:
        items = None
        needs_photos = {"training", "data", "evaluation", "checkpoints"} & set(options.sections)
        if needs_photos:
            count = max(options.profile["photos"], options.eval_images)
            with _bar("photos", count) as bar:
                paths = write_photos(Path(photos), count, options.profile["photo_size"])
                bar.update(count)
            items = captioned(paths)
        for name in SECTIONS:
            if name not in options.sections:
                report["sections"][name] = {"status": "skipped", "reason": "not asked for (--sections)"}
                continue
            log.info("bench: %s", name)
            report["sections"][name] = SECTION_RUNNERS[name](options, items, report, tqdm)
    report["goal"] = goal(report)
    report["wall_s"] = time.perf_counter() - started
    json_path, md_path = write_report(report, options.output_dir)
    return report, json_path, md_path


def check_writable(folder: Path) -> None:
    """Fail before measuring anything if the report cannot be written into ``folder``."""
    from ..errors import OutputError
    from ..io import probe_writable

    try:
        probe_writable(folder)
    except OSError as error:
        raise OutputError(f"bench output folder {folder} is not writable ({error.strerror or error}); choose "
                          "another --output-dir or fix its permissions") from None


def _bar(name: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"bench {name}", unit="step", leave=False)


def _hooks(options, items, report, tqdm):
    from ..backbone import load_backbone
    from .hooks import hook_steps, measure_hooks
    from .training import quiet_load

    backbone = quiet_load(load_backbone, options.model, str(options.device))
    with _bar("hooks", hook_steps(options)) as bar:
        return measure_hooks(options, backbone, lambda: bar.update(1))


def _training(options, items, report, tqdm):
    from .data import bench_scenario
    from .training import measure_training

    scenario = bench_scenario(items[:options.profile["photos"]], 1, options.model)
    with _bar("training", 2 * len(options.methods)) as bar:
        return measure_training(options, scenario, lambda: bar.update(1))


def _data(options, items, report, tqdm):
    from ..backbone import load_backbone
    from .data import decode_paths, measure_data, worker_counts
    from .training import quiet_load

    backbone = quiet_load(load_backbone, options.model, "cpu")  # only its transforms and tokenizer are used
    with _bar("data", len(decode_paths(backbone)) * len(worker_counts(options.tiny))) as bar:
        return measure_data(options, items[:options.profile["photos"]], backbone, lambda: bar.update(1))


def _evaluation(options, items, report, tqdm):
    from .evaluation import evaluation_steps, measure_evaluation

    with _bar("evaluation", evaluation_steps(options)) as bar:
        return measure_evaluation(options, items[:options.eval_images], lambda: bar.update(1))


def _checkpoints(options, items, report, tqdm):
    from .checkpoints import measure_checkpoints
    from .data import bench_scenario

    scenario = bench_scenario(items[:options.profile["photos"]], 1, options.model)
    with _bar("checkpoints", len(options.methods)) as bar:
        return measure_checkpoints(options, scenario, lambda: bar.update(1))


def _device(options, items, report, tqdm):
    from .device import bf16_peak

    name = report["machine"].get("device_name") or str(options.device)
    peak, label = bf16_peak(name) if options.device.type == "cuda" else (None, None)
    rows = []
    for row in report["sections"].get("training", {}).get("rows", []):
        if row.get("status") != "measured":
            continue
        share = row["achieved_tflops"] / peak if peak and options.device.type == "cuda" else None
        rows.append({"method": row["method"], "feed": row["feed"], "achieved_tflops": row["achieved_tflops"],
                     "peak_share": share})
    return {"status": "measured", "device_name": name, "bf16_peak_tflops": peak, "peak_source": label,
            "peak_note": None if peak else "peak unknown: share of peak omitted", "rows": rows,
            "definition": "achieved TFLOP/s = counted FLOPs of one training step / measured seconds per step "
                          "(training section); share = achieved / the device's dense bf16 peak"}


SECTION_RUNNERS = {"hooks": _hooks, "training": _training, "data": _data, "evaluation": _evaluation,
                   "checkpoints": _checkpoints, "device": _device}
