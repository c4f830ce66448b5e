"""Readers for the caption formats researchers already have on disk.

Every reader returns one :class:`~benchmark.data.types.CaptionedImage` per *image*, with all of
that image's captions, in the order the source file lists them. Image paths are made absolute
(without following symlinks) under the image root the caller gives; captions are the raw source
strings with surrounding whitespace stripped. Readers never open or even stat image files: that
happens lazily at load time, and :func:`missing_images` lets a scenario fail early on a bad root.

Formats (``datasets/README.md`` describes the on-disk layout for users):

* **Karpathy split JSON** (``dataset_flickr30k.json``, ``dataset_coco.json``)::

      {"dataset": "coco",
       "images": [{"filepath": "val2014",            # COCO only
                   "filename": "COCO_val2014_000000391895.jpg",
                   "split": "train" | "val" | "test" | "restval",
                   "sentences": [{"raw": "A man ...", "tokens": [...], ...}, ...],
                   "cocoid": 391895,                  # COCO only
                   "imgid": 0, "sentids": [...]}]}

  -> :func:`read_karpathy`.

* **COCO captions + instances** (``captions_val2014.json`` + ``instances_val2014.json``): the
  caption file's ``images``/``annotations`` give file names and captions, the instance file's
  ``annotations``/``categories`` give each image one supercategory task -> :func:`read_coco`.

* **ALBEF/BLIP per-caption JSON**: a list of ``{"image": "val2014/x.jpg", "caption": "...",
  "image_id": "coco_1"}`` (train, one entry per caption) or ``{"image": ..., "caption": [...]}``
  (test, one entry per image), optionally with LPI's ``category`` -> :func:`read_albef`.

* **Custom caption tables**: ``.csv`` with a header row or ``.jsonl``, columns ``image``,
  ``caption`` and optionally ``task`` -> :func:`read_caption_table`.

Every problem with a file is reported as a one-line :class:`~benchmark.errors.DataError` that
names the file (and the entry, row or key) and says how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from benchmark.data.types import CaptionedImage
from benchmark.errors import ConfigError, DataError

__all__ = [
    "COCO_SUPERCATEGORIES",
    "COCO_SUPERCATEGORIES_LPI_ORDER",
    "KARPATHY_SPLITS",
    "CocoReadResult",
    "missing_images",
    "read_albef",
    "read_caption_table",
    "read_coco",
    "read_coco_supercategories",
    "read_karpathy",
]

# The 12 COCO supercategories in the order they first appear in COCO's category list.
COCO_SUPERCATEGORIES = (
    "person", "vehicle", "outdoor", "animal", "accessory", "sports",
    "kitchen", "food", "furniture", "electronic", "appliance", "indoor",
)

# The session order LPI (ACM MM 2024) trains the 12 supercategory tasks in, as in its reference
# code. Kept separate from the category-list order because results depend on task order.
COCO_SUPERCATEGORIES_LPI_ORDER = (
    "appliance", "sports", "outdoor", "electronic", "accessory", "indoor",
    "kitchen", "furniture", "vehicle", "food", "animal", "person",
)

KARPATHY_SPLITS = ("train", "val", "test", "restval")

_LAYOUT_HINT = "see datasets/README.md for the expected layout"


# --------------------------------------------------------------------------------------------
# Karpathy split JSON
# --------------------------------------------------------------------------------------------


def read_karpathy(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    splits: str | Sequence[str] = ("test",),
) -> list[CaptionedImage]:
    """Read a Karpathy split file (``dataset_flickr30k.json`` or ``dataset_coco.json``).

    Format: ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw", ...}],
    "cocoid"?, ...}], "dataset": ...}``. ``filepath`` (``train2014``/``val2014``) and ``cocoid``
    exist in the COCO file only; other keys (``tokens``, ``sentids``, ``imgid``) are ignored.

    Args:
        json_path: the Karpathy JSON file.
        image_root: the folder that ``filepath/filename`` (or just ``filename``) is relative to.
        splits: which ``split`` values to keep, e.g. ``("test",)``, or ``("train", "restval")``
            for the usual COCO training set. A single string means one split.

    Returns:
        One :class:`CaptionedImage` per kept image, in file order, with
        ``image = image_root/filepath/filename``, the ``raw`` sentences as captions,
        ``image_id = str(cocoid)`` if present else the file name, and ``task = None``.
    """
    path = Path(json_path)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    root = _absolute(image_root)
    data = _load_json(path)
    entries = _require(data, "images", path, "the top-level object", expect=list)
    present = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
    # A standard split the file happens not to have (Flickr has no "restval") is fine; anything
    # else is most likely a typo that would silently shrink the data.
    unknown = sorted(set(splits) - set(KARPATHY_SPLITS) - set(present))
    if unknown:
        raise ConfigError(
            f"unknown Karpathy split(s) {unknown} for {path}; choose from {list(KARPATHY_SPLITS)}"
        )

    items: list[CaptionedImage] = []
    seen_ids: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        _expect_object(entry, path, where)
        if _require(entry, "split", path, where) not in splits:
            continue
        filename = str(_require(entry, "filename", path, where))
        where = f"images[{index}] ({filename})"
        sentences = _require(entry, "sentences", path, where, expect=list)
        if not sentences:
            raise DataError(f"{path}: {where} has no sentences; every image needs at least one caption")
        captions = []
        for s_index, sentence in enumerate(sentences):
            s_where = f"{where} sentences[{s_index}]"
            _expect_object(sentence, path, s_where)
            captions.append(_caption(_require(sentence, "raw", path, s_where), path, s_where))
        # Flickr entries have no filepath: the images sit directly under the root.
        folder = entry.get("filepath") or ""
        image_id = str(entry["cocoid"]) if entry.get("cocoid") is not None else filename
        _claim_id(image_id, seen_ids, path, where)
        items.append(CaptionedImage(root / folder / filename, tuple(captions), image_id))

    if not items:
        raise DataError(
            f"{path}: no images in split(s) {list(splits)} (splits present: {present}); "
            "pick a split the file has"
        )
    return items


# --------------------------------------------------------------------------------------------
# COCO captions + instances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoReadResult:
    """What :func:`read_coco` kept, and how many images it had to drop and why.

    Attributes:
        images: the kept images, each with ``task`` set to a COCO supercategory name.
        dropped_no_instances: images with captions but no instance annotation (about 1% of
            COCO), which therefore have no supercategory to be assigned to.
        dropped_no_captions: images listed in the caption file without any caption (none in the
            official releases; counted so a trimmed file does not silently shrink the data).
    """

    images: list[CaptionedImage]
    dropped_no_instances: int
    dropped_no_captions: int = 0


def read_coco(
    captions_json: str | os.PathLike[str],
    instances_json: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    image_dir: str,
    assign: str = "first",
) -> CocoReadResult:
    """Read COCO captions and give every image one supercategory task.

    Formats: ``captions_*.json`` has ``images: [{"id", "file_name", ...}]`` and
    ``annotations: [{"image_id", "id", "caption"}]``; ``instances_*.json`` has
    ``categories: [{"id", "name", "supercategory"}]`` and
    ``annotations: [{"image_id", "category_id", "area", "bbox", "iscrowd", ...}]``.

    The task of an image is the supercategory of one of its instance annotations, chosen by
    ``assign`` as :func:`read_coco_supercategories` describes (``first`` is LPI's rule).
    Images with no instance annotation are dropped and counted.

    Args:
        captions_json: e.g. ``annotations/captions_val2014.json``.
        instances_json: the matching ``annotations/instances_val2014.json``.
        image_root: the COCO folder.
        image_dir: the image folder under it, e.g. ``val2014``.
        assign: ``"first"`` or ``"largest"``.

    Returns:
        A :class:`CocoReadResult`; images are in the caption file's ``images`` order, captions
        in annotation order, ``image = image_root/image_dir/file_name``,
        ``image_id = str(id)``.
    """
    if assign not in ("first", "largest"):
        raise ConfigError(f"unknown COCO task assignment {assign!r}; use 'first' or 'largest'")
    captions_path, instances_path = Path(captions_json), Path(instances_json)
    folder = _absolute(image_root) / image_dir
    # Both files are checked before either is parsed: they are large, and a user missing one
    # should learn it before waiting for the other to load.
    _check_file(captions_path)
    _check_file(instances_path)

    captions_data = _load_json(captions_path)
    image_entries = _require(captions_data, "images", captions_path, "the top-level object", expect=list)
    file_names: dict[Any, str] = {}
    for index, entry in enumerate(image_entries):
        where = f"images[{index}]"
        _expect_object(entry, captions_path, where)
        image_id = _require(entry, "id", captions_path, where)
        if image_id in file_names:
            raise DataError(f"{captions_path}: {where} repeats image id {image_id}; ids must be unique")
        file_names[image_id] = str(_require(entry, "file_name", captions_path, where))
    if not file_names:
        raise DataError(f"{captions_path}: the file lists no images; {_LAYOUT_HINT}")

    captions: dict[Any, list[str]] = {}
    caption_annotations = _require(captions_data, "annotations", captions_path, "the top-level object", expect=list)
    for index, ann in enumerate(caption_annotations):
        where = f"annotations[{index}]"
        _expect_object(ann, captions_path, where)
        image_id = _require(ann, "image_id", captions_path, where)
        if image_id not in file_names:
            raise DataError(
                f"{captions_path}: {where} refers to image_id {image_id}, which is not in its 'images' list"
            )
        text = _caption(_require(ann, "caption", captions_path, where), captions_path, f"{where} (image {image_id})")
        captions.setdefault(image_id, []).append(text)
    del captions_data  # the instance file is several times larger; free this one first

    chosen = read_coco_supercategories(instances_path, assign)

    items: list[CaptionedImage] = []
    dropped_no_instances = dropped_no_captions = 0
    for image_id, file_name in file_names.items():
        if image_id not in captions:
            dropped_no_captions += 1
        elif image_id not in chosen:
            dropped_no_instances += 1
        else:
            items.append(
                CaptionedImage(folder / file_name, tuple(captions[image_id]), str(image_id), chosen[image_id])
            )
    if not items:
        raise DataError(
            f"no image of {captions_path} has both a caption and an instance annotation in "
            f"{instances_path} ({dropped_no_instances} without instances, {dropped_no_captions} without "
            "captions); check that the two files are from the same COCO split"
        )
    return CocoReadResult(items, dropped_no_instances, dropped_no_captions)


def read_coco_supercategories(instances_json: str | os.PathLike[str], assign: str = "first") -> dict[Any, str]:
    """``{image id: supercategory}`` from a COCO ``instances_*.json``, one per annotated image.

    The rule (crowd annotations included, as in LPI):

    * ``assign="first"``: the image's first instance annotation in file order (LPI's rule);
    * ``assign="largest"``: the one with the largest ``area``; ties go to the earlier one.

    Images without any instance annotation are absent from the result. :func:`read_coco` and
    the Karpathy-split mode of ``coco_supercat`` both use this function, so an image gets the
    same task whichever caption source it is read from.
    """
    if assign not in ("first", "largest"):
        raise ConfigError(f"unknown COCO task assignment {assign!r}; use 'first' or 'largest'")
    instances_path = Path(instances_json)
    _check_file(instances_path)
    instances_data = _load_json(instances_path)
    supercategory: dict[Any, str] = {}
    for index, cat in enumerate(_require(instances_data, "categories", instances_path, "the top-level object", expect=list)):
        where = f"categories[{index}]"
        _expect_object(cat, instances_path, where)
        supercategory[_require(cat, "id", instances_path, where)] = str(
            _require(cat, "supercategory", instances_path, where)
        )

    # image id -> (area, supercategory) of the instance chosen so far
    chosen: dict[Any, tuple[float, str]] = {}
    instance_annotations = _require(instances_data, "annotations", instances_path, "the top-level object", expect=list)
    for index, ann in enumerate(instance_annotations):
        where = f"annotations[{index}]"
        _expect_object(ann, instances_path, where)
        image_id = _require(ann, "image_id", instances_path, where)
        category_id = _require(ann, "category_id", instances_path, where)
        if category_id not in supercategory:
            raise DataError(
                f"{instances_path}: {where} has category_id {category_id}, which is not in its 'categories' list"
            )
        if assign == "first":
            chosen.setdefault(image_id, (0.0, supercategory[category_id]))
            continue
        area = _require(ann, "area", instances_path, where)
        if not isinstance(area, (int, float)) or isinstance(area, bool):
            raise DataError(f"{instances_path}: {where} has a non-numeric 'area' {area!r}")
        # Strictly greater, so that on a tie the earlier annotation keeps the image.
        if image_id not in chosen or area > chosen[image_id][0]:
            chosen[image_id] = (float(area), supercategory[category_id])
    return {image_id: name for image_id, (_, name) in chosen.items()}


# --------------------------------------------------------------------------------------------
# ALBEF / BLIP per-caption JSON
# --------------------------------------------------------------------------------------------


def read_albef(json_path: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> list[CaptionedImage]:
    """Read an ALBEF/BLIP retrieval annotation file (``coco_karpathy_train.json`` etc.).

    Format: a JSON list. Train files have one entry per caption,
    ``{"image": "val2014/x.jpg", "caption": "a child ...", "image_id": "coco_184613"}``; test
    files have one entry per image, ``{"image": ..., "caption": ["cap1", "cap2", ...]}``. Each
    entry may use either layout. LPI's files add ``"category"`` (int or str), which becomes the
    task; an image given two different categories is an error.

    Returns:
        One :class:`CaptionedImage` per distinct image path, in order of first appearance, with
        its captions in entry order, ``image = image_root/image``, ``image_id`` = the first
        ``image_id`` given for it (as str) else the path as written.
    """
    path = Path(json_path)
    root = _absolute(image_root)
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise DataError(
            f"{path}: expected a JSON list of {{'image', 'caption'}} entries, got a {type(entries).__name__}"
        )

    groups: dict[Path, _Group] = {}
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        _expect_object(entry, path, where)
        image = _require(entry, "image", path, where)
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{path}: {where} has an empty or non-string 'image' {image!r}")
        where = f"entry {index} ({image})"
        raw = _require(entry, "caption", path, where)
        texts = raw if isinstance(raw, list) else [raw]
        if not texts:
            raise DataError(f"{path}: {where} has an empty caption list")
        category = entry.get("category")
        key = _absolute(root / image)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(image)
        # Test-layout entries carry no image_id; the first id any entry gives for the image wins.
        if entry.get("image_id") is not None and not group.has_explicit_id:
            group.image_id, group.has_explicit_id = str(entry["image_id"]), True
        group.captions.extend(_caption(t, path, where) for t in texts)
        group.set_task(None if category is None else str(category), path, image)

    if not groups:
        raise DataError(f"{path}: the file contains no entries; {_LAYOUT_HINT}")
    return _finish(groups, path)


# --------------------------------------------------------------------------------------------
# Custom CSV / JSONL tables
# --------------------------------------------------------------------------------------------


def read_caption_table(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> list[CaptionedImage]:
    """Read a custom caption table: ``.csv`` (with a header row) or ``.jsonl``.

    Columns: ``image`` (a path), ``caption`` (one caption), optional ``task``. Several rows with
    the same image give one :class:`CaptionedImage` with the captions in row order. A blank or
    absent task means "not given"; two different non-blank tasks for one image are an error.
    Other columns are ignored.

    Args:
        path: the table file; its suffix (``.csv`` or ``.jsonl``) picks the parser.
        image_root: the folder relative image paths are resolved against; by default the
            folder the table is in. Absolute paths are used as they are.

    Returns:
        One :class:`CaptionedImage` per distinct image, in order of first appearance, with
        ``image_id`` = the image path as first written and ``task`` as str or ``None``.
    """
    table = Path(path)
    suffix = table.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"{table}: unsupported caption table type {suffix or '(no suffix)'!r}; use .csv or .jsonl")
    _check_file(table)
    root = _absolute(image_root if image_root is not None else table.parent)
    rows = _csv_rows(table) if suffix == ".csv" else _jsonl_rows(table)

    groups: dict[Path, _Group] = {}
    for where, row in rows:
        image = row.get("image")
        if image is None or (isinstance(image, str) and not image.strip()):
            raise DataError(f"{table}: {where} has no 'image' value; every row needs an image path")
        if not isinstance(image, str):
            raise DataError(f"{table}: {where} has a non-string 'image' {image!r}")
        image = image.strip()
        if "caption" not in row or row["caption"] is None:
            raise DataError(f"{table}: {where} has no 'caption' value; every row needs one caption")
        text = _caption(row["caption"], table, where)
        task = row.get("task")
        task = None if task is None or str(task).strip() == "" else str(task).strip()
        # Key on the resolved path so "a.jpg" and "./a.jpg" are recognised as one image.
        key = _absolute(root / image)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(image)
        group.captions.append(text)
        group.set_task(task, table, image)

    if not groups:
        raise DataError(f"{table}: the table has no rows; add one row per (image, caption) pair")
    return _finish(groups, table)


def _csv_rows(table: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("line N", row) for each data row; checks the header has the required columns."""
    # utf-8-sig: spreadsheet programs often prepend a byte-order mark that would otherwise
    # end up in the first column name.
    reader = csv.DictReader(io.StringIO(_read_text(table, encoding="utf-8-sig"), newline=""))
    if reader.fieldnames is None:
        raise DataError(f"{table}: the file is empty; it needs a header row image,caption[,task] and one row per caption")
    header = [name.strip() for name in reader.fieldnames]
    reader.fieldnames = header
    for column in ("image", "caption"):
        if column not in header:
            raise DataError(
                f"{table}: the header row has no {column!r} column (columns: {header}); "
                "the first row must name the columns image,caption[,task]"
            )
    for row in reader:
        # line_num is the line the row ended on, which stays right for quoted multi-line cells.
        where = f"line {reader.line_num}"
        # DictReader files surplus cells under the key None and pads short rows with None; both
        # mean the row does not line up with the header (typically a caption with an unquoted
        # comma), and reading on would silently shift or drop a value.
        surplus = row.get(None)
        if surplus is not None or any(value is None for key, value in row.items() if key is not None):
            cells = len(header) + len(surplus or []) - sum(1 for k, v in row.items() if k is not None and v is None)
            raise DataError(f"{table}: {where} has {cells} cells but the header has {len(header)} columns "
                            f"({', '.join(header)}); put a caption that contains a comma in double quotes")
        yield where, row


def _jsonl_rows(table: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("line N", object) for each non-blank line of a JSON-lines file."""
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which is not a row end.
    for number, line in enumerate(_read_text(table).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{table}: line {number}, column {err.colno}: malformed JSON ({err.msg}); "
                "each line must be one JSON object"
            ) from None
        where = f"line {number}"
        _expect_object(row, table, where)
        for key in ("image", "caption"):
            _require(row, key, table, where)
        yield where, row


# --------------------------------------------------------------------------------------------
# Checking images
# --------------------------------------------------------------------------------------------


def missing_images(items: Iterable[CaptionedImage], limit: int = 5) -> list[Path]:
    """Return up to ``limit`` image paths among ``items`` that do not exist, in item order.

    In-memory images are skipped. Stops at the ``limit``-th missing file, so checking a large
    dataset whose root is wrong costs only a few ``stat`` calls.
    """
    missing: list[Path] = []
    if limit <= 0:
        return missing
    for item in items:
        if isinstance(item.image, (str, Path)) and not Path(item.image).exists():
            missing.append(Path(item.image))
            if len(missing) >= limit:
                break
    return missing


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


class _Group:
    """Captions of one image collected across entries/rows, plus its (single) task."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        self.has_explicit_id = False
        self.captions: list[str] = []
        self.task: str | None = None

    def set_task(self, task: str | None, path: Path, image: str) -> None:
        if task is None:
            return
        if self.task is not None and self.task != task:
            raise DataError(
                f"{path}: image {image} is given two different tasks, {self.task!r} and {task!r}; "
                "an image can belong to one task only"
            )
        self.task = task


def _finish(groups: dict[Path, _Group], path: Path) -> list[CaptionedImage]:
    """Turn grouped captions into records, refusing duplicate ids (they must be unique)."""
    seen: set[str] = set()
    items = []
    for image, group in groups.items():
        _claim_id(group.image_id, seen, path, f"image {image}")
        items.append(CaptionedImage(image, tuple(group.captions), group.image_id, group.task))
    return items


def _claim_id(image_id: str, seen: set[str], path: Path, where: str) -> None:
    if image_id in seen:
        raise DataError(f"{path}: {where} reuses image id {image_id!r} of another image; ids must be unique")
    seen.add(image_id)


def _absolute(path: str | os.PathLike[str]) -> Path:
    # abspath rather than resolve(): keep symlinked data folders as the user named them.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path} is a folder, but an annotation file is expected there; {_LAYOUT_HINT}")
    if not path.is_file():
        raise DataError(f"annotation file {path} not found; {_LAYOUT_HINT}")


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    _check_file(path)
    # newline="" keeps "\r\n" inside quoted CSV cells intact for the csv module to interpret.
    try:
        with open(path, encoding=encoding, newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text (byte offset {err.start}); save it as UTF-8") from None


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
            "re-download or repair the file"
        ) from None


def _expect_object(value: Any, path: Path, where: str) -> None:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} should be a JSON object, got a {type(value).__name__}; {_LAYOUT_HINT}")


def _require(obj: Any, key: str, path: Path, where: str, expect: type | None = None) -> Any:
    """obj[key], or a DataError saying which key is missing where (or has the wrong type)."""
    _expect_object(obj, path, where)
    if key not in obj:
        raise DataError(f"{path}: {where} has no {key!r} key; {_LAYOUT_HINT}")
    value = obj[key]
    if expect is not None and not isinstance(value, expect):
        raise DataError(
            f"{path}: {where} has {key!r} of type {type(value).__name__}, expected {expect.__name__}; {_LAYOUT_HINT}"
        )
    return value


def _caption(text: Any, path: Path, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{path}: {where} has a non-string caption {text!r}")
    text = text.strip()
    if not text:
        raise DataError(f"{path}: {where} has an empty caption; remove the entry or fill it in")
    return text
