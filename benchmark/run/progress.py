"""Progress bars while a run trains and evaluates; they only watch, so results never depend on them.

Log lines go above the bars (the grid runs inside ``tqdm.contrib.logging.logging_redirect_tqdm``).
"""

from __future__ import annotations

import sys
import time

from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm


class TrainingProgress(SupervisedPlugin):
    """A progress bar per task: iterations, with the running loss."""

    supports_distributed = True  # Avalanche's flag: under --ddp only process 0 shows it

    def __init__(self, label: str, show: bool = True):
        super().__init__()
        self.label, self.bar, self.show = label, None, show
        self.loss_read = float("-inf")  # when the loss was last read (time.monotonic)

    def before_training_exp(self, strategy, **kwargs):
        total = len(strategy.dataloader) * strategy.train_epochs
        task = strategy.task_names[strategy.experience.current_experience]
        self.bar = tqdm(total=total, desc=f"{self.label} | train {task}", unit="step", leave=False,
                        mininterval=bar_interval(), disable=not self.show)

    def after_training_iteration(self, strategy, **kwargs):
        # Reading the loss makes the host wait for the device: once per loss_interval(), not every step.
        now = time.monotonic()
        if self.show and now - self.loss_read >= loss_interval():  # a hidden bar (--ddp, process > 0) never reads
            self.loss_read = now
            self.bar.set_postfix(loss=f"{strategy.last_train_loss:.3f}", refresh=False)
        self.bar.update(1)

    def after_training_exp(self, strategy, **kwargs):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluation_bar(label: str, when: str, total: int, show: bool = True) -> tqdm:
    """The bar of one evaluation: items (images and captions) encoded (``show=False``: none drawn)."""
    return tqdm(total=total, unit="item", desc=f"{label} | eval {when}", leave=False, mininterval=bar_interval(),
                disable=not show)


def bar_interval() -> float:
    # In a log file (batch jobs, nohup) a bar redrawn ten times a second is megabytes of noise.
    return 0.1 if sys.stderr.isatty() else 30.0


def loss_interval() -> float:
    """Seconds between two reads of the training loss for the bar (at least one second)."""
    return max(1.0, bar_interval())
