"""How every figure of the bench is timed: warm-up calls first (not counted), then repeats, the
median of the repeats reported.

Variants that are compared with each other (open_clip against the harness's hooks, say) are
timed *interleaved*: repeat 1 of A, repeat 1 of B, repeat 2 of A, ... so that a machine that
gets busier or cooler during the bench shifts both alike and their ratio stays fair. A ratio is
always the quotient of two medians measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .device import synchronize


@dataclass
class Timing:
    """Seconds per call of one variant: the median over repeats, and every repeat."""

    median_s: float
    repeats_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"median_s": self.median_s, "repeats_s": self.repeats_s}


def time_calls(fn: Callable[[], object], device: torch.device, number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def interleaved(variants: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, repeats: int,
                number: int = 1, tick: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each variant ``repeats`` times (``number`` calls each), in turn, after ``warmup``
    untimed calls of each; ``tick`` is called after every timed repeat of a variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_calls(fn, device, number))
            if tick is not None:
                tick()
    return {name: Timing(statistics.median(values), values) for name, values in times.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is unknown or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
