"""Where the runs of a grid execute: the *launcher* (``run --launcher local|ray``).

A grid is every (method, seed) of one configuration (:mod:`benchmark.run.planning`); each of
its runs is a *cell*. Two launchers run the cells, and both end in the same files:

* ``local`` (the default): :func:`benchmark.run.run_all`, one cell after another in this
  process. Ray is never imported.
* ``ray``: :mod:`benchmark.launch.ray_grid`. This process is the *driver*: it plans and triages
  the grid as ``local`` does (finished cells are skipped unless ``--force``), then submits each
  cell that needs work as a Ray task with the CPUs and GPUs of the config's ``launcher``
  section, shows done / running / failed, and returns once every cell has ended. Each task calls
  :func:`benchmark.launch.cell.run_cell`, which runs the one cell with the same code as
  ``local`` and writes only that cell's files.

What a failed cell does differs: under ``local`` the first failure stops the grid (as it always
has); under ``ray`` the cell leaves ``runs/<run_id>.error.json``, the other cells finish, and
:class:`GridOutcome` lists the failure (the command line then exits with status 4,
:class:`benchmark.errors.CellsFailed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from ..run.planning import RunControl

LAUNCHERS = ("local", "ray")


@dataclasses.dataclass
class CellFailure:
    """A cell that ended without its record: which run, why (one line), and its error record."""

    run_id: str
    message: str
    error_file: Path


@dataclasses.dataclass
class GridOutcome:
    """How a grid ended: the record of every finished cell (existing ones included), the failed
    cells, and (``ray``) how many cells were submitted as tasks: 0 when every record existed;
    None under ``local``, which submits nothing."""

    paths: list[Path]
    failures: list[CellFailure] = dataclasses.field(default_factory=list)
    submitted: int | None = None

    def failure_message(self) -> str:
        listed = "; ".join(f"{failure.run_id}: {failure.message}" for failure in self.failures)
        total = len(self.paths) + len(self.failures)
        return (f"{len(self.failures)} of {total} run(s) failed: {listed} (each left runs/<run_id>.error.json and its "
                "log runs/<run_id>.log; the other runs are saved, and a rerun of the same command runs only the "
                "failed ones)")


def run_grid(config: RunConfig, control: RunControl) -> GridOutcome:
    """Run the grid with ``control.launcher``; Ray is imported only for ``ray``."""
    if control.launcher == "local":
        from ..run import run_all

        paths = run_all(config, control)
        return GridOutcome(paths)
    if control.launcher == "ray":
        from .ray_grid import run_on_ray

        return run_on_ray(config, control)
    raise ConfigError(f"unknown launcher {control.launcher!r}; choose from {', '.join(LAUNCHERS)}")


__all__ = ["LAUNCHERS", "CellFailure", "GridOutcome", "run_grid"]
