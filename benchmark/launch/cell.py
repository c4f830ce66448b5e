"""One cell of a grid, run anywhere: :func:`run_cell` knows nothing of the engine that calls it.

A cell is one planned run (one method and seed) of a grid. It receives the grid's whole
effective config and the id of its run (:class:`CellSpec`), plans the grid again exactly as the
driver did (:func:`benchmark.run.loop.prepare`: same code, data and config give the same run
ids), and executes its run with :func:`benchmark.run.loop.run_one`, the function the local
launcher calls. So its record, run id, checkpoints and log (``runs/<run_id>.log``) are the ones
``--launcher local`` writes. A cell writes only its own files, each atomically; tables are the
driver's, after the grid.

**Idempotent.** An engine may run a cell twice (a retry after its worker died, a duplicate), so
the cell decides from the disk what is left (:func:`cell_action`): its record exists -> nothing
(unless the driver was given ``--force`` and so asked for a new record); its own checkpoint
exists -> resume from it (the checkpoint of an attempt that died); otherwise what the driver
decided (start, or ``--resume-anyway``'s adopt). A retried cell therefore ends in the same record
as an uninterrupted one. One corner is slower but still right: under ``--force``, an attempt that
died after writing its record and deleting its checkpoint is started over on its retry.

**Failures.** Any exception of the run is *deterministic* (it would happen again): the cell
writes ``runs/<run_id>.error.json`` (:func:`write_error_record`, schema
:data:`ERROR_SCHEMA`: what failed, the one-line message, the exception type, where the checkpoint
is, the log) and returns normally, so that the engine does not retry it. A later successful run
of the cell removes that file. Only :class:`~benchmark.errors.RunInterrupted` (SIGTERM / Ctrl-C
after a checkpoint was saved) propagates: the engine's wrapper decides what a stop means.

**K GPUs.** A cell given more than one GPU runs as ``torchrun --standalone --nproc_per_node=K``
of ``python -m benchmark run ... --only <run_id> --ddp`` (:func:`torchrun_command`), reading the
effective config from ``runs/<run_id>.config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..data.loading import CELL_CPUS_ENV
from ..errors import BenchmarkError, RunInterrupted, one_line
from ..io import atomic_write_json, atomic_write_text
from ..record import ERROR_SUFFIX
from ..run.loop import prepare, run_one
from ..run.planning import PlannedRun, RunControl
from ..run.signals import StopSignals

log = logging.getLogger("benchmark.launch")

ERROR_SCHEMA = "clvl-benchmark/run-error/v1"


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """Everything a cell needs, small enough to send to a worker (the config is a few KB).

    ``config`` is the grid's whole effective config (not one narrowed to this cell's method and
    seed: the record keeps the grid's other settings). ``control`` is the driver's
    :class:`~benchmark.run.planning.RunControl` (checkpointing, image check, ``force``, ...);
    ``how`` what the driver's :func:`~benchmark.run.planning.triage` decided; ``cwd`` the
    driver's working folder, against which relative paths of the config (``output_dir``,
    ``data_root``) are read, on any node."""

    config: RunConfig
    run_id: str
    method: str
    seed: int
    control: RunControl
    how: str = "start"  # start | resume | adopt
    adopt_from: str | None = None  # --resume-anyway: the earlier identity's checkpoint
    adopt_changes: str = ""
    cwd: str = ""
    argv: tuple[str, ...] = ()  # the driver's command line, which the record's provenance names
    gpus: int = 0  # GPUs the engine gave the cell; more than 1: torchrun

    @classmethod
    def of(cls, config: RunConfig, run: PlannedRun, how: str, control: RunControl, gpus: int = 0) -> "CellSpec":
        return cls(config=config, run_id=run.run_id, method=run.method_cls.name, seed=run.seed, control=control,
                   how=how, adopt_from=None if run.adopt_from is None else str(run.adopt_from),
                   adopt_changes=run.adopt_changes, cwd=os.getcwd(), argv=tuple(sys.argv), gpus=gpus)


def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Run one cell; returns ``{"run_id", "status": "done" | "skipped" | "failed", "record",
    "error", "error_file"}`` (paths as strings). The files are the truth; this is a summary."""
    if spec.cwd:
        try:
            os.chdir(spec.cwd)
        except OSError as error:
            return _failed(spec, Path(spec.config.output_dir), BenchmarkError(
                f"the driver's working folder {spec.cwd} is not on this node ({error.strerror or error}): run the "
                "driver from a folder on shared storage that every node mounts at the same path"))
    output_dir = Path(spec.config.output_dir)
    control = dataclasses.replace(spec.control, only=None, launcher="local")
    try:
        grid = prepare(spec.config, control)  # the driver's planning, repeated here
        run = next((r for r in grid.planned if r.run_id == spec.run_id), None)
        if run is None:
            raise BenchmarkError(
                f"this worker plans other run ids than the driver ({', '.join(r.run_id for r in grid.planned)}): its "
                "harness code, method code, package versions, data or device differ from the driver's; install "
                "the same harness and data on every node, and run the driver where `device` resolves as on them")
        run.adopt_from = Path(spec.adopt_from) if spec.adopt_from else None
        run.adopt_changes = spec.adopt_changes
        how = cell_action(run, spec)
        if how is None:
            log.info("%s: its record exists already (a repeated cell): nothing to do", run.run_id)
            return {"run_id": run.run_id, "status": "skipped", "record": str(run.path)}
        # The engine gave this cell its CPUs: `num_workers: auto` sizes the loaders from them.
        os.environ[CELL_CPUS_ENV] = str(spec.config.launcher.cpus_per_cell)
        if spec.gpus > 1 and how == "start":
            return _run_torchrun(spec, run, how)
        if spec.gpus > 1:  # --ddp cannot continue from a checkpoint yet: the same numbers in one process
            log.warning("%s: continuing from its checkpoint in one process on one of its %d GPUs (`run --ddp` "
                        "does not resume yet; the numbers are the same)", run.run_id, spec.gpus)
        with StopSignals() as stop, _driver_command(spec.argv):
            path = run_one(grid, run, how, control, stop)
    except RunInterrupted:
        raise
    except Exception as error:  # deterministic: recorded, not retried
        return _failed(spec, output_dir, error)
    return {"run_id": run.run_id, "status": "done", "record": str(path)}


@contextlib.contextmanager
def _driver_command(argv: tuple[str, ...]):
    """While the run executes, ``sys.argv`` is the driver's: the record's ``provenance.command``
    then names the command the user ran (as under the local launcher), not the engine's worker."""
    saved = sys.argv
    sys.argv = list(argv) or saved
    try:
        yield
    finally:
        sys.argv = saved


def cell_action(run: PlannedRun, spec: CellSpec) -> str | None:
    """What this attempt of the cell does, from the disk (see the module docstring): None
    (its record exists and no new one was asked for), ``resume``, ``adopt`` or ``start``."""
    if run.path.exists() and not spec.control.force:
        return None
    if run.checkpoint.exists():
        return "resume"
    if spec.how == "adopt" and run.adopt_from is not None and run.adopt_from.exists():
        return "adopt"
    return "start"


def error_file(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / "runs" / f"{run_id}{ERROR_SUFFIX}"


def write_error_record(output_dir: str | Path, spec: CellSpec, error: BaseException | str, *,
                       error_type: str | None = None) -> Path:
    """Write ``runs/<run_id>.error.json`` atomically: which run failed, why (one line), the
    exception type, the checkpoint it can continue from (or null), its log, where and when.
    A traceback is kept for anything that is not a :class:`~benchmark.errors.BenchmarkError`
    (a bug, not a user mistake)."""
    checkpoint = ckpt.checkpoint_path(output_dir, spec.run_id)
    message = error if isinstance(error, str) else one_line(error) or type(error).__name__
    data = {"schema": ERROR_SCHEMA, "run_id": spec.run_id, "method": spec.method, "seed": spec.seed,
            "error_type": error_type or type(error).__name__, "message": message,
            "checkpoint": str(checkpoint) if checkpoint.exists() else None,
            "log": str(Path(output_dir) / "runs" / f"{spec.run_id}.log"),
            "host": socket.gethostname(), "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if isinstance(error, BaseException) and not isinstance(error, BenchmarkError):
        data["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return atomic_write_json(error_file(output_dir, spec.run_id), data)


def _failed(spec: CellSpec, output_dir: Path, error: BaseException) -> dict[str, Any]:
    try:
        path = str(write_error_record(output_dir, spec, error))
    except OSError as write_error:  # the driver still learns of the failure from the returned summary
        path = f"(not written: {write_error.strerror or write_error})"
    return {"run_id": spec.run_id, "status": "failed", "error": one_line(error) or type(error).__name__,
            "error_file": path}


# ============================================================================ K GPUs: torchrun


def config_file(config: RunConfig, run_id: str) -> Path:
    """Where a torchrun cell reads its effective config: ``runs/<run_id>.config.yaml``."""
    return Path(config.output_dir) / "runs" / f"{run_id}.config.yaml"


def torchrun_command(spec: CellSpec, how: str, config_path: Path) -> list[str]:
    """The command of a cell with ``spec.gpus`` > 1 GPUs: ``torchrun --standalone`` (one node,
    a rendezvous of its own on a free port) of ``spec.gpus`` processes, each running
    ``python -m benchmark run`` on the cell's config, restricted to its run (``--only``), split
    across the processes (``--ddp``). torchrun is started as ``python -m torch.distributed.run``
    (what the ``torchrun`` script runs) with this interpreter, so it is the same environment.
    ``how`` becomes the flag that makes the command line's triage do the same:
    ``--resume`` / ``--resume-anyway`` / ``--force`` (a new record over an existing one)."""
    control = spec.control
    flags = {"resume": ["--resume"], "adopt": ["--resume-anyway"]}.get(how, [])
    if how == "start" and control.force:
        flags = ["--force"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}",
               "-m", "benchmark", "run", "--config", str(config_path), "--only", spec.run_id, "--ddp",
               "--no-tables", "--checkpoint-every", str(control.checkpoint_every), "--bad-images", control.bad_images,
               *flags]
    if control.keep_checkpoints:
        command.append("--keep-checkpoints")
    if not control.check_images:
        command.append("--no-image-check")
    return command


def write_config_file(config: RunConfig, run_id: str) -> Path:
    """The effective config as YAML (atomically), which ``--config`` reads back to an equal
    :class:`~benchmark.config.RunConfig`."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    return atomic_write_text(config_file(config, run_id), text)


def _run_torchrun(spec: CellSpec, run: PlannedRun, how: str) -> dict[str, Any]:
    command = torchrun_command(spec, how, write_config_file(spec.config, run.run_id))
    log.info("%s: %s", run.run_id, " ".join(command))
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    config_file(spec.config, run.run_id).unlink(missing_ok=True)
    if result.returncode in (130, 143):  # stopped after a checkpoint: the engine decides, as for one process
        raise RunInterrupted(f"torchrun of {run.run_id} was stopped", result.returncode - 128)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        why = lines[-1][len("error:"):].strip() if lines else f"torchrun exited with status {result.returncode}"
        return _failed(spec, Path(spec.config.output_dir), BenchmarkError(why))
    return {"run_id": run.run_id, "status": "done", "record": str(run.path)}
