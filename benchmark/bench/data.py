"""The bench's data and the data-pipeline section: how many training pairs per second one CPU
core turns from JPEG files into model inputs, for each decode path.

**Generated photos.** No dataset is downloaded: :func:`write_photos` draws JPEGs that decode
like photographs (640x480 by default, quality 90, as COCO's are): a smooth random colour field
with soft blobs and a little sensor-like noise. Pure noise would be the wrong test, since it
compresses badly and decodes slower than any photo. Every image gets five captions of 9-13
words (a COCO caption's length) from a fixed vocabulary, so tokenising and the text tower see
realistic lengths. :func:`bench_scenario` makes a harness :class:`~benchmark.scenarios.Scenario`
of them, which every other section feeds through the harness's own datasets and loaders.

**Decode paths.** :func:`decode_paths` names the ways the harness can turn a file into a
training input: ``training.decode`` = ``pil`` (Pillow decodes the whole file), ``pil-draft``
(JPEG decoded at a reduced DCT scale where the crop allows) and ``torchvision``
(``torchvision.io`` decode + a uint8 ``resized_crop``), each giving the uint8 crop the training
loader ships (:mod:`benchmark.data.decode`), plus the float32 item of the whole open_clip
transform that training loaders shipped before (``pil, float32 (before)``). Items are read as
the training loader reads them, with their draws seeded per item
(:class:`benchmark.data.loading.SeededItems`).

**Measured.** Per path: pairs/s in the calling process on one thread (one core, as a loader
worker has), and pairs/s through a
``torch.utils.data.DataLoader`` with ``W`` workers, divided by ``W`` (pairs/s per worker).
Warm-up items (and worker start-up) are not timed; the median of the repeats is reported, with
the bytes one item carries to the training loop.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from ..data.types import CaptionedImage

CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 90
_WORDS = ("a man woman child dog cat horse bus train plate of food on the table next to street with two people "
          "standing sitting near large small red white blue green kitchen room field tree water beach sky "
          "holding riding playing open wooden old young group some").split()


def write_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs of ``size`` (width, height) at quality 90 in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for index in range(count):
        # Low-frequency colour field: a coarse random grid, upsampled smoothly.
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        # Soft blobs (objects) on top, then blurred, then mild noise (sensor grain).
        pixels = np.asarray(image, dtype=np.int16).copy()
        for _ in range(4):
            cx, cy = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(max(2, height // 12), max(3, height // 3)))
            y, x = np.ogrid[:height, :width]
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
            pixels[mask] = rng.integers(0, 256, size=3)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, size=(height, width, 3)).astype(np.int16)
        path = folder / f"photo_{index:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def captions_for(count: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Five captions of 9-13 words per image, drawn from a fixed vocabulary."""
    rng = random.Random(seed)
    return [tuple(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(9, 13))).capitalize() + "."
                  for _ in range(CAPTIONS_PER_IMAGE)) for _ in range(count)]


def captioned(paths: list[Path], seed: int = 0) -> list[CaptionedImage]:
    return [CaptionedImage(image=path, captions=caps, image_id=f"bench-{i}")
            for i, (path, caps) in enumerate(zip(paths, captions_for(len(paths), seed)))]


def bench_scenario(items: list[CaptionedImage], tasks: int, backbone: str):
    """A harness scenario over ``items``, split into ``tasks`` equal tasks; each task's training
    and test split are the same images (the bench measures speed, not generalisation)."""
    from ..scenarios import Scenario

    per_task = max(1, len(items) // tasks)
    parts = [items[t * per_task:(t + 1) * per_task] for t in range(tasks)]
    return Scenario(name="bench", task_names=[f"task{t}" for t in range(tasks)], train=parts, test=parts,
                    default_backbone=backbone, info={"generated": True})


def decode_paths(backbone) -> dict[str, tuple[str, bool]]:
    """Decode paths by row name -> (``training.decode`` value, images as uint8 crops).

    ``pil, float32 (before)`` is the training item as it travelled before the device stage
    existed (Pillow full decode + the whole open_clip transform in the worker, a normalised
    float32 tensor); the others are :data:`benchmark.data.decode.DECODE_PATHS`, each as the
    training loader uses it (uint8 crop, normalised on the device).
    """
    from ..data.decode import DECODE_PATHS

    return {"pil, float32 (before)": ("pil", False), **{name: (name, True) for name in DECODE_PATHS}}


class _Keyed:
    """``dataset[i]`` as the training loader reads item ``i`` of epoch 0 (seeded draws, uint8
    crops when asked): :class:`benchmark.data.loading.SeededItems` with plain indices."""

    def __init__(self, dataset, uint8: bool):
        from ..data.loading import SeededItems

        self.items = SeededItems(dataset, seed=0, uint8=uint8)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[(0, 0, index)]


def worker_counts(tiny: bool) -> list[int]:
    """Loader worker counts the section measures: the calling process only (``0``) in the tiny
    mode; else also up to 4 workers, fewer on a machine with fewer cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [0] if tiny or cores < 2 else [0, min(4, cores)]


def _pairs_per_s_in_process(dataset, items: int, repeats: int) -> list[float]:
    """Pairs/s of ``dataset[i]`` in this process on one thread (what a loader worker gets: torch
    starts its workers with one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]  # warm-up: first decode pays for imports and caches
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for index in range(items):
                dataset[index % len(dataset)]
            rates.append(items / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return rates


def _pairs_per_s_loader(dataset, items: int, workers: int, batch_size: int, repeats: int) -> list[float]:
    from torch.utils.data import DataLoader

    rates = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=True, prefetch_factor=2)
    batches = max(1, items // batch_size)
    for repeat in range(repeats + 1):  # the first pass only warms up (starts the workers)
        start, done = time.perf_counter(), 0
        for index, batch in enumerate(loader):
            done += len(batch[0])
            if index + 1 >= batches:
                break
        if repeat:
            rates.append(done / (time.perf_counter() - start))
    return rates


def measure_data(options, items: list[CaptionedImage], backbone, tick: Callable[[], None]) -> dict:
    """The data-pipeline section (see the module docstring)."""
    from ..data.torch_datasets import CaptionPairs

    repeats, count = options.profile["repeats"], options.profile["data_items"]
    rows = []
    for path, (decode, uint8) in decode_paths(backbone).items():
        pairs = _Keyed(CaptionPairs(items, backbone.preprocess_train, backbone.tokenizer, decode=decode), uint8)
        image = pairs[0][0]
        item_bytes = int(image.numel() * image.element_size())
        for workers in worker_counts(options.tiny):
            if workers == 0:
                rates = _pairs_per_s_in_process(pairs, count, repeats)
            else:
                rates = _pairs_per_s_loader(pairs, count * workers, workers, options.batch_size, repeats)
            total = statistics.median(rates)
            rows.append({"decode_path": path, "workers": workers, "pairs_per_s": total,
                         "pairs_per_s_per_worker": total / max(1, workers), "repeats_pairs_per_s": rates,
                         "item_bytes": item_bytes, "image_dtype": str(image.dtype).replace("torch.", ""),
                         "image_shape": list(image.shape)})
            tick()
    return {"status": "measured", "photos": len(items), "rows": rows,
            "definition": "pairs/s from JPEG file to the tensor a training batch holds; workers 0 = the calling "
                          "process (one core); per worker = total / workers"}
