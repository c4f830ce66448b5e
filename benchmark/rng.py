"""The state of every random generator a run draws from, captured and put back exactly.

The generators are those Avalanche's ``RNGManager`` manages: Python ``random``, NumPy, torch
CPU and, when CUDA is in use, every CUDA device (plus any a user registered there). A captured
state is tensors and plain data (:mod:`benchmark.plain`), so it can go into a checkpoint as is.
The training loop (:mod:`benchmark.strategy`) captures it at the start of every epoch and before
the plugins' ``after_training_exp``; resuming (:mod:`benchmark.checkpoint`) puts it back.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from .plain import check_plain

log = logging.getLogger("benchmark.checkpoint")  # the name these messages had before this module split off


def _generators() -> Mapping[str, dict]:
    from avalanche.training.determinism.rng_manager import RNGManager

    return RNGManager.random_generators


def capture_rng() -> dict[str, Any]:
    """The state of every managed generator, as tensors and plain data."""
    states: dict[str, Any] = {}
    for name, generator in _generators().items():
        if name == "torch.cuda" and not torch.cuda.is_initialized():
            # Reading it would create a CUDA context on a CPU run; an unused CUDA generator is
            # still where the run's seeding left it, which a resumed run re-creates anyway.
            continue
        states[name] = _encode(name, generator["save_state"]())
    return states


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put every generator saved by :func:`capture_rng` back in that state."""
    generators = _generators()
    for name, state in states.items():
        if name not in generators:
            log.warning("checkpoint has the state of a random generator %r that is not registered now; ignored", name)
            continue
        generators[name]["load_state"](_decode(name, state))


def _encode(name: str, state: Any) -> Any:
    if name == "random":  # (version, 625 ints, gauss_next)
        version, internal, gauss_next = state
        return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}
    if name == "numpy":  # ("MT19937", uint32[624], pos, has_gauss, cached_gaussian)
        kind, key, pos, has_gauss, cached = state
        return {"kind": kind, "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if name == "torch":
        return state.clone()
    if name == "torch.cuda":
        return [s.clone() for s in state]
    check_plain(state, f"random generator {name!r}")  # a generator a user registered
    return state


def _decode(name: str, state: Any) -> Any:
    if name == "random":
        return state["version"], tuple(int(v) for v in state["state"].tolist()), state["gauss_next"]
    if name == "numpy":
        return (state["kind"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                state["cached_gaussian"])
    return state
