"""Checkpoints: everything an interrupted run needs to continue exactly where it stopped.

A run saves ``<output_dir>/checkpoints/<run_id>/checkpoint.pt`` after every task (and, with
``--checkpoint-every N``, every N training steps inside a task; on Ctrl-C / SIGTERM at the next
step). One file holds it all, written atomically (:func:`benchmark.io.atomic_write_with`), so a
crash leaves the previous checkpoint or the new one, never a mix:

* the method's ``state_dict()`` *without the frozen pretrained backbone* (see "What is left
  out" below) and the names of the parameters that required grad (``after_training_exp`` may
  have frozen some);
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

What is left out: every backbone entry of the state dict that is still exactly the tensor the
method was built with (:class:`FrozenWeights`): the same tensor object, on the same storage,
with the same dtype and shape, and with PyTorch's version counter unchanged. That counter moves
with every in-place write PyTorch knows of (an optimizer step, ``load_state_dict``, ``copy_`` or
``add_`` under ``torch.no_grad()``); a replaced parameter is another object. So fine-tuning saves
the whole backbone, shared LoRA and the prompt methods save only what they added (``per_task``
LoRA's wrapped layers rename their pretrained weights, which are then saved too), and a method that
changes a backbone weight in any ordinary way gets it saved. (The one write PyTorch does not
count is through ``tensor.data``; a method must not write the backbone that way, see
:mod:`benchmark.method`.) For ViT-B/16 that is 572 MiB less per checkpoint for ``lpi``.

The checkpoint keeps the names of the entries it left out and a SHA-256 digest over their
names, dtypes, shapes and bytes (:meth:`FrozenWeights.digest`). Resuming rebuilds the method
(which loads the backbone again), checks that the rebuilt entries have that digest (else a
:class:`~benchmark.errors.CheckpointError`: the backbone's weights changed since the checkpoint)
and loads the saved entries. Checkpoints of schema v1, which hold the whole state dict, still
load: they simply leave nothing out.

Plugins: Avalanche's ``ReplayPlugin`` keeps its memory as subsets of earlier experiences, not as
tensors. Its memory is rebuilt by replaying its ``after_training_exp`` for each completed task
with the RNG state saved just before that call in the original run, which draws the same
reservoir sample. Any other plugin of a method is saved through its ``state_dict()`` /
``load_state_dict()`` if it has them; a plugin without them is assumed to carry no state across
tasks (a warning says so once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointError
from .io import atomic_write_json, atomic_write_with
from .plain import check_plain
from .rng import capture_rng, restore_rng  # noqa: F401 - capture_rng: its import path before benchmark.rng

log = logging.getLogger(__name__)

SCHEMA = "clvl-benchmark/checkpoint/v2"  # v2: the frozen backbone is left out (``frozen``)
READABLE_SCHEMAS = (SCHEMA, "clvl-benchmark/checkpoint/v1")  # v1: the whole state dict
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
    if not isinstance(state, dict) or state.get("schema") not in READABLE_SCHEMAS:
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


# ============================================================================ the frozen backbone


def _storage_of(tensor: torch.Tensor) -> tuple:
    """Where a tensor's values live and how they are read: a write that replaces them changes this."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of one state-dict entry: its name, dtype, shape and the bytes of its values."""
    digest = hashlib.sha256()
    digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    values = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


class FrozenWeights:
    """The backbone entries of a method's state dict that are still exactly as the method was
    built, which a checkpoint leaves out (see "What is left out" in the module docstring).

    Made right after the method is built and moved to its device (before it trains); it keeps
    weak references only, so it holds no second copy of the backbone. Digests are computed once
    per entry, the first time a checkpoint or a resume needs them, and reused while the entry
    stays unchanged (so a run of ViT-B/16 hashes its 572 MiB once, not at every save).
    """

    PREFIX = "backbone."  # the method's backbone attribute (benchmark.method.Method.backbone)

    def __init__(self, module: torch.nn.Module):
        self._built: dict[str, tuple[weakref.ref, int, tuple]] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name.startswith(self.PREFIX) and isinstance(tensor, torch.Tensor):
                self._built[name] = (weakref.ref(tensor), tensor._version, _storage_of(tensor))
        self._digests: dict[str, str] = {}

    def unchanged(self, name: str, tensor: Any) -> bool:
        """Is this entry still the backbone tensor the method was built with, never written to?"""
        built = self._built.get(name)
        if built is None or not isinstance(tensor, torch.Tensor):
            return False
        ref, version, storage = built
        return ref() is tensor and tensor._version == version and _storage_of(tensor) == storage

    def split(self, module: torch.nn.Module) -> tuple[dict[str, Any], list[str]]:
        """``(entries to save, names left out)`` of ``module``'s state dict, in its order."""
        saved, left_out = {}, []
        for name, value in module.state_dict(keep_vars=True).items():
            if self.unchanged(name, value):
                left_out.append(name)
            else:
                saved[name] = value.detach() if isinstance(value, torch.Tensor) else value
        return saved, left_out

    def digest(self, module: torch.nn.Module, names: Iterable[str]) -> str:
        """SHA-256 over the per-entry digests (:func:`tensor_digest`) of ``names``, in order."""
        entries = module.state_dict(keep_vars=True)
        combined = hashlib.sha256()
        for name in names:
            tensor = entries[name]
            known = self._digests.get(name) if self.unchanged(name, tensor) else None
            if known is None:
                known = tensor_digest(name, tensor)
                if self.unchanged(name, tensor):
                    self._digests[name] = known
            combined.update(f"{name}\0{known}\0".encode())
        return combined.hexdigest()

    def payload(self, module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(method_state, frozen)`` for a checkpoint: what to save, and the record of what was not."""
        saved, left_out = self.split(module)
        return saved, {"names": left_out, "digest": self.digest(module, left_out)}


def check_frozen(saved: Mapping[str, Any], module: torch.nn.Module, frozen: FrozenWeights | None,
                 where: str) -> list[str]:
    """Check that a rebuilt ``module`` has the backbone entries the checkpoint ``saved`` left out,
    with the same digest; return their names ([] for a checkpoint that saved everything)."""
    record = saved.get("frozen")
    if not record or not record.get("names"):
        return []
    names = list(record["names"])
    present = module.state_dict(keep_vars=True)
    absent = [name for name in names if name not in present]
    if absent:
        raise CheckpointError(f"checkpoint {where} leaves out backbone weights the rebuilt method does not have "
                              f"({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}); it was saved with "
                              "another backbone: start the run over with --force")
    if (frozen or FrozenWeights(module)).digest(module, names) != record["digest"]:
        raise CheckpointError(f"the backbone's weights changed since checkpoint {where} was saved (it keeps only "
                              "what training changed, and the digest of the rest differs): put the original "
                              "weights back to continue it, or start the run over with --force")
    return names


def measure_save(method: torch.nn.Module, folder: str | Path | None = None, *, repeats: int = 3) -> dict[str, Any]:
    """Size and save time of a method's checkpoint state, whole and without the frozen backbone.

    For ``python -m benchmark bench``: writes ``method.state_dict()`` (what checkpoints held before
    schema v2) and the slim state (:class:`FrozenWeights` built on ``method`` as it is now, so call
    it on a method whose trainable parts are as training leaves them, e.g. after
    ``before_training_exp``) ``repeats`` times each with :func:`save`'s atomic write (fsync
    included) under ``folder`` (a temporary folder by default, removed afterwards). The save time
    includes copying the tensors to the CPU; the slim one also the digest, computed once (as a
    run does at its first save) and reported separately as ``digest_s``.

    Returns ``{"full": {"bytes", "save_s"}, "slim": {"bytes", "save_s"}, "digest_s",
    "entries_saved", "entries_left_out", "ratio_bytes", "ratio_save_s"}``; ``save_s`` is the
    median over the repeats, ratios are full / slim.
    """
    def timed(make_state) -> tuple[int, float]:
        times, size = [], 0
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            state = make_state()
            cpu = {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            path = atomic_write_with(target, lambda handle: torch.save(cpu, handle))
            times.append(time.perf_counter() - start)
            size = path.stat().st_size
        return size, sorted(times)[len(times) // 2]

    frozen = FrozenWeights(method)
    start = time.perf_counter()
    _, left_out = frozen.split(method)
    frozen.digest(method, left_out)  # the one-off hash a run pays at its first checkpoint
    digest_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        target = Path(scratch) / FILE_NAME
        full_bytes, full_s = timed(method.state_dict)
        slim_bytes, slim_s = timed(lambda: frozen.payload(method)[0])
    saved = len(method.state_dict()) - len(left_out)
    return {"full": {"bytes": full_bytes, "save_s": full_s}, "slim": {"bytes": slim_bytes, "save_s": slim_s},
            "digest_s": digest_s, "entries_saved": saved, "entries_left_out": len(left_out),
            "ratio_bytes": full_bytes / max(slim_bytes, 1), "ratio_save_s": full_s / max(slim_s, 1e-12)}


# ============================================================================ method and plugins


def trainable_names(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def restore_module(module: torch.nn.Module, state_dict: Mapping[str, Any], trainable: Iterable[str], what: str,
                   left_out: Iterable[str] = ()) -> None:
    """Strict ``load_state_dict`` with a readable error, then the saved ``requires_grad`` flags.

    ``left_out``: the entries the checkpoint did not save because they are the frozen backbone
    as built (checked by :func:`check_frozen` first); they are the only keys allowed to be missing."""
    result = module.load_state_dict(state_dict, strict=False)
    left_out = set(left_out)
    result.missing_keys[:] = [key for key in result.missing_keys if key not in left_out]
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

