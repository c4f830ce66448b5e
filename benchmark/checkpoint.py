"""Checkpoints: everything an interrupted run needs to continue exactly where it stopped.

A run saves ``<output_dir>/checkpoints/<run_id>/checkpoint.pt`` after every task (and, with
``--checkpoint-every N``, every N training steps inside a task; on Ctrl-C / SIGTERM at the next
step). One file holds it all, written atomically (:func:`benchmark.io.atomic_write_with`), so a
crash leaves the previous checkpoint or the new one, never a mix:

* the method's ``state_dict()`` (backbone included: fine-tuning changes it) and the names of
  the parameters that required grad (``after_training_exp`` may have frozen some);
* inside a task: the optimizer and scheduler state, the epoch and step, and the RNG state at
  the start of that epoch (so the resumed run draws the same data order and skips the steps
  already done);
* the state of every random generator Avalanche's ``RNGManager`` manages: Python ``random``,
  NumPy, torch CPU and, when CUDA is in use, every CUDA device (captured by :mod:`benchmark.rng`);
* the progress so far: recall and routing rows, per-query ranks of the last evaluation, train
  times, Avalanche's clock, and what the method's plugins need (below);
* the run id and config hash, so a checkpoint is never used for a different configuration.

The file holds tensors and plain data only (dicts, lists, numbers, strings; :mod:`benchmark.plain`):
it loads with ``torch.load(..., weights_only=True)``, which cannot run code. That is why
Avalanche's own ``save_checkpoint`` is not used here (it pickles the whole strategy with dill);
its ``RNGManager`` is, as the list of generators to save.

Restoring rebuilds the run instead of unpickling it (:mod:`benchmark.run.state`): the runner
builds backbone, method and strategy as for a fresh run, calls the method's
``before_training_exp`` for every completed task (so per-task parameters exist again), loads the
state dict strictly and puts the saved RNG state back. The contract this asks of a method is in
:mod:`benchmark.method` ("Checkpoints").

Plugins: Avalanche's ``ReplayPlugin`` keeps its memory as subsets of earlier experiences, not as
tensors. Its memory is rebuilt by replaying its ``after_training_exp`` for each completed task
with the RNG state saved just before that call in the original run, which draws the same
reservoir sample. Any other plugin of a method is saved through its ``state_dict()`` /
``load_state_dict()`` if it has them; a plugin without them is assumed to carry no state across
tasks (a warning says so once).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointError
from .io import atomic_write_json, atomic_write_with
from .plain import check_plain
from .rng import capture_rng, restore_rng  # noqa: F401 - capture_rng: its import path before benchmark.rng

log = logging.getLogger(__name__)

SCHEMA = "clvl-benchmark/checkpoint/v1"
FILE_NAME = "checkpoint.pt"
SUMMARY_NAME = "summary.json"


def checkpoint_path(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / "checkpoints" / run_id / FILE_NAME


# ============================================================================ file


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (with the schema tag) atomically to ``path``, then a one-line summary
    next to it (``summary.json``, for people and log messages; never used to resume)."""
    state = {"schema": SCHEMA, **state}
    check_plain(state)
    atomic_write_with(path, lambda handle: torch.save(state, handle))
    summary = {"run_id": state.get("run_id"), "config_hash": state.get("config_hash"),
               "where": describe(state, state["task_names"]), "saved": state.get("saved")}
    try:
        atomic_write_json(path.with_name(SUMMARY_NAME), summary)
    except OSError as error:  # the checkpoint itself is safe; the summary only serves messages
        log.warning("could not write %s (%s)", path.with_name(SUMMARY_NAME), error)
    return path


def read_summary(path: Path) -> str | None:
    """"after task 2/3 (shapes), saved 2026-...", from the summary next to a checkpoint; None if unknown."""
    try:
        summary = json.loads(path.with_name(SUMMARY_NAME).read_text(encoding="utf-8"))
        return f"{summary['where']}, saved {summary['saved']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def peek(path: Path) -> dict[str, Any]:
    """A checkpoint's contents without the run check (to say what it was saved for); {} if unreadable."""
    try:
        return load(path, config_hash=None)
    except CheckpointError:
        return {}


def load(path: Path, *, config_hash: str | None) -> dict[str, Any]:
    """Read a checkpoint safely and check that it belongs to the run with ``config_hash``
    (``None``: any run of this harness, for ``--resume-anyway``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only loader met a pickled Python object
        raise CheckpointError(f"checkpoint {path} holds Python objects besides tensors and plain data, which are "
                              "never unpickled (that could run arbitrary code); it was not written by this harness: "
                              f"delete {path.parent} to start that run over") from None
    except Exception as error:  # noqa: BLE001 - any failure to read means "unusable", whatever the cause
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)  # torch colours some messages for terminals
        reason = reason.split(". ")[0]  # torch appends paragraphs of advice; the first sentence is the cause
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); it is damaged or was not written by "
                              f"this harness: delete {path.parent} to start that run over") from None
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise CheckpointError(f"{path} is not a checkpoint of this harness (expected schema {SCHEMA!r}); "
                              f"delete {path.parent} to start that run over")
    if config_hash is not None and state.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} belongs to a different configuration (hash "
                              f"{str(state.get('config_hash'))[:12]}, this run {config_hash[:12]}); "
                              f"delete {path.parent} to start that run over")
    return state


def remove(path: Path) -> None:
    """Delete a run's checkpoint folder (after its record is safely written)."""
    shutil.rmtree(path.parent, ignore_errors=True)


def describe(state: Mapping[str, Any], task_names: list[str]) -> str:
    """Where a checkpoint stands, in words: "after task 2/3 (shapes)" or "in task 3/3 (...), epoch 1, step 5"."""
    T = len(task_names)
    done = int(state["completed_sessions"])
    position = state.get("position")
    if position is None:
        if done == 0:
            return "before the first task"
        return f"after task {done}/{T} ({task_names[done - 1]})"
    return (f"in task {done + 1}/{T} ({task_names[done]}), epoch {position['epoch'] + 1}, "
            f"step {position['iteration']}")


# ============================================================================ method and plugins


def trainable_names(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def restore_module(module: torch.nn.Module, state_dict: Mapping[str, Any], trainable: Iterable[str], what: str) -> None:
    """Strict ``load_state_dict`` with a readable error, then the saved ``requires_grad`` flags."""
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"not in the checkpoint: {few(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"not in the rebuilt {what}: {few(result.unexpected_keys)}")
        raise CheckpointError(f"the rebuilt {what} does not match its checkpoint ({'; '.join(parts)}); its "
                              "before_training_exp must recreate every per-task parameter when replayed for the "
                              "completed tasks (see benchmark/method.py, 'Checkpoints')")
    trainable = set(trainable)
    for name, param in module.named_parameters():
        param.requires_grad_(name in trainable)


def _is_replay(plugin) -> bool:
    from avalanche.training.plugins import ReplayPlugin

    return isinstance(plugin, ReplayPlugin)


_warned: set[type] = set()


def plugin_states(plugins: list) -> dict[str, Any]:
    """``state_dict()`` of every plugin that has one (Avalanche's replay is rebuilt instead)."""
    states = {}
    for index, plugin in enumerate(plugins):
        if _is_replay(plugin):
            continue
        if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)):
            states[f"{index}:{type(plugin).__name__}"] = plugin.state_dict()
        elif type(plugin) not in _warned:
            _warned.add(type(plugin))
            log.warning("plugin %s has no state_dict()/load_state_dict(): it is assumed to keep no state across "
                        "tasks, so a resumed run may differ from an uninterrupted one if it does",
                        type(plugin).__name__)
    return states


def restore_plugins(plugins: list, states: Mapping[str, Any], strategy, experiences: list,
                    replay_rng: list[Mapping[str, Any]]) -> None:
    """Put the plugins back as they were after the completed tasks (see the module docstring)."""
    for index, plugin in enumerate(plugins):
        if _is_replay(plugin):
            for task, rng in enumerate(replay_rng):
                restore_rng(rng)
                strategy.experience = experiences[task]
                plugin.after_training_exp(strategy)
            strategy.experience = None
            continue
        key = f"{index}:{type(plugin).__name__}"
        if key in states:
            plugin.load_state_dict(states[key])

