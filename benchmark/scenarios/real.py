"""Scenarios over real caption datasets (files under the data root; see ``datasets/README.md``).

* ``flickr_coco`` — two tasks, Flickr30K then MSCOCO, with Karpathy's splits: train on each
  dataset's ``train`` split (COCO: ``train`` + ``restval``, as is usual), test on its 1k / 5k
  ``test`` split.
* ``coco_supercat`` — LPI's 12 tasks (ACM MM 2024), one per COCO supercategory, in LPI's session
  order. Each image is given one supercategory by a documented rule (``assign``): ``first`` = the
  supercategory of the image's first instance annotation (what LPI's grounding code does), or
  ``largest`` = that of its largest instance. Images without instances are dropped and counted.
  Which images train and test is the ``split`` option:

  - ``val2014``: train on COCO train2014, test on *every* val2014 image of a task (LPI's
    ``retrieval_*2014.json`` naming). The union gallery reaches ~40k images and ~200k captions
    by the last task, which LPI's reference code cannot have evaluated (two fp32 score
    matrices of that size take ~65 GB; its README quotes ~7 GB of GPU memory).
  - ``karpathy``: Karpathy's COCO split (``dataset_coco.json``): test = the 5,000 ``test``
    images, train = ``train`` + ``restval`` (the usual ~113k), the 5,000 ``val`` images unused
    (the reference selects no model, so there is nothing to validate). Captions come from the
    split file; each image's supercategory from ``instances_train2014.json`` /
    ``instances_val2014.json`` by the same ``assign`` rule. This is the ~5k-image test set the
    reference most plausibly used, and what ``configs/lpi_coco_supercat.yaml`` selects.

  ``test_images_per_task`` optionally caps each task's test set (a deterministic choice: the
  lowest image ids), since LPI's exact test list is not public.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..data import readers
from ..errors import DataError
from .base import Scenario, ScenarioBuilder, require_files

REAL_DEFAULT_BACKBONE = "ViT-B-16:openai"


def _check_images(scenario: str, items) -> None:
    missing = readers.missing_images(items, limit=3)
    if missing:
        raise DataError(f"scenario {scenario!r}: image files are missing, e.g. {', '.join(map(str, missing))}; "
                        "see datasets/README.md for the expected layout")


def _cap(items: list, limit: int) -> list:
    return items if limit <= 0 else items[:limit]


@dataclass
class FlickrCocoOptions:
    flickr_dir: str = "flickr30k"  # under the data root: dataset_flickr30k.json + flickr30k-images/
    coco_dir: str = "coco"  # under the data root: dataset_coco.json + train2014/ + val2014/
    coco_train_splits: list[str] = field(default_factory=lambda: ["train", "restval"])
    max_train_images: int = 0  # cap per task for quick runs (0 = all), taking the first in file order


def build_flickr_coco(options: FlickrCocoOptions, data_root: Path) -> Scenario:
    flickr, coco = data_root / options.flickr_dir, data_root / options.coco_dir
    flickr_json, coco_json = flickr / "dataset_flickr30k.json", coco / "dataset_coco.json"
    require_files("flickr_coco", [flickr_json, flickr / "flickr30k-images", coco_json])
    flickr_root = flickr / "flickr30k-images"
    train = [_cap(readers.read_karpathy(flickr_json, flickr_root, ("train",)), options.max_train_images),
             _cap(readers.read_karpathy(coco_json, coco, tuple(options.coco_train_splits)), options.max_train_images)]
    test = [readers.read_karpathy(flickr_json, flickr_root, ("test",)),
            readers.read_karpathy(coco_json, coco, ("test",))]
    for split in train + test:
        _check_images("flickr_coco", split)
    info = {"sources": [str(flickr_json), str(coco_json)], "splits": "Karpathy: train(+restval for COCO) / test"}
    return Scenario("flickr_coco", ["flickr30k", "mscoco"], train, test, REAL_DEFAULT_BACKBONE, info)


FLICKR_COCO = ScenarioBuilder(
    name="flickr_coco", build=build_flickr_coco, options=FlickrCocoOptions,
    summary="Flickr30K then MSCOCO (Karpathy splits; 1k / 5k test images)",
    needs="flickr30k/dataset_flickr30k.json + images, coco/dataset_coco.json + train2014/ val2014/", num_tasks=2)


COCO_SUPERCAT_SPLITS = ("val2014", "karpathy")


@dataclass
class CocoSupercatOptions:
    coco_dir: str = "coco"  # under the data root: annotations/ + train2014/ + val2014/ (+ dataset_coco.json)
    split: str = "val2014"  # val2014 (train2014 / all of val2014) | karpathy (train+restval / the 5k test)
    assign: str = "first"  # "first" (LPI's grounding code) or "largest" instance decides an image's task
    task_order: list[str] = field(default_factory=lambda: list(readers.COCO_SUPERCATEGORIES_LPI_ORDER))
    test_images_per_task: int = 0  # cap per task (0 = every val2014 image of the task)
    max_train_images: int = 0  # cap per task for quick runs (0 = all)

    def __post_init__(self):
        if self.split not in COCO_SUPERCAT_SPLITS:
            raise ValueError(f"split must be one of {', '.join(COCO_SUPERCAT_SPLITS)}, got {self.split!r}")
        if self.assign not in ("first", "largest"):
            raise ValueError(f"assign must be 'first' or 'largest', got {self.assign!r}")
        unknown = set(self.task_order) - set(readers.COCO_SUPERCATEGORIES)
        if unknown or len(set(self.task_order)) != len(self.task_order):
            raise ValueError(f"task_order must be distinct COCO supercategories; unknown: {sorted(unknown)}")


def _read_val2014_split(options: CocoSupercatOptions, coco: Path):
    """``(train images, test images, info)``: COCO's own train2014 / val2014 caption files."""
    files = {split: (coco / "annotations" / f"captions_{split}2014.json",
                     coco / "annotations" / f"instances_{split}2014.json") for split in ("train", "val")}
    require_files("coco_supercat", [f for pair in files.values() for f in pair])
    splits, dropped = {}, {}
    for split, (captions, instances) in files.items():
        result = readers.read_coco(captions, instances, coco, f"{split}2014", assign=options.assign)
        splits[split], dropped[split] = result.images, result.dropped_no_instances
    info = {"sources": [str(f) for pair in files.values() for f in pair],
            "splits": "train = COCO train2014, test = every COCO val2014 image",
            "dropped_images_without_instances": dropped}
    return splits["train"], splits["val"], info


def _cocoid(item, path: Path) -> int:
    try:
        return int(item.image_id)  # read_karpathy's id is the entry's cocoid
    except ValueError:
        raise DataError(f"{path}: image {item.describe()} has no numeric 'cocoid', so its COCO instances "
                        "cannot be found; use the COCO Karpathy file (dataset_coco.json)") from None


def _read_karpathy_split(options: CocoSupercatOptions, coco: Path):
    """``(train images, test images, info)``: Karpathy's split file, tasks from the instance files."""
    karpathy = coco / "dataset_coco.json"
    instances = [coco / "annotations" / f"instances_{split}2014.json" for split in ("train", "val")]
    require_files("coco_supercat", [karpathy, *instances])
    # COCO image ids are unique across train2014 and val2014, so one table serves both folders.
    supercategory = {}
    for path in instances:
        supercategory.update(readers.read_coco_supercategories(path, options.assign))
    parts, dropped = {}, {}
    for name, splits in (("train", ("train", "restval")), ("test", ("test",))):
        items = readers.read_karpathy(karpathy, coco, splits)
        parts[name] = [dataclasses.replace(i, task=supercategory[_cocoid(i, karpathy)]) for i in items
                       if _cocoid(i, karpathy) in supercategory]
        dropped[name] = len(items) - len(parts[name])
    info = {"sources": [str(karpathy), *map(str, instances)],
            "splits": "Karpathy: train = train + restval, test = test (5,000 images); val unused",
            "dropped_images_without_instances": dropped}
    return parts["train"], parts["test"], info


def build_coco_supercat(options: CocoSupercatOptions, data_root: Path) -> Scenario:
    coco = data_root / options.coco_dir
    read = _read_karpathy_split if options.split == "karpathy" else _read_val2014_split
    train_images, test_images, split_info = read(options, coco)

    def by_task(items, task, cap):
        chosen = [i for i in items if i.task == task]
        return _cap(sorted(chosen, key=lambda i: int(i.image_id)) if cap else chosen, cap)

    train = [by_task(train_images, t, options.max_train_images) for t in options.task_order]
    test = [by_task(test_images, t, options.test_images_per_task) for t in options.task_order]
    for split in train + test:
        _check_images("coco_supercat", split[:50])  # a sample: a full stat of 120k files is slow
    info = {"split": options.split, **split_info, "assign_rule": options.assign,
            "task_order_source": "LPI reference code (Kelvin-ywc/LPI)"}
    return Scenario("coco_supercat", list(options.task_order), train, test, REAL_DEFAULT_BACKBONE, info)


COCO_SUPERCAT = ScenarioBuilder(
    name="coco_supercat", build=build_coco_supercat, options=CocoSupercatOptions,
    summary="LPI's 12 COCO-supercategory tasks in LPI's order (one supercategory per image)",
    needs="coco/annotations/{captions,instances}_{train,val}2014.json + train2014/ val2014/ "
          "(split=karpathy: coco/dataset_coco.json + the instances files)", num_tasks=12)
