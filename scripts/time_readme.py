"""Measure the wall times the README quotes, on this machine, and print them with the machine.

The README's times ("the demo took N s") were once measured on one idle machine. This script
reruns the same commands so a user can see what *their* machine does, and so the README can give
a range with the machine it came from instead of one number:

    python scripts/time_readme.py                 # the demo: zeroshot,finetune on synthetic
    python scripts/time_readme.py --grid          # also the 9-method grid on synthetic (one seed)
    python scripts/time_readme.py --repeats 5 --json times.json

Each command runs in a fresh temporary output folder. The first demo run uses an empty
backbone cache, so it includes pretraining the synthetic backbone once (what a first-time user
sees); later runs reuse that cache. Runs are sequential and nothing else should run meanwhile:
on a shared machine the spread between repeats says how much to trust the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = ["--methods", "zeroshot,finetune", "--scenario", "synthetic"]
GRID = ["--methods", "zeroshot,finetune,l2p,dualprompt,coda,sprompts,lora,lpi,lpi_released",
        "--scenario", "synthetic", "--seeds", "0"]


def machine() -> dict[str, object]:
    """What the times depend on: CPU model and cores, Python, torch and its threads, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "load_average": _load()}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timed_run(args: list[str], cache: Path, out: Path) -> float:
    env = dict(os.environ, CLVL_CACHE=str(cache), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmark", "run", *args, "--output-dir", str(out)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"error: `benchmark run {' '.join(args)}` exited {done.returncode}: {tail[0]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command (default 3)")
    parser.add_argument("--grid", action="store_true", help="also time the 9-method grid (one seed)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    figures: dict[str, object] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="clvl-times-") as tmp:
        cache = Path(tmp, "cache")
        demo = [timed_run(DEMO, cache, Path(tmp, f"demo{i}")) for i in range(args.repeats)]
        figures["demo_first_run_s"] = round(demo[0], 1)  # pretraining the backbone included
        figures["demo_cached_s"] = [round(t, 1) for t in demo[1:]]
        if args.grid:
            figures["grid_one_seed_s"] = [round(timed_run(GRID, cache, Path(tmp, f"grid{i}")), 1)
                                          for i in range(args.repeats)]
    m = figures["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"GPU {m['gpu'] or 'none'}, load average before {m['load_average']}")
    print(f"demo, first run (pretrains the synthetic backbone): {figures['demo_first_run_s']} s")
    if figures["demo_cached_s"]:
        cached = figures["demo_cached_s"]
        print(f"demo, backbone cached: {min(cached)}-{max(cached)} s (median {statistics.median(cached)}, "
              f"{len(cached)} runs)")
    if args.grid:
        grid = figures["grid_one_seed_s"]
        print(f"9-method grid, one seed: {min(grid)}-{max(grid)} s (median {statistics.median(grid)}, "
              f"{len(grid)} runs)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
