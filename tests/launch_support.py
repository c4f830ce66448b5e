"""Out-of-tree methods for tests/test_launch.py, selected as ``launch_support:Class`` (so a Ray
worker has to import them from the folder the driver added to its path).

* :class:`DiesOnce` — fine-tuning whose process dies (``os._exit``, as an OOM-kill or a lost node
  would end it) at its ``die_at_step``-th training step, once per ``marker`` file: the first
  process to claim the marker (``O_CREAT | O_EXCL``, so two cells racing cannot both die) dies,
  every later one trains on. With the marker present it is plain fine-tuning.
* :class:`FailsUnlessFixed` — fine-tuning that raises at its first training step unless the
  ``fixed`` file exists: a deterministic failure that a "fix" (creating the file) cures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from methods.finetune import Finetune, FinetuneConfig


@dataclass
class DiesOnceConfig(FinetuneConfig):
    marker: str = field(default="", metadata={"help": "claimed by the one process that dies"})
    die_at_step: int = field(default=3, metadata={"help": "the training step (counted in this process) to die at"})


class DiesOnce(Finetune):
    name = "dies_once"
    Config = DiesOnceConfig
    summary = "fine-tuning whose process dies once (tests)"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        self.steps = 0

    def training_features(self, images, tokens, task_ids):
        self.steps += 1
        if self.steps == self.config.die_at_step and self.config.marker:
            try:
                os.close(os.open(self.config.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # died once already (or another cell did): train on
            else:
                os._exit(1)
        return super().training_features(images, tokens, task_ids)


@dataclass
class FailsUnlessFixedConfig(FinetuneConfig):
    fixed: str = field(default="", metadata={"help": "a file whose existence cures the failure"})


class FailsUnlessFixed(Finetune):
    name = "fails_unless_fixed"
    Config = FailsUnlessFixedConfig
    summary = "fine-tuning that raises until a file exists (tests)"

    def training_features(self, images, tokens, task_ids):
        if not os.path.exists(self.config.fixed):
            raise RuntimeError(f"broken on purpose until {self.config.fixed} exists")
        return super().training_features(images, tokens, task_ids)
