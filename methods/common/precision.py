"""Full-precision islands inside the harness's bf16 autocast (written once).

On CUDA the harness runs the training forward pass and evaluation under bf16 autocast. The
key-query scoring of L2P, DualPrompt and CODA-Prompt and the K-means routing of S-Prompts, LPI
and LoRA's ``per_task`` mode must not follow it: their keys are fitted (K-means) or compared in
float32, and a bf16 matmul keeps only 8 bits of mantissa, so near-ties between keys are decided
by rounding (a CPU-autocast check flipped 3 of 256 top-5 sets). :func:`full_precision` switches
autocast off for the device a tensor lives on, so that what runs inside sees float32 inputs and
computes in float32 — exactly what it computes without autocast.
"""

from __future__ import annotations

import torch


def full_precision(device: torch.device | str) -> torch.autocast:
    """A context manager with autocast disabled on ``device``'s type (``cuda``, ``cpu``, ...)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, enabled=False)


__all__ = ["full_precision"]
