"""``custom``: a scenario over the user's own caption files, declared in the run's YAML.

Two layouts, both with :func:`~benchmark.data.readers.read_caption_table` files (CSV or JSONL
with ``image``, ``caption`` and optionally ``task`` columns)::

    scenario: custom
    scenario_options:            # one pair of files per task
      name: my_stream
      tasks:
        - {name: birds, train: birds_train.csv, test: birds_test.csv}
        - {name: cars,  train: cars_train.csv,  test: cars_test.csv}

    scenario: custom
    scenario_options:            # one pair of files, the task per row
      train: train.jsonl
      test: test.jsonl
      task_order: [birds, cars]  # optional; default: order of first appearance in `train`

Relative paths are resolved against the data root; images against ``image_root`` if given,
else against each table's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.readers import read_caption_table
from ..errors import DataError
from .base import Scenario, ScenarioBuilder, require_files
from .real import _check_images


@dataclass
class CustomOptions:
    name: str = "custom"  # the scenario's name in records and tables
    tasks: list[dict[str, Any]] = field(default_factory=list)  # [{name, train, test}] — one file pair per task
    train: str = ""  # one training table with a task column (instead of `tasks`)
    test: str = ""  # one test table with a task column
    task_order: list[str] = field(default_factory=list)  # tasks to use, in order (default: first appearance)
    image_root: str = ""  # folder image paths are relative to (default: each table's folder)
    backbone: str = "ViT-B-16:openai"  # default backbone for this scenario

    def __post_init__(self):
        if bool(self.tasks) == bool(self.train or self.test):
            raise ValueError("give either `tasks` (one train/test file pair per task) or `train` + `test` "
                             "(one pair of files with a task column)")
        for i, task in enumerate(self.tasks):
            if not isinstance(task, dict) or set(task) != {"name", "train", "test"}:
                raise ValueError(f"tasks[{i}] must be a mapping with exactly the keys name, train, test")
        if not self.tasks and not (self.train and self.test):
            raise ValueError("`train` and `test` must both be given")


def build_custom(options: CustomOptions, data_root: Path) -> Scenario:
    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else data_root / p

    image_root = path(options.image_root) if options.image_root else None
    if options.tasks:
        require_files(options.name, [path(t[k]) for t in options.tasks for k in ("train", "test")])
        names = [str(t["name"]) for t in options.tasks]
        train = [read_caption_table(path(t["train"]), image_root) for t in options.tasks]
        test = [read_caption_table(path(t["test"]), image_root) for t in options.tasks]
        sources = [str(path(t[k])) for t in options.tasks for k in ("train", "test")]
    else:
        require_files(options.name, [path(options.train), path(options.test)])
        train_all = read_caption_table(path(options.train), image_root)
        test_all = read_caption_table(path(options.test), image_root)
        for items, which in ((train_all, options.train), (test_all, options.test)):
            untagged = [i.describe() for i in items if not i.task]
            if untagged:
                raise DataError(f"{which}: image {untagged[0]} has no task; every row needs a `task` value "
                                "when one file holds all tasks")
        names = list(options.task_order) or list(dict.fromkeys(i.task for i in train_all))
        train = [[i for i in train_all if i.task == n] for n in names]
        test = [[i for i in test_all if i.task == n] for n in names]
        sources = [str(path(options.train)), str(path(options.test))]
    for split in train + test:
        _check_images(options.name, split)
    return Scenario(options.name, names, train, test, options.backbone, {"sources": sources})


CUSTOM = ScenarioBuilder(
    name="custom", build=build_custom, options=CustomOptions,
    summary="your own caption files (CSV/JSONL), one file pair per task or a task column",
    needs="the files named in scenario_options (see datasets/README.md)", num_tasks=None)
