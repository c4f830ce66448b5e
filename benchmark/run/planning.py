"""From a run configuration to the runs to do: each (method, seed) with its identity, and what
each needs (start, resume, or nothing), decided before any training.

**Identity and the result cache.** A run's id ends with its config hash, a SHA-256 of the
effective config (method and its hyperparameters, scenario and its options, backbone,
protocol, training settings but the loader's worker count, seed, device type), the code version and the data identity
(:mod:`benchmark.provenance`). A run whose record exists is finished: a rerun of the same grid
skips it and says so, ``force`` reruns it. Changing the code that computes results, the data
files or any setting gives a new id, so a stale record is never taken for a current one.
:class:`RunControl` (how to run: ``force``, ``resume``, ...) never enters the identity.

**Interrupted runs.** A run without a record but with a checkpoint was interrupted. ``resume``
continues it from the checkpoint; ``force`` starts it over; with neither, :func:`triage` stops
the grid before training anything and says which runs could be continued.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import distributed, provenance
from ..config import RunConfig, config_hash, from_mapping
from ..errors import ConfigError, OutputError
from ..io import probe_writable
from ..method import Method, select_methods
from ..scenarios import Scenario
from .runtime import resolve_device

log = logging.getLogger("benchmark.runner")  # the name the harness's log lines have always carried


@dataclasses.dataclass
class RunControl:
    """How to run, as opposed to what: never part of a run's identity."""

    force: bool = False  # rerun runs whose record exists, and start interrupted runs over
    resume: bool = False  # continue interrupted runs from their checkpoints
    keep_checkpoints: bool = False  # keep a finished run's checkpoint (default: deleted once its record is written)
    checkpoint_every: int = 0  # also save a checkpoint every N training steps inside a task (0: after each task only)
    resume_anyway: bool = False  # continue from the checkpoint of an earlier identity (changed data, code, ...)
    check_images: bool = True  # decode every image file once before training (benchmark.data.preflight)
    bad_images: str = "stop"  # stop: list every bad file and stop; skip: leave their items out (counted in the record)
    ddp: bool = False  # one run split over torchrun's processes (benchmark.distributed); the numbers stay the same
    launcher: str = "local"  # local: one run after another in this process; ray: one Ray task per run (benchmark.launch)
    only: frozenset[str] | None = None  # run ids to do (the others of the grid are left alone); None: all


def method_config(method_cls: type[Method], params: dict[str, Any]):
    """Build a method's Config dataclass from YAML/CLI params, rejecting unknown fields and bad values."""
    return from_mapping(method_cls.Config, params, f"method_params.{method_cls.name}",
                        unknown=f"unknown parameter {{key!r}} for method {method_cls.name!r}{{hint}}; "
                                "its parameters are: {known}",
                        invalid=f"bad parameters for method {method_cls.name!r}: {{error}}")


def run_id(method: str, scenario: str, seed: int, digest: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "-", method).strip("-")
    return f"{safe}__{scenario}__seed{seed}__{digest[:8]}"


@dataclasses.dataclass
class PlannedRun:
    method_name: str  # as given (registry name or module:Class)
    method_cls: type[Method]
    params: Any  # the method's Config instance
    seed: int
    digest: str
    run_id: str
    path: Path
    checkpoint: Path
    identity: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # what the digest hashes
    adopt_from: Path | None = None  # --resume-anyway: the checkpoint of an earlier identity to continue from
    adopt_changes: str = ""  # what differs between that earlier identity and this one, in words


def plan_runs(config: RunConfig, scenario: Scenario, backbone: str,
              manifest: dict[str, Any] | None = None) -> list[PlannedRun]:
    """Resolve every (method, seed) into a run with its identity; fails before any training."""
    manifest = manifest if manifest is not None else provenance.data_manifest(scenario)
    data = provenance.data_identity(scenario, manifest)
    weights = provenance.backbone_weights(backbone)
    weights = None if weights is None else [[f["name"], f["sha256"]] for f in weights["files"]]
    planned = []
    classes, method_params = select_methods(config.methods, config.method_params)  # one name per method
    for name in config.methods:
        cls = classes[name]
        params = method_config(cls, {**scenario.method_defaults.get(cls.name, {}), **method_params.get(cls.name, {})})
        if config.protocol.task_identity not in cls.task_identity:
            raise ConfigError(f"method {cls.name!r} supports task identity {sorted(cls.task_identity)}, "
                              f"not {config.protocol.task_identity!r}")
        code = provenance.code_identity(cls)
        for seed in config.seeds:
            identity = {"scenario": scenario.name, "scenario_options": scenario.info.get("options"),
                        "method": cls.name, "method_class": f"{cls.__module__}.{cls.__qualname__}",
                        "method_params": dataclasses.asdict(params), "backbone": backbone,
                        "protocol": dataclasses.asdict(config.protocol), "training": training_identity(config.training),
                        "seed": seed, "device": resolve_device(config.device).type, "code": code, "data": data,
                        "backbone_weights": weights}
            digest = config_hash(identity)
            rid = run_id(cls.name, scenario.name, seed, digest)
            planned.append(PlannedRun(name, cls, params, seed, digest, rid,
                                      Path(config.output_dir) / "runs" / f"{rid}.json",
                                      ckpt.checkpoint_path(config.output_dir, rid), identity))
    return planned


def check_split(planned: list[PlannedRun], config: RunConfig, control: RunControl) -> None:
    """``--ddp``: refuse, before anything trains, what cannot run split over the processes."""
    if control.resume or control.resume_anyway:
        raise ConfigError("--resume and --resume-anyway do not work with --ddp yet; continue the run in one "
                          "process (without --ddp: the same numbers), or start it over with --force --ddp")
    distributed.check_batch_size(config.training.batch_size, distributed.world_size())
    for run in planned:
        refused = distributed.refusal(run.method_cls, run.params)
        if refused is not None:
            raise ConfigError(refused)


def select_runs(planned: list[PlannedRun], only: frozenset[str] | None) -> list[PlannedRun]:
    """The planned runs whose id is in ``only`` (all when None); an id the grid does not plan is an error."""
    if only is None:
        return planned
    unknown = sorted(set(only) - {run.run_id for run in planned})
    if unknown:
        raise ConfigError(f"--only names run id(s) this configuration does not plan: {', '.join(unknown)}; "
                          f"it plans: {', '.join(run.run_id for run in planned)}")
    return [run for run in planned if run.run_id in only]


def training_identity(training) -> dict[str, Any]:
    """The training settings that determine results: all but ``num_workers`` (every item's
    augmentation and the data order are seeded per item, :mod:`benchmark.data.loading`, so
    the number of loader workers changes the speed, never the model)."""
    settings = dataclasses.asdict(training)
    settings.pop("num_workers", None)
    return settings


def check_writable(output_dir: Path) -> None:
    """Fail before any training if results cannot be written where they should go."""
    for folder in (output_dir / "runs", output_dir / "checkpoints"):
        try:
            probe_writable(folder)
        except OSError as error:
            raise OutputError(f"results folder {output_dir} is not writable ({error.strerror or error}: "
                              f"{error.filename or folder}); choose another --output-dir or fix its "
                              "permissions") from None


def triage(planned: list[PlannedRun], control: RunControl) -> dict[str, str]:
    """run id -> "start" | "resume" for the runs that need work; says why the others are skipped."""
    todo: dict[str, str] = {}
    blocked = []
    orphaned: list[tuple[PlannedRun, Path]] = []
    for run in planned:
        has_record, has_checkpoint = run.path.exists(), run.checkpoint.exists()
        if has_record and not control.force:
            log.info("skipping %s: finished already (cached record %s, same config, code and data); "
                     "pass --force to rerun", run.run_id, run.path)
            if has_checkpoint and not control.keep_checkpoints:
                ckpt.remove(run.checkpoint)  # left over from a crash between the record and the clean-up
            continue
        # Past this point there is no record, or --force asks for a new one.
        resume = control.resume or control.resume_anyway  # --resume-anyway also continues a run's own checkpoint
        if has_checkpoint and resume:
            log.info("resuming %s from its checkpoint (%s)", run.run_id, _where(run))
            todo[run.run_id] = "resume"
        elif has_checkpoint and not control.force:
            blocked.append(run)
        else:
            earlier = None if has_checkpoint else _earlier_checkpoint(run, planned)
            if earlier is not None:  # read once: what differs from the identity that checkpoint was saved under
                earlier, saved_identity = earlier
                run.adopt_changes = changed_identity(saved_identity, run)
            if has_checkpoint:
                log.info("starting %s over (--force): its checkpoint (%s) is discarded", run.run_id, _where(run))
                ckpt.remove(run.checkpoint)
            elif earlier is not None and control.resume_anyway and not control.force:
                log.warning("continuing %s from the checkpoint of an earlier identity, %s (%s), as --resume-anyway "
                            "asks: changed %s; the record notes it", run.run_id, earlier.parent.name,
                            ckpt.read_summary(earlier) or "position unknown", run.adopt_changes)
                run.adopt_from = earlier
                todo[run.run_id] = "adopt"
                continue
            elif earlier is not None and control.resume and not control.force:
                orphaned.append((run, earlier))
                continue
            elif earlier is not None:
                log.warning("starting %s; the checkpoint %s of an earlier identity of the same method and seed (changed "
                            "%s) is left as it is: --resume-anyway would continue from it, or delete its folder",
                            run.run_id, earlier, run.adopt_changes)
            elif resume:
                log.info("%s has no checkpoint: starting it", run.run_id)
            todo[run.run_id] = "start"
    if orphaned:
        listed = "; ".join(f"{run.run_id} has none, but {earlier} ({ckpt.read_summary(earlier) or 'position unknown'}) "
                           f"was saved under an earlier identity: changed {run.adopt_changes}"
                           for run, earlier in orphaned)
        raise ConfigError(f"--resume found no checkpoint of this configuration for {len(orphaned)} run(s): {listed}. "
                          "A change of data, code or settings makes a new run: rerun with --resume-anyway to "
                          "continue from the earlier checkpoint anyway (the record notes what changed), or with "
                          "--force to start over (the earlier checkpoint is left; delete its folder when done)")
    if blocked:
        listed = "; ".join(f"{run.run_id} ({_where(run)})" for run in blocked)
        raise ConfigError(f"{len(blocked)} interrupted run(s) can be continued from a checkpoint: {listed}; "
                          "rerun with --resume to continue them, or with --force to start them over")
    return todo


# The parts of a run's identity whose change leaves "the same run, fixed": the data (a bad row
# deleted) and the code (a bug fixed). Other changes (hyperparameters, protocol, training, backbone,
# scenario options) make another run, such as the next point of a sweep in the same folder.
ADOPTABLE_CHANGES = frozenset({"data", "code", "backbone_weights"})


def _earlier_checkpoint(run: PlannedRun, planned: list[PlannedRun]) -> tuple[Path, dict[str, Any]] | None:
    """The newest unfinished checkpoint of this run under an earlier identity, with that identity, if any.

    Run ids are ``<method>__<scenario>__seed<N>__<digest>``; a checkpoint folder with the same
    prefix, another digest, no record, and a saved identity that differs only in
    :data:`ADOPTABLE_CHANGES` is this run before its data or code changed (the typical case: a bad
    row deleted from a caption file after a crash)."""
    prefix = run.run_id.rsplit("__", 1)[0] + "__"
    mine = {other.run_id for other in planned}
    records = run.path.parent
    found = []
    for folder in run.checkpoint.parent.parent.glob(f"{prefix}*"):
        path = folder / ckpt.FILE_NAME
        if folder.name in mine or not path.is_file() or (records / f"{folder.name}.json").exists():
            continue  # a run of this grid, or a finished one whose checkpoint was kept
        saved = ckpt.peek(path)
        identity = saved.get("identity")
        if not isinstance(identity, dict) or saved.get("completed_sessions") == len(saved.get("task_names") or [None]):
            continue  # nothing to tell about it, or nothing left to continue
        if any(identity.get(key) != run.identity.get(key) for key in set(identity) | set(run.identity)
               if key not in ADOPTABLE_CHANGES):
            continue  # other settings (another point of a sweep): a different run, not an earlier one
        found.append((path, identity))
    return max(found, key=lambda entry: entry[0].stat().st_mtime) if found else None


def changed_identity(saved: Any, run: PlannedRun) -> str:
    """Which parts of the run's identity differ from ``saved``, the identity a checkpoint was saved
    under (a short phrase)."""
    if not isinstance(saved, dict) or not saved:
        return "unknown (the checkpoint predates saved identities)"
    parts = []
    for key in sorted(set(saved) | set(run.identity)):
        before, now = saved.get(key), run.identity.get(key)
        if before == now:
            continue
        if key == "data" and isinstance(before, dict) and isinstance(now, dict):
            counts = [f"{a.get('task')}: {a.get('train_images')}/{a.get('test_images')} -> "
                      f"{b.get('train_images')}/{b.get('test_images')} images"
                      for a, b in zip(before.get("counts") or [], now.get("counts") or [])
                      if a != b and isinstance(a, dict) and isinstance(b, dict)]
            parts.append("the data" + (f" ({'; '.join(counts)} train/test)" if counts else " (file contents)"))
        elif isinstance(before, dict) and isinstance(now, dict):
            fields = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            parts.append(f"{key} ({', '.join(fields)})")
        else:
            parts.append(key)
    return ", ".join(parts) or "nothing that is saved"


def _where(run: PlannedRun) -> str:
    return ckpt.read_summary(run.checkpoint) or "position unknown"
