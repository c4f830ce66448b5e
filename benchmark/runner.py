"""Run methods x seeds on one scenario and write one record per run.

For each method and seed: seed every RNG, load a fresh backbone, build the method, train it
task by task through :class:`~benchmark.strategy.ContrastiveStrategy`, evaluate after every
session (:mod:`benchmark.evaluation`), and write the run record atomically to
``<output_dir>/runs/<run_id>.json``. A run whose record exists already is skipped unless
``force`` is set. At the end the tables and figures are rebuilt from all records.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import random
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from methods import get_method
from methods.base import Method

from . import provenance
from .backbone import default_cache_dir, load_backbone
from .config import RunConfig, coerce_to_fields, config_hash
from .errors import ConfigError
from .evaluation import DIRECTIONS, KS, evaluate_session
from .io import atomic_write_json
from .scenarios import Scenario, build_scenario
from .scenarios.streams import Streams, make_streams
from .strategy import ContrastiveStrategy

log = logging.getLogger(__name__)
RECORD_SCHEMA = "clvl-benchmark/run-record/v1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def method_config(method_cls: type[Method], params: dict[str, Any]):
    """Build a method's Config dataclass from YAML/CLI params, rejecting unknown fields."""
    known = {f.name for f in dataclasses.fields(method_cls.Config)}
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown parameter {key!r} for method {method_cls.name!r}{hint}; "
                              f"its parameters are: {', '.join(sorted(known)) or 'none'}")
    params = coerce_to_fields(method_cls.Config, params, f"method_params.{method_cls.name}")
    try:
        return method_cls.Config(**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad parameters for method {method_cls.name!r}: {error}") from None


def run_id(method: str, scenario: str, seed: int, digest: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "-", method).strip("-")
    return f"{safe}__{scenario}__seed{seed}__{digest[:8]}"


class _Progress(SupervisedPlugin):
    """A progress bar per task: iterations, with the running loss."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar = label, None

    def before_training_exp(self, strategy, **kwargs):
        total = len(strategy.dataloader) * strategy.train_epochs
        task = strategy.task_names[strategy.experience.current_experience]
        self.bar = tqdm(total=total, desc=f"{self.label} | train {task}", unit="step", leave=False)

    def after_training_iteration(self, strategy, **kwargs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{strategy.last_train_loss:.3f}", refresh=False)

    def after_training_exp(self, strategy, **kwargs):
        self.bar.close()


@dataclasses.dataclass
class PlannedRun:
    method_name: str  # as given (registry name or module:Class)
    method_cls: type[Method]
    params: Any  # the method's Config instance
    seed: int
    digest: str
    run_id: str
    path: Path


def plan_runs(config: RunConfig, scenario: Scenario, backbone: str) -> list[PlannedRun]:
    """Resolve every (method, seed) into a run with its identity; fails before any training."""
    planned = []
    for name in config.methods:
        cls = get_method(name)
        params = method_config(cls, {**scenario.method_defaults.get(cls.name, {}), **config.method_params.get(name, {})})
        if config.protocol.task_identity not in cls.task_identity:
            raise ConfigError(f"method {cls.name!r} supports task identity {sorted(cls.task_identity)}, "
                              f"not {config.protocol.task_identity!r}")
        for seed in config.seeds:
            identity = {"scenario": scenario.name, "scenario_options": scenario.info.get("options"),
                        "method": cls.name, "method_class": f"{cls.__module__}.{cls.__qualname__}",
                        "method_params": dataclasses.asdict(params), "backbone": backbone,
                        "protocol": dataclasses.asdict(config.protocol), "training": dataclasses.asdict(config.training),
                        "seed": seed, "device": resolve_device(config.device).type}
            digest = config_hash(identity)
            rid = run_id(cls.name, scenario.name, seed, digest)
            planned.append(PlannedRun(name, cls, params, seed, digest, rid,
                                      Path(config.output_dir) / "runs" / f"{rid}.json"))
    return planned


def run_all(config: RunConfig) -> list[Path]:
    """Run every planned (method, seed) and return the record paths (existing ones included)."""
    scenario = build_scenario(config.scenario, config.scenario_options, config.data_root)
    backbone_name = config.backbone or scenario.default_backbone
    planned = plan_runs(config, scenario, backbone_name)
    device = resolve_device(config.device)
    log.info("scenario %s: %d tasks (%s); backbone %s; device %s; %d run(s)", scenario.name, scenario.num_tasks,
             ", ".join(scenario.task_names), backbone_name, device, len(planned))
    paths = []
    for run in planned:
        if run.path.exists() and not config.force:
            log.info("skipping %s: its record exists (%s); pass --force to rerun", run.run_id, run.path)
        else:
            record = execute(run, config, scenario, backbone_name, device)
            atomic_write_json(run.path, record)
            log.info("wrote %s", run.path)
        paths.append(run.path)
    return paths


def execute(run: PlannedRun, config: RunConfig, scenario: Scenario, backbone_name: str,
            device: torch.device) -> dict[str, Any]:
    """Train and evaluate one (method, seed); return its run record."""
    started = time.perf_counter()
    seed_everything(run.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    backbone = load_backbone(backbone_name, cache_dir=cache_dir, device=str(device))
    streams: Streams = make_streams(scenario, backbone)
    seed_everything(run.seed)  # building the backbone may have drawn random numbers
    try:
        method = run.method_cls(backbone, run.params, scenario.num_tasks).to(device)
    except ValueError as error:
        raise ConfigError(f"method {run.method_cls.name!r}: {error}") from None
    protocol = config.protocol_object()
    label = f"{run.method_cls.name} seed {run.seed}"
    strategy = ContrastiveStrategy(
        method=method, train_epochs=config.training.epochs, train_mb_size=config.training.batch_size,
        eval_mb_size=config.training.eval_batch_size, device=device, task_names=scenario.task_names,
        plugins=[*method.plugins(), _Progress(label)], num_workers=config.training.num_workers)

    T = scenario.num_tasks
    recall = {d: {k: [[None] * T for _ in range(T)] for k in KS} for d in DIRECTIONS}
    routing: dict[str, list] | None = None

    def evaluate(session: int):
        return evaluate_session(method, streams.galleries, session, protocol,
                                batch_size=config.training.eval_batch_size, device=device)

    initial = evaluate(-1).recall if protocol.tasks == "all" else None
    train_times = []
    for session, experience in enumerate(tqdm(streams.train_stream, desc=label, unit="task", leave=False)):
        tick = time.perf_counter()
        if method.trains:
            strategy.train(experience)
        train_times.append(time.perf_counter() - tick)
        result = evaluate(session)
        row = result.recall
        for d in DIRECTIONS:
            for k in KS:
                recall[d][k][session] = row[d][k]
        if result.routing is not None:
            routing = routing or {m: [[None] * T for _ in range(T)] for m in ("image", "text")}
            for modality in ("image", "text"):
                routing[modality][session] = result.routing[modality]
        log.info("%s | after %s: R@1 i2t %s | t2i %s", label, scenario.task_names[session],
                 _fmt(row["i2t"][1]), _fmt(row["t2i"][1]))

    peak, peak_kind = provenance.peak_memory_mb(device)
    counts = method.parameter_counts()
    effective = config.to_dict()
    effective["backbone"] = backbone_name
    effective["method_params"] = {run.method_name: dataclasses.asdict(run.params)}
    effective["methods"] = [run.method_name]
    effective["seeds"] = [run.seed]
    return {
        "schema": RECORD_SCHEMA,
        "run_id": run.run_id,
        "method": run.method_cls.name,
        "scenario": scenario.name,
        "seed": run.seed,
        "config": effective,
        "config_hash": run.digest,
        "protocol": dataclasses.asdict(config.protocol),
        "tasks": list(scenario.task_names),
        "task_counts": scenario.counts(),
        "scenario_info": scenario.info,
        "recall": {d: {str(k): recall[d][k] for k in KS} for d in DIRECTIONS},
        "recall_initial": None if initial is None else {d: {str(k): initial[d][k] for k in KS} for d in DIRECTIONS},
        "routing_accuracy": routing,
        "costs": {"trainable_params": counts["trainable"], "total_params": counts["total"],
                  "backbone_params": counts["backbone"], "added_params": counts["added"],
                  "params_per_task": counts.get("per_task"), "params_shared": counts.get("shared"),
                  "forward_passes_per_query": run.method_cls.forward_passes,
                  "wall_time_s": time.perf_counter() - started, "train_time_s_per_task": train_times,
                  "peak_memory_mb": peak, "peak_memory_kind": peak_kind},
        "provenance": provenance.provenance(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.1f}" for v in values)
