"""Zero-shot: the pretrained backbone, never trained.

The lower reference of every table: what CLIP retrieves before any continual learning. Its
recall on a task does not change across sessions except through the protocol (with a ``union``
gallery, later tasks' items join the gallery and can push true matches down).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import Method, MethodConfig


@dataclass
class ZeroShotConfig(MethodConfig):
    """No hyperparameters: the model is never trained."""


class ZeroShot(Method):
    name = "zeroshot"
    Config = ZeroShotConfig
    trains = False
    summary = "the frozen pretrained backbone (no training)"
    supports_ddp = True  # nothing trains: --ddp only shards the evaluation
