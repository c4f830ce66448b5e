"""Running a grid of (method, seed) runs on one scenario: config -> plan -> run -> record.

One job per module:

* :mod:`~benchmark.run.planning` — each run's identity (run id, config hash) and what it needs
  (start, resume, nothing), decided before any training; :class:`RunControl`, how to run;
* :mod:`~benchmark.run.runtime` — device, seeding, deterministic kernels;
* :mod:`~benchmark.run.factory` — backbone, method, streams and strategy, built the one way
  (also for :mod:`benchmark.testing`);
* :mod:`~benchmark.run.loop` — the train -> evaluate loop of one run and the grid
  (:func:`run_all` = ``prepare`` + ``triage`` + ``run_one`` per run), which writes the records
  (:mod:`benchmark.launch` runs the same ``run_one`` as Ray tasks);
* :mod:`~benchmark.run.state` — what a run has produced so far and its checkpoint payload;
* :mod:`~benchmark.run.signals` — Ctrl-C / SIGTERM as a request to stop at a safe point;
* :mod:`~benchmark.run.progress` — progress bars.

The record a run writes is :mod:`benchmark.record`'s.
"""

from .loop import RunExecution, run_all
from .planning import PlannedRun, RunControl, check_writable, method_config, plan_runs, run_id, triage
from .runtime import deterministic_mode, resolve_device, seed_everything
from .signals import StopSignals

__all__ = ["PlannedRun", "RunControl", "RunExecution", "StopSignals", "check_writable", "deterministic_mode",
           "method_config", "plan_runs", "resolve_device", "run_all", "run_id", "seed_everything", "triage"]
