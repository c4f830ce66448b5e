"""Checkpoint size and save time: what a run writes when it checkpoints inside a task.

For each selected method the section builds the method and its strategy as a run does
(:func:`benchmark.bench.training.build_trainer`, in-memory feed), trains one step (so the
optimizer has state), assembles the payload with the runner's own
:func:`benchmark.run.state.checkpoint_payload` and saves it with
:func:`benchmark.checkpoint.save` (atomic write, fsync) into a temporary folder inside the
output folder, on the disk a run's checkpoints go to. Reported: the file's size, the median
save time over the repeats, and how much of the method's state is the frozen pretrained
backbone, for two payloads: the whole state (what checkpoints held before schema 2:
``file_mib``, ``save_s``) and what a run saves now, without the backbone entries still as built
(:class:`benchmark.checkpoint.FrozenWeights`, taken right after the method is built, as the run
loop does: ``slim_file_mib``, ``slim_save_s``), with their ratios.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable


def checkpoint_payload_of(trainer, method_name: str, inside: bool, frozen=None) -> dict:
    """The payload a run saves at this step (``inside`` a task) or after a task; ``frozen``
    (:class:`benchmark.checkpoint.FrozenWeights`): leave the unchanged backbone out, else the whole state."""
    from ..run.state import RunState, checkpoint_payload

    run = SimpleNamespace(run_id=f"bench-{method_name}", digest="bench", identity={}, method_cls=type(
        trainer.setup.method), seed=0)
    state = RunState.start(trainer.setup.scenario.num_tasks)
    return checkpoint_payload(run, trainer.setup.scenario.task_names, state, trainer.setup.method, trainer.strategy,
                              list(trainer.setup.method.plugins()), inside=inside, current_task_time=0.0, elapsed_s=0.0,
                              peak_memory_mb=0.0, frozen=frozen)


def frozen_backbone_bytes(method) -> int:
    """Bytes of the method's state that are backbone parameters no task trains (requires_grad off)."""
    frozen = {f"backbone.{name}" for name, p in method.backbone.named_parameters() if not p.requires_grad}
    return sum(t.numel() * t.element_size() for key, t in method.state_dict().items() if key in frozen)


def measure_checkpoints(options, scenario, tick: Callable[[], None]) -> dict:
    """The checkpoints section (see the module docstring)."""
    from .. import checkpoint as ckpt
    from .training import build_trainer, train_until_timed

    repeats = max(1, options.profile["repeats"])
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    folder = Path(tempfile.mkdtemp(prefix=".bench-checkpoints-", dir=output))
    try:
        for name in options.methods:
            trainer = build_trainer(name, options, scenario, "memory", warmup=0, steps=1)
            method = trainer.setup.method
            unchanged = ckpt.FrozenWeights(method)  # as the run loop takes it, right after building
            if method.trains:
                train_until_timed(trainer)
            path = folder / name / ckpt.FILE_NAME
            measured = {}
            for variant, frozen in (("whole", None), ("slim", unchanged)):
                # A method that never trains still saves a checkpoint after each task.
                payload = checkpoint_payload_of(trainer, name, inside=method.trains, frozen=frozen)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    ckpt.save(path, payload)
                    times.append(time.perf_counter() - start)
                measured[variant] = (path.stat().st_size, statistics.median(times), times)
                shutil.rmtree(path.parent, ignore_errors=True)
            (size, save_s, times), (slim_size, slim_s, slim_times) = measured["whole"], measured["slim"]
            frozen_bytes = frozen_backbone_bytes(method)
            rows.append({"method": name, "file_mib": size / 2 ** 20, "save_s": save_s,
                         "repeats_s": times, "frozen_backbone_mib": frozen_bytes / 2 ** 20,
                         "frozen_backbone_share": frozen_bytes / size if size else None,
                         "mib_per_s": size / 2 ** 20 / save_s,
                         "slim_file_mib": slim_size / 2 ** 20, "slim_save_s": slim_s, "slim_repeats_s": slim_times,
                         "size_ratio": size / slim_size, "save_ratio": save_s / slim_s})
            del trainer, method, payload
            tick()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"status": "measured", "rows": rows,
            "kind": "inside a task (method state, optimizer, RNG, progress); after a task for a method that "
                    "never trains",
            "definition": "file_mib: checkpoint.pt of the whole state (before); slim_file_mib: what a run saves "
                          "(without the unchanged backbone); save_s: median seconds of checkpoint.save; "
                          "frozen_backbone_share: frozen backbone bytes / whole file bytes; size_ratio, "
                          "save_ratio: whole / slim"}

