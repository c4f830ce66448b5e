"""The training data loader: persistent workers, uint8 crops, and augmentation that does not
depend on how many workers there are.

**Per-sample seeding.** Every random number a training item draws (the crop box, the flip,
anything else its transform draws from torch's or Python's global generator) comes from
generators seeded by :func:`sample_seed` of (run seed, task, epoch, pair index), and the
data order of an epoch from :func:`sample_seed` of (run seed, task, epoch) alone. Neither
touches the process's global generators: the main process's random state after an epoch is
what it would be without a loader, so a run gives the same model with 0, 1 or 16 workers,
and ``training.num_workers`` is not part of a run's identity. The task is part of the key so
that pair *i* of two tasks is not cropped alike in the same epoch.

**How the epoch reaches persistent workers.** A worker holds its own copy of the dataset,
made once, so setting an attribute in the main process would not reach it. The sampler does:
:class:`EpochSampler` tags every index it yields with (task, epoch) — set by the training
loop at the start of each epoch, like ``DistributedSampler.set_epoch`` — and
:class:`SeededItems` unpacks the tag in the worker. Any index sampler can sit inside
(:class:`ShuffledIndices` by default; a distributed sampler for multi-GPU runs).

**Workers** (``training.num_workers``, :func:`resolve_num_workers`): ``auto`` is no worker on
a CPU-only run (the CPU cores are the model's: a worker would take them from the very
computation it feeds, and the small in-memory data of CPU runs decodes faster than a worker
starts), and on CUDA one worker per CPU core this process may use, one core left for the
training loop, at most 16 (one core decodes 350-800 pairs/s, so a GPU that trains a few
thousand pairs/s needs that many). Workers persist across the epochs of a task and prefetch
4 batches each; on CUDA batches are pinned so the copy to the device overlaps the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
from typing import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .decode import uint8_images

MAX_AUTO_WORKERS = 16
CELL_CPUS_ENV = "CLVL_CELL_CPUS"  # the CPUs the launcher gave this run (benchmark.launch.cell)
PREFETCH_BATCHES = 4  # per worker
_ORDER = 2**32  # the sample_seed "index" of an epoch's data order (no pair index is this large)


def sample_seed(seed: int, task: int, epoch: int, index: int) -> int:
    """A 64-bit seed for item ``index`` of ``task``'s epoch ``epoch`` in a run with ``seed``:
    BLAKE2b (8-byte digest) of the four numbers as little-endian unsigned 64-bit integers (the
    run seed taken modulo 2**64), so nearby keys give unrelated seeds."""
    key = struct.pack("<4Q", int(seed) % 2**64, int(task), int(epoch), int(index))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` from ``seed`` for the block, and put
    their previous states back after it.

    These are the generators image transforms draw from (torchvision's and open_clip's from
    torch; timm's from ``random``). NumPy's global generator is left alone: saving and restoring
    its state costs about as much as decoding a small image. (``torch.manual_seed`` is avoided
    for the same reason: it also seeds every accelerator's generators.)"""
    torch_generator = torch.default_generator
    torch_state, python_state = torch_generator.get_state(), random.getstate()
    torch_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch_generator.set_state(torch_state)
        random.setstate(python_state)


class ShuffledIndices(Sampler[int]):
    """A permutation of ``range(size)`` drawn from :func:`sample_seed` (seed, task, epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.task = self.epoch = 0

    def set_epoch(self, task: int, epoch: int) -> None:
        self.task, self.epoch = task, epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.task, self.epoch, _ORDER))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EpochSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(task, epoch, index)`` for every index of ``indices``.

    ``set_epoch(task, epoch)`` is forwarded to ``indices`` when it has one taking both, or
    ``set_epoch(epoch)`` (torch's ``DistributedSampler``).
    """

    def __init__(self, indices: Sampler[int]):
        self.indices = indices
        self.task = self.epoch = 0

    def set_epoch(self, task: int, epoch: int) -> None:
        self.task, self.epoch = task, epoch
        if isinstance(self.indices, ShuffledIndices):
            self.indices.set_epoch(task, epoch)
        elif hasattr(self.indices, "set_epoch"):
            self.indices.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        task, epoch = self.task, self.epoch
        return ((task, epoch, int(index)) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededItems(Dataset):
    """``dataset`` read by ``(task, epoch, index)`` keys: item ``index``, with its random
    draws seeded by :func:`sample_seed` and, with ``uint8``, its image as a uint8 crop where
    the transform splits (:func:`benchmark.data.decode.uint8_images`)."""

    def __init__(self, dataset, seed: int, uint8: bool = True):
        self.dataset, self.seed, self.uint8 = dataset, seed, uint8

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        task, epoch, index = key
        crops = uint8_images() if self.uint8 else contextlib.nullcontext()
        with seeded_generators(sample_seed(self.seed, task, epoch, index)), crops:
            return self.dataset[index]


def resolve_num_workers(value: int | str, device: torch.device) -> int:
    """``training.num_workers``: an integer as given; ``auto`` by the rule in the module docstring.

    The cores counted are this process's share: the CPUs a Ray cell was given
    (``launcher.cpus_per_cell``, passed in :data:`CELL_CPUS_ENV`) or else the process's affinity
    mask, divided among the processes torchrun started on this node (``LOCAL_WORLD_SIZE``), so
    K processes of a ``--ddp`` run, or several cells on one node, do not each take the machine."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = int(os.environ.get(CELL_CPUS_ENV, cores))
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(MAX_AUTO_WORKERS, cores - 1))


def train_loader(dataset, *, batch_size: int, seed: int, num_workers: int, device: torch.device,
                 drop_last: bool = False, shuffle: bool = True, collate_fn=None,
                 indices: Sampler[int] | None = None, uint8: bool = True,
                 shard: tuple[int, int] | None = None) -> DataLoader:
    """The training loader of one task's ``dataset``; its ``batch_sampler.sampler`` is the
    :class:`EpochSampler` whose ``set_epoch`` the training loop calls before every epoch.

    ``indices``: the index sampler to tag (default: :class:`ShuffledIndices`, or the identity
    order without ``shuffle``). ``uint8``: images as uint8 crops (the caller normalises them,
    :func:`benchmark.data.decode.to_model_input`), else as the whole transform gives them.
    ``shard``: ``(rank, world_size)`` of a run split over processes (``--ddp``): this process's
    part of every global batch of ``batch_size`` (:class:`benchmark.distributed.ShardedBatchSampler`);
    the order and every item's draws are seeded alike in every process, so the parts add up
    to the single-process batches exactly."""
    if indices is None:
        indices = ShuffledIndices(len(dataset), seed) if shuffle else range(len(dataset))
    sampler = EpochSampler(indices)
    if shard is None:
        batches = BatchSampler(sampler, batch_size, drop_last)
    else:
        from ..distributed import ShardedBatchSampler

        batches = ShardedBatchSampler(sampler, batch_size, rank=shard[0], world_size=shard[1], drop_last=drop_last)
    workers = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES} if num_workers > 0 else {}
    return DataLoader(SeededItems(dataset, seed, uint8), batch_sampler=batches,
                      num_workers=num_workers, pin_memory=device.type == "cuda", collate_fn=collate_fn,
                      # the loader's own base seed (for workers' global generators) is drawn from
                      # this generator, not from the run's global one
                      generator=torch.Generator().manual_seed(sample_seed(seed, 0, 0, _ORDER + 1)), **workers)


def epoch_sampler(loader) -> EpochSampler | None:
    """The :class:`EpochSampler` of a loader made by :func:`train_loader` (None for others,
    e.g. Avalanche's replay loader)."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return sampler if isinstance(sampler, EpochSampler) else None
