"""Numeric precision of the model's forward passes: one setting, ``training.precision``, read here.

=========  ==================================================================================
value      what runs
=========  ==================================================================================
``auto``   ``bf16`` on CUDA, ``fp32`` on every other device (the default; what the harness
           did before the setting existed)
``bf16``   the forward pass under ``torch.autocast`` with ``torch.bfloat16``; the weights,
           gradients and optimizer stay float32
``fp16``   autocast with ``torch.float16``, and the loss scaled by a ``torch.amp.GradScaler``
           (float16's range is too small for small gradients without it)
``fp32``   no autocast
=========  ==================================================================================

The setting applies as named on every device: ``bf16`` or ``fp16`` on the CPU really run CPU
autocast (slower than float32 on most CPUs, but it is how the reduced-precision path is tested
without a GPU); only ``auto`` depends on the device. A run's identity holds the setting and the
device type, which together fix what ran; :func:`resolve` gives the precision itself.

With ``fp16`` the scaler skips an optimizer step whose gradients overflowed and lowers its scale
(``torch/amp/grad_scaler.py``, ``GradScaler.step`` / ``update``); that is its normal way of finding
a scale, not a diverged run: divergence is decided on the loss alone
(:class:`~benchmark.strategy.ContrastiveStrategy`). The scaler reads its overflow flag on the host
once per step (``GradScaler._maybe_opt_step``), so ``fp16`` costs one host-device synchronisation
per step that ``bf16`` does not.

Code that must stay float32 inside autocast (routing keys, key-query scores) switches it off with
:func:`methods.common.precision.full_precision`.
"""

from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS  # the choices, declared with the setting

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: torch.device | str) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what ``precision`` means on ``device`` (``auto`` resolved)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str = "auto"):
    """The context the forward pass runs in: ``torch.autocast`` for ``bf16`` / ``fp16`` on
    ``device``'s type, a no-op context for ``fp32``."""
    resolved = resolve(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[resolved])


def grad_scaler(device: torch.device | str, precision: str = "auto") -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for ``fp16`` (with torch's default initial scale and growth), else None."""
    if resolve(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


__all__ = ["PRECISIONS", "autocast", "grad_scaler", "resolve"]
