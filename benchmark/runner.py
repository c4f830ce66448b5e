"""The names ``benchmark.runner`` has always offered; the code lives in :mod:`benchmark.run`.

Kept so that ``from benchmark.runner import run_all, RunControl, plan_runs, ...`` (scripts,
notebooks, tests) goes on working.
"""

from .run.loop import RunExecution, run_all
from .run.planning import PlannedRun, RunControl, check_writable, method_config, plan_runs, run_id
from .record import RANK_BEYOND, RANK_CHARS, RECORD_SCHEMA, encode_ranks, encode_ties, query_set_digest
from .run.runtime import deterministic_mode, resolve_device, seed_everything
from .run.signals import StopSignals

__all__ = ["PlannedRun", "RANK_BEYOND", "RANK_CHARS", "RECORD_SCHEMA", "RunControl", "RunExecution", "StopSignals",
           "check_writable", "deterministic_mode", "encode_ranks", "encode_ties", "method_config", "plan_runs",
           "query_set_digest", "resolve_device", "run_all", "run_id", "seed_everything"]
