"""Pre-flight image check: decode every image of a scenario once, before anything trains.

A truncated JPEG, a zero-byte file or a text file named ``.jpg`` is otherwise found only when a
data loader decodes it, which can be hours into a grid, after other methods and tasks ran.
:func:`check_images` decodes each distinct image file once, with the same decoder the data
loaders use (:func:`~benchmark.data.torch_datasets.decode_rgb`, so "bad" means exactly "training
would fail on it"), on a thread pool (Pillow releases the GIL while it decodes), and lists *every*
bad file at once.

Files that decoded cleanly are remembered in a small JSON cache keyed by absolute path, size and
modification time, so a second run over the same data checks only what changed. Bad files are
never cached: a replaced file is checked again even if its size and time happen to match.

What to do with bad files is the run's ``bad_images`` policy (:func:`apply_policy`):

* ``stop`` (default): a :class:`~benchmark.errors.DataError` lists each bad file and why;
  nothing has trained, nothing is written.
* ``skip``: the items whose image is bad are dropped from their split, and the scenario's
  ``info["bad_images"]`` (recorded in every run record as ``scenario_info``) counts them per task
  and split and names the files; ``show`` prints the count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError
from ..io import atomic_write_json
from .torch_datasets import DECODE_ERRORS, decode_rgb
from .types import CaptionedImage

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
CACHE_SCHEMA = "clvl-benchmark/image-check/v1"
LISTED_IN_ERRORS = 20  # bad files named in one error message; the rest are counted


@dataclass(frozen=True)
class BadImage:
    """One image file that does not decode, and where the scenario uses it."""

    path: Path
    reason: str
    uses: tuple[tuple[str, str], ...]  # (task name, split) pairs that contain the file

    def describe(self) -> str:
        where = ", ".join(f"{task}/{split}" for task, split in self.uses)
        return f"{self.path} ({where}): {self.reason}"


@dataclass
class ImageCheck:
    """The outcome of :func:`check_images`."""

    files: int  # distinct image files the scenario uses
    decoded: int  # of those, decoded in this call (the rest were known good from the cache)
    bad: list[BadImage]

    @property
    def ok(self) -> bool:
        return not self.bad


def _file_key(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache_file: Path | None) -> dict[str, list[int]]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring an unreadable image-check cache %s; every image is decoded again", cache_file)
        return {}
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("good"), dict):
        return {}
    return data["good"]


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (None: it decodes)."""
    try:
        decode_rgb(path)
    except FileNotFoundError:
        return "file not found"
    except DECODE_ERRORS as error:
        return str(error) or type(error).__name__
    return None


def image_uses(scenario) -> dict[Path, list[tuple[str, str]]]:
    """Each distinct image file of ``scenario`` -> the (task, split) pairs that use it (in-memory images: none)."""
    uses: dict[Path, list[tuple[str, str]]] = {}
    for name, train, test in zip(scenario.task_names, scenario.train, scenario.test):
        for split, items in (("train", train), ("test", test)):
            for item in items:
                if isinstance(item.image, (str, os.PathLike)):
                    where = uses.setdefault(Path(item.image).absolute(), [])
                    if (name, split) not in where:
                        where.append((name, split))
    return uses


def check_images(scenario, *, workers: int | None = None, cache_file: Path | None = None,
                 progress: Callable[[int], None] | None = None,
                 uses: dict[Path, list[tuple[str, str]]] | None = None) -> ImageCheck:
    """Decode every distinct image file of ``scenario`` (train and test) once; list the bad ones.

    Args:
        scenario: a :class:`~benchmark.scenarios.base.Scenario`. In-memory images (the synthetic
            scenario draws its own) are not files and are not checked.
        workers: decoding threads (default: the CPUs this process may use, at most 32).
        cache_file: where known-good files are remembered; ``None`` disables the cache.
        progress: called with the number of files finished, as they finish (a progress bar's
            ``update``).
    """
    uses = image_uses(scenario) if uses is None else uses  # uses: image_uses(scenario), if already known
    good = _read_cache(cache_file)
    to_decode = [path for path in uses if good.get(str(path)) != _file_key(path)]
    if progress is not None and len(uses) > len(to_decode):
        progress(len(uses) - len(to_decode))
    workers = workers or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    bad: list[BadImage] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="image-check") as pool:
        for path, problem in zip(to_decode, pool.map(_problem, to_decode)):
            if problem is None:
                key = _file_key(path)
                if key is not None:
                    good[str(path)] = key
            else:
                good.pop(str(path), None)
                bad.append(BadImage(path, problem, tuple(uses[path])))
            if progress is not None:
                progress(1)
    if cache_file is not None and to_decode:
        try:
            atomic_write_json(cache_file, {"schema": CACHE_SCHEMA, "good": good})
        except OSError as error:  # a cache that cannot be written costs time, never a result
            log.warning("could not write the image-check cache %s (%s)", cache_file, error.strerror or error)
    return ImageCheck(files=len(uses), decoded=len(to_decode), bad=bad)


def apply_policy(scenario, check: ImageCheck, policy: str):
    """Return the scenario to run under ``policy`` (``stop`` or ``skip``), given ``check``.

    ``stop`` raises :class:`DataError` naming every bad file (the first
    :data:`LISTED_IN_ERRORS`, then a count); ``skip`` returns a copy without the items whose
    image is bad, with ``info["bad_images"]`` saying what was dropped.
    """
    if policy not in POLICIES:
        raise DataError(f"bad_images must be one of {', '.join(POLICIES)}, not {policy!r}")
    if check.ok:
        return scenario
    if policy == "stop":
        listed = "; ".join(bad.describe() for bad in check.bad[:LISTED_IN_ERRORS])
        more = len(check.bad) - LISTED_IN_ERRORS
        more_text = f"; and {more} more" if more > 0 else ""
        raise DataError(f"{len(check.bad)} of {check.files} image files of scenario {scenario.name!r} do not decode: "
                        f"{listed}{more_text}. Replace or remove them, or run with --bad-images skip to leave "
                        "their items out (counted in the record)")
    bad_paths = {bad.path for bad in check.bad}

    def keep(item: CaptionedImage) -> bool:
        return not isinstance(item.image, (str, os.PathLike)) or Path(item.image).absolute() not in bad_paths

    train = [[item for item in items if keep(item)] for items in scenario.train]
    test = [[item for item in items if keep(item)] for items in scenario.test]
    skipped = {name: {"train": len(a) - len(b), "test": len(c) - len(d)}
               for name, a, b, c, d in zip(scenario.task_names, scenario.train, train, scenario.test, test)}
    info = dict(scenario.info)
    info["bad_images"] = {"policy": "skip", "files": sorted(str(path) for path in bad_paths),
                          "skipped_items": skipped}
    log.warning("skipping %d item(s) whose image does not decode (%d file(s)); the record counts them per task: %s",
                sum(n["train"] + n["test"] for n in skipped.values()), len(bad_paths),
                "; ".join(bad.describe() for bad in check.bad[:LISTED_IN_ERRORS]))
    return dataclasses.replace(scenario, train=train, test=test, info=info)


def check_and_apply(scenario, policy: str, *, cache_file: Path | None, workers: int | None = None,
                    progress_bar: Callable[..., object] | None = None):
    """:func:`check_images` with an optional tqdm-style bar factory, then :func:`apply_policy`."""
    uses = image_uses(scenario)
    total = len(uses)
    if total == 0:  # images held in memory (synthetic): nothing to decode, nothing to say
        return scenario
    bar = None
    if progress_bar is not None:
        bar = progress_bar(total=total, unit="image", desc=f"checking the images of {scenario.name}", leave=False)
    try:
        check = check_images(scenario, workers=workers, cache_file=cache_file,
                             progress=None if bar is None else bar.update, uses=uses)
    finally:
        if bar is not None:
            bar.close()
    if check.files:
        log.info("image check: %d file(s), %d decoded now (the rest known good), %d bad",
                 check.files, check.decoded, len(check.bad))
    return apply_policy(scenario, check, policy)
