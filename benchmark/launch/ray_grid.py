"""``run --launcher ray``: the grid's cells as Ray tasks, on one machine or a cluster.

This process is the driver. :func:`run_on_ray` plans and triages the grid exactly as the local
launcher does (:func:`benchmark.run.loop.prepare`, :func:`benchmark.run.planning.triage`: a cell
whose record exists is skipped unless ``--force``; an interrupted one without ``--resume`` or
``--force`` stops the grid before anything is submitted). When no cell needs work, Ray is not
even started. Otherwise it joins the cluster named by ``RAY_ADDRESS`` (or one this process
already joined), else starts a local one sized to this machine (its CPUs and CUDA devices), and
submits one task per cell (:func:`benchmark.launch.cell.run_cell`) with
``num_cpus=launcher.cpus_per_cell`` and ``num_gpus`` = :func:`cell_gpus`.

**Retries** follow Ray's task fault tolerance (docs.ray.io, ray-core/fault_tolerance/tasks):
``max_retries`` counts *system* failures (the worker process or its node died: OOM-kill,
preemption, ``os._exit``), and ``retry_exceptions=False`` leaves Python exceptions alone. A cell
catches its own exceptions and writes an error record (deterministic, so never retried); a
retried cell finds its checkpoint and resumes. A cell stopped by SIGTERM after saving a
checkpoint ends its worker process, which Ray counts as a system failure: the retry resumes.
After :data:`MAX_RETRIES` retries the driver writes the cell's error record itself.

**Workers** import the harness from their own installation (the same environment on every
node: a shared venv, the same container image); what the driver added to its import path
(the working folder, a ``PYTHONPATH`` entry holding an out-of-tree method) is passed on as the
task's ``PYTHONPATH`` (:func:`worker_environment`), with the harness's environment variables
(offline switches, cache and data folders). Workers read relative paths against the driver's
working folder, so on a cluster run the driver from shared storage. A cell's log lines go to
its ``runs/<run_id>.log`` as under the local launcher; Ray's own worker logs stay in Ray's
session folder (``log_to_driver=False``), so the console shows the driver's progress bar only.

Ray is imported only here, and only when ``--launcher ray`` is asked for (an optional extra:
``pip install 'clvl-benchmark[ray]'``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import RunConfig
from ..errors import ConfigError, RunInterrupted, one_line
from ..run.loop import prepare, remove_empty_checkpoints_folder
from ..run.planning import RunControl, triage
from . import CellFailure, GridOutcome
from .cell import CellSpec, error_file, run_cell, write_error_record

log = logging.getLogger("benchmark.launch")

INSTALL_HINT = "`--launcher ray` needs Ray: pip install 'clvl-benchmark[ray]' (or -e '.[ray]')"
MAX_RETRIES = 3  # Ray's default for tasks, stated so that the docs and the code say the same
# Passed on to every worker: what decides where the harness finds data and weights, and offline mode.
FORWARDED_ENV = ("CLVL_CACHE", "CLVL_DATA_ROOT", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME")


def import_ray():
    """The ``ray`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def run_on_ray(config: RunConfig, control: RunControl) -> GridOutcome:
    """Run the grid's cells as Ray tasks and wait for all of them (see the module docstring)."""
    ray = import_ray()
    _check_device(config)
    grid = prepare(config, control)
    todo = triage(grid.planned, control)
    paths = [run.path for run in grid.planned if run.run_id not in todo]
    log.info("scenario %s: %d tasks; backbone %s; %d run(s), %d to submit to Ray", grid.scenario.name,
             grid.scenario.num_tasks, grid.backbone_name, len(grid.planned), len(todo))
    if not todo:
        return GridOutcome(paths, submitted=0)
    connection = connect(ray)
    try:
        cluster = ray.cluster_resources()
        gpus, cpus = cell_gpus(config, cluster), config.launcher.cpus_per_cell
        if connection == "started":  # a local cluster does not grow: a cell larger than it would wait forever
            _check_fits(cluster, cpus, gpus)
        if gpus > 1:
            _check_ddp()
        task = ray.remote(_cell_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES,
                                              retry_exceptions=False, runtime_env=worker_environment())
        submitted = {}
        for run in grid.planned:
            if run.run_id in todo:
                spec = CellSpec.of(config, run, todo[run.run_id], control, gpus=gpus)
                submitted[task.remote(spec)] = spec
        outcome = _wait(ray, submitted, cpus)
    finally:
        if connection is not None:  # stops a cluster started here; only disconnects from a joined one
            ray.shutdown()
    remove_empty_checkpoints_folder(config)
    finished = {spec.run_id for spec, _ in outcome.done}
    paths = [run.path for run in grid.planned if run.run_id not in todo or run.run_id in finished]
    return GridOutcome(paths, outcome.failures, submitted=len(submitted))


def connect(ray) -> str | None:
    """Use this process's Ray connection if it has one (None: it is not ours to close), else join
    ``RAY_ADDRESS``'s cluster ("joined"), else start a local one sized to this machine
    ("started"); :func:`run_on_ray` disconnects from what it joined and stops what it started."""
    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # ray.init reads RAY_ADDRESS itself
        return "joined"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is reported to Ray's servers unless asked
    import torch

    ray.init(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False)
    return "started"


def cell_gpus(config: RunConfig, cluster: dict[str, float]) -> int:
    """GPUs per cell: ``launcher.gpus_per_cell``, or (null) 1 when the cluster has a GPU and
    ``device`` is not ``cpu``, else 0."""
    if config.launcher.gpus_per_cell is not None:
        return config.launcher.gpus_per_cell
    return 1 if cluster.get("GPU", 0) >= 1 and config.device != "cpu" else 0


def worker_environment() -> dict[str, Any]:
    """The tasks' runtime environment: ``PYTHONPATH`` = the folders the driver imports from
    beyond its Python installation (``''`` read as the working folder), then the forwarded
    variables; progress bars off in workers (``TQDM_DISABLE``: nobody watches them)."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    folders = []
    for entry in sys.path:
        folder = os.path.realpath(entry or os.getcwd())
        if os.path.isdir(folder) and not any(folder == p or folder.startswith(p + os.sep) for p in installed):
            folders.append(folder)
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["TQDM_DISABLE"] = "1"
    if folders:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(folders))
    return {"env_vars": env}


def _cell_task(spec: CellSpec) -> dict[str, Any]:
    """The Ray task: one cell. A cell stopped after saving a checkpoint (SIGTERM: a node being
    drained, a pod evicted) ends its worker, a system failure that Ray retries from the checkpoint."""
    try:
        return run_cell(spec)
    except RunInterrupted as stopped:
        os._exit(stopped.exit_code)


class _Outcome:
    """The cells that ended so far: finished (with their record) and failed."""

    def __init__(self):
        self.done: list[tuple[CellSpec, Path]] = []
        self.failures: list[CellFailure] = []


def _wait(ray, submitted: dict, cpus_per_cell: int) -> _Outcome:
    """Collect the cells as they end, with a bar of done / running / failed; on Ctrl-C cancel the rest."""
    outcome = _Outcome()
    pending = list(submitted)
    with logging_redirect_tqdm(tqdm_class=tqdm), tqdm(total=len(pending), desc="grid", unit="run") as bar:
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    _collect(ray, ref, submitted[ref], outcome)
                bar.set_postfix(done=len(outcome.done), running=_running(ray, len(pending), cpus_per_cell),
                                failed=len(outcome.failures), refresh=not ready)
                bar.update(len(ready))  # the count and the figures change together
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)
            raise
    return outcome


def _collect(ray, ref, spec: CellSpec, outcome: _Outcome) -> None:
    output_dir = Path(spec.config.output_dir)
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as error:  # the cell could not report: its worker kept dying, or it was cancelled
        if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
            why = (f"its worker died {MAX_RETRIES + 1} times ({type(error).__name__}: out of memory, killed, or its "
                   "node lost); Ray's worker logs (in its session folder) say why")
        else:
            why = f"Ray could not run it: {one_line(error)}"
        path = write_error_record(output_dir, spec, why, error_type=type(error).__name__)
        result = {"run_id": spec.run_id, "status": "failed", "error": why, "error_file": str(path)}
    if result["status"] == "failed":
        log.error("%s failed: %s", spec.run_id, result["error"])
        outcome.failures.append(CellFailure(spec.run_id, result["error"],
                                            Path(result.get("error_file") or error_file(output_dir, spec.run_id))))
    else:
        log.info("%s %s", spec.run_id, "finished" if result["status"] == "done" else "was finished already")
        outcome.done.append((spec, Path(result["record"])))


def _running(ray, pending: int, cpus_per_cell: int) -> int:
    """Cells running now: the CPUs the cluster has handed out, in cells (other jobs on a shared
    cluster count too, so it is capped at the cells still pending)."""
    try:
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    except Exception:  # a progress figure must never stop the grid
        return 0
    return min(pending, int(round(total - free)) // max(cpus_per_cell, 1))


def _check_device(config: RunConfig) -> None:
    if config.device.startswith("cuda:"):
        raise ConfigError(f"device {config.device!r} picks a GPU by number, but under --launcher ray Ray gives each "
                          "cell its GPUs (CUDA_VISIBLE_DEVICES): use device auto or cuda")


def _check_ddp() -> None:
    """A cell of several GPUs runs ``run --ddp`` under torchrun: refuse it where ``run`` has no ``--ddp``."""
    import argparse

    from ..cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "--ddp" not in sub.choices["run"].format_help():
        raise ConfigError("launcher.gpus_per_cell above 1 splits each run over its GPUs with `run --ddp`, which this "
                          "version of the harness does not have: set launcher.gpus_per_cell to 1 (or null)")


def _check_fits(cluster: dict[str, float], cpus: int, gpus: int) -> None:
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus > have_cpus or gpus > have_gpus:
        raise ConfigError(f"a cell asks for {cpus} CPU(s) and {gpus} GPU(s) (launcher.cpus_per_cell, "
                          f"launcher.gpus_per_cell) but this machine has {have_cpus:g} and {have_gpus:g}: lower them")
