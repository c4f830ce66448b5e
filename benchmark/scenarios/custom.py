"""``custom``: a scenario over the user's own caption files, declared in the run's YAML.

Tables are :func:`~benchmark.data.readers.read_caption_table` files (CSV or JSONL with
``image``, ``caption`` and optionally ``task`` columns), in one of four layouts::

    scenario: custom
    scenario_options:            # 1. one train/test file pair per task
      name: my_stream
      tasks:
        - {name: birds, train: birds_train.csv, test: birds_test.csv}
        - {name: cars,  train: cars_train.csv,  test: cars_test.csv}

    scenario: custom
    scenario_options:            # 2. one train/test file pair, the task per row
      train: train.jsonl
      test: test.jsonl
      task_order: [birds, cars]  # optional; default: order of first appearance in `train`

    scenario: custom
    scenario_options:            # 3. one file per task, split by the harness
      tasks:
        - {name: birds, data: birds.csv}
        - {name: cars,  data: cars.csv}
      split: {test: 0.2, seed: 0}

    scenario: custom
    scenario_options:            # 4. one file with a task column, split by the harness
      data: captions.csv
      split: {test: 50, seed: 0}  # 50 test images per task

The split is per task and by *image* (all captions of an image go to the same side, so no image
is in both splits), seeded, and recorded in ``scenario_info.split`` of every run record: ``test``
is a fraction in (0, 1) of each task's images (rounded, at least one image on each side) or a
whole number of images per task.

Paths: relative table paths are resolved against the data root (``--data-root``,
``$CLVL_DATA_ROOT``, else ``./data``); a missing table that exists relative to the current folder
is named in the error. Images are resolved against ``image_root`` (itself relative to the data
root) if given, else against each table's own folder.

What is refused or said out loud rather than done silently: the same file as ``train`` and
``test`` is an error (use ``data`` + ``split``); images that appear in both splits of different
files are counted in ``scenario_info.train_test_overlap`` with a warning; a ``task_order`` that
leaves out tasks present in the tables drops their rows with a warning naming them, and the
record counts them in ``scenario_info.dropped_tasks``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.readers import read_caption_table
from ..data.types import CaptionedImage
from ..errors import DataError
from .base import Scenario, ScenarioBuilder, require_files
from .real import _check_images

log = logging.getLogger(__name__)

PAIR_KEYS = frozenset({"name", "train", "test"})
DATA_KEYS = frozenset({"name", "data"})


@dataclass
class CustomOptions:
    name: str = "custom"  # the scenario's name in records and tables
    tasks: list[dict[str, Any]] = field(default_factory=list)  # [{name, train, test}] or [{name, data}] per task
    train: str = ""  # one training table with a task column (instead of `tasks`)
    test: str = ""  # one test table with a task column
    data: str = ""  # one table with a task column, split by `split` (instead of `train` + `test`)
    split: dict[str, Any] = field(default_factory=dict)  # {test: fraction or count per task, seed: int}
    task_order: list[str] = field(default_factory=list)  # tasks to use, in order (default: first appearance)
    image_root: str = ""  # folder image paths are relative to (default: each table's folder)
    backbone: str = "ViT-B-16:openai"  # default backbone for this scenario

    def __post_init__(self):
        layouts = [bool(self.tasks), bool(self.train or self.test), bool(self.data)]
        if sum(layouts) != 1:
            raise ValueError("give exactly one of `tasks` (a file pair or one `data` file per task), "
                             "`train` + `test` (one pair of files with a task column) or `data` (one file with a "
                             "task column, split by `split`)")
        for i, task in enumerate(self.tasks):
            if not isinstance(task, dict) or set(task) not in (PAIR_KEYS, DATA_KEYS):
                raise ValueError(f"tasks[{i}] must be a mapping with exactly the keys name, train, test "
                                 "(or name, data)")
        if self.tasks and len({frozenset(t) for t in self.tasks}) > 1:
            raise ValueError("tasks: give every task either train + test or data, not a mix")
        if self.task_order and self.tasks:
            raise ValueError("task_order orders the tasks of a task column; with `tasks`, list them in the order "
                             "you want instead")
        if (self.train or self.test) and not (self.train and self.test):
            raise ValueError("`train` and `test` must both be given")
        needs_split = bool(self.data) or (self.tasks and "data" in self.tasks[0])
        if needs_split and not self.split:
            raise ValueError("a `data` file is split into train and test by `split: {test: 0.2, seed: 0}` "
                             "(a fraction of each task's images, or a number of images per task); add it")
        if self.split and not needs_split:
            raise ValueError("`split` applies to `data` files only; with train and test files, drop it")
        if self.split:
            self._check_split()

    def _check_split(self) -> None:
        unknown = set(self.split) - {"test", "seed"}
        if unknown or "test" not in self.split:
            raise ValueError(f"split must be a mapping {{test: fraction or count, seed: int}}, got {self.split!r}")
        test, seed = self.split["test"], self.split.get("seed", 0)
        if isinstance(test, bool) or not isinstance(test, (int, float)) or not (
                (isinstance(test, float) and 0 < test < 1) or (isinstance(test, int) and test >= 1)):
            raise ValueError(f"split.test must be a fraction between 0 and 1 (0.2) or a whole number of test images "
                             f"per task (50), got {test!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"split.seed must be a non-negative integer, got {seed!r}")


def split_images(items: list[CaptionedImage], test: float | int, seed: int, task_index: int,
                 task: str) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """Seeded image-level split of one task: ``(train, test)``, each in the table's order.

    The permutation comes from ``numpy.random.default_rng([seed, task_index])``, so each task's
    split depends only on the seed and the task's position, not on the other tasks.
    """
    n = len(items)
    if isinstance(test, int):
        n_test = test
    else:  # a fraction, rounded, keeps at least one image on each side
        n_test = min(max(1, int(math.floor(test * n + 0.5))), n - 1)
    if n_test < 1 or n_test >= n:
        raise DataError(f"task {task!r} has {n} image(s); split.test={test!r} leaves no training image "
                        "(use a smaller fraction or count)")
    chosen = set(np.random.default_rng([seed, task_index]).permutation(n)[:n_test].tolist())
    return ([item for i, item in enumerate(items) if i not in chosen],
            [item for i, item in enumerate(items) if i in chosen])


def build_custom(options: CustomOptions, data_root: Path) -> Scenario:
    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else data_root / p

    def require(files: list[str]) -> None:
        beside = [f for f in files if not path(f).exists() and Path(f).exists()]
        if beside:
            raise DataError(f"scenario {options.name!r}: {', '.join(map(str, (path(f) for f in beside)))} not found; "
                            "relative paths in scenario_options are resolved against the data root "
                            f"({data_root}), but {', '.join(beside)} exists relative to the current folder: give "
                            "an absolute path, or run with --data-root .")
        require_files(options.name, [path(f) for f in files])

    image_root = path(options.image_root) if options.image_root else None
    info: dict[str, Any] = {}
    if options.tasks:
        keys = ("data",) if "data" in options.tasks[0] else ("train", "test")
        files = [t[k] for t in options.tasks for k in keys]
        require(files)
        names = [str(t["name"]) for t in options.tasks]
        if keys == ("data",):
            tables = [read_caption_table(path(t["data"]), image_root) for t in options.tasks]
            train, test = _split(names, tables, options.split, info)
        else:
            _refuse_same_file(options.name, [(path(t["train"]), path(t["test"]), t["name"]) for t in options.tasks])
            train = [read_caption_table(path(t["train"]), image_root) for t in options.tasks]
            test = [read_caption_table(path(t["test"]), image_root) for t in options.tasks]
    else:
        files = [options.data] if options.data else [options.train, options.test]
        require(files)
        tables = {f: read_caption_table(path(f), image_root) for f in files}
        for which, items in tables.items():
            untagged = [i.describe() for i in items if not i.task]
            if untagged:
                raise DataError(f"{which}: image {untagged[0]} has no task; every row needs a `task` value "
                                "when one file holds all tasks")
        first = tables[files[0]]
        present = list(dict.fromkeys(i.task for i in first))
        names = list(options.task_order) or present
        if options.data:
            by_task = [[i for i in first if i.task == n] for n in names]
            train, test = _split(names, by_task, options.split, info)
        else:
            _refuse_same_file(options.name, [(path(options.train), path(options.test), None)])
            train = [[i for i in first if i.task == n] for n in names]
            test = [[i for i in tables[options.test] if i.task == n] for n in names]
        _note_dropped_tasks(options.name, names, list(tables.values()), info)
    sources = [str(path(f)) for f in files]
    log.info("custom scenario %r: tables %s", options.name, ", ".join(sources))
    _note_overlap(options.name, names, train, test, info)
    for split in train + test:
        _check_images(options.name, split)
    return Scenario(options.name, names, train, test, options.backbone, {"sources": sources, **info})


def _split(names: list[str], tables: list[list[CaptionedImage]], split: dict[str, Any],
           info: dict[str, Any]) -> tuple[list[list[CaptionedImage]], list[list[CaptionedImage]]]:
    test_size, seed = split["test"], int(split.get("seed", 0))
    train, test = [], []
    for index, (name, items) in enumerate(zip(names, tables)):
        if not items:
            raise DataError(f"task {name!r} has no images in its table; check the task column / task_order")
        a, b = split_images(items, test_size, seed, index, name)
        train.append(a)
        test.append(b)
    info["split"] = {"test": test_size, "seed": seed, "unit": "image",
                     "images": {n: {"train": len(a), "test": len(b)} for n, a, b in zip(names, train, test)}}
    return train, test


def _refuse_same_file(scenario: str, pairs: list[tuple[Path, Path, str | None]]) -> None:
    for train, test, task in pairs:
        if train.resolve() == test.resolve():
            where = f"task {task!r}: " if task is not None else ""
            raise DataError(f"scenario {scenario!r}: {where}train and test are the same file ({train}), so every test "
                            "image would also be trained on; give a separate test file, or give the one file as "
                            "`data` with `split: {test: 0.2, seed: 0}`")


def _note_dropped_tasks(scenario: str, names: list[str], tables: list[list[CaptionedImage]],
                        info: dict[str, Any]) -> None:
    kept = set(names)
    dropped: dict[str, int] = {}
    for items in tables:
        for item in items:
            if item.task not in kept:
                dropped[item.task] = dropped.get(item.task, 0) + 1
    if dropped:
        info["dropped_tasks"] = {task: {"images": n} for task, n in sorted(dropped.items())}
        log.warning("custom scenario %r: task_order leaves out task(s) %s; their %d image(s) are not used "
                    "(recorded as scenario_info.dropped_tasks)", scenario, ", ".join(sorted(dropped)),
                    sum(dropped.values()))


def _note_overlap(scenario: str, names: list[str], train: list[list[CaptionedImage]],
                  test: list[list[CaptionedImage]], info: dict[str, Any]) -> None:
    """Count test images that are also training images (anywhere in the stream)."""
    trained = {Path(i.image).absolute() for items in train for i in items if isinstance(i.image, (str, Path))}
    overlap = {name: sum(1 for i in items if isinstance(i.image, (str, Path)) and Path(i.image).absolute() in trained)
               for name, items in zip(names, test)}
    overlap = {name: n for name, n in overlap.items() if n}
    if overlap:
        info["train_test_overlap"] = overlap
        log.warning("custom scenario %r: %d test image(s) are also training images (%s); recall on them measures "
                    "memorisation (recorded as scenario_info.train_test_overlap)", scenario, sum(overlap.values()),
                    ", ".join(f"{n} in {t}" for t, n in overlap.items()))


CUSTOM = ScenarioBuilder(
    name="custom", build=build_custom, options=CustomOptions,
    summary="your own caption files (CSV/JSONL): a file pair per task, a task column, or one file split for you",
    needs="the files named in scenario_options (see datasets/README.md)", num_tasks=None)
