"""One run split over several processes (one per GPU): ``torchrun`` + data parallelism with global negatives.

Launch::

    torchrun --nproc_per_node=K -m benchmark run ... --ddp

Every process builds the same scenario, backbone and method from the same seed; what is split
is each training batch and each evaluation gallery. The definitions:

* **Processes.** :func:`start` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: backend ``nccl``
  on CUDA (process ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on the CPU. ``--ddp`` without that
  environment is a one-line error saying how to launch.
* **Batches.** ``training.batch_size`` stays the *global* batch, the protocol's; each process
  takes ``batch_size / K`` pairs of it (it must divide). The training loader
  (:func:`benchmark.data.loading.train_loader`) draws the epoch's order from a generator seeded
  by (run seed, task, epoch) and every item's augmentation from one seeded by (run seed, task,
  epoch, index), so every process draws the single-process order and crops without talking to
  the others; :class:`ShardedBatchSampler` cuts that order into the same global batches
  (dropping a last batch of one pair, as the harness does) and hands process ``r`` the ``r``-th
  part of each. So the union of the processes' ``k``-th batches *is* the single-process ``k``-th
  batch, pixel for pixel.
* **Loss.** :func:`gather_with_grad` all-gathers every process's features with their gradient
  (open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``, ``src/open_clip/loss.py``:
  ``gather_features`` / ``ClipLoss.forward``, followed in idea); each process scores its own rows
  against every process's columns (:func:`benchmark.losses.info_nce_share`). The shares sum to
  the single-process InfoNCE of the whole batch.
* **Gradients.** After ``backward`` :func:`sum_gradients` all-reduces (sums) the trainable
  parameters' gradients, so every process holds the gradient of the whole-batch loss and takes
  the same optimizer step. Why not ``DistributedDataParallel``: the method is the model, its
  trainable set changes from task to task (new prompts, parts frozen), and the strategy calls
  ``method.training_features``, not the module's ``forward``, which DDP's reducer hooks into.
  One explicit sum over a flat buffer is the same arithmetic, with nothing to rewrap per task.
* **Same model everywhere.** At the start of each task (once the method made its new
  parameters) and at its end (once it fitted keys or froze parts) :func:`broadcast_module`
  copies process 0's parameters and buffers to the others, so a random draw that differs
  between processes (an initialisation, a key-fitting transform) cannot make them drift apart.
* **Evaluation.** :func:`encode_in_shards` lets each process encode a contiguous shard of a
  task's test images and captions, then gathers the features (without padding: shards are cut
  exactly) to every process; all rank the same full gallery, process 0 writes.
* **Writing.** Process 0 alone writes records, checkpoints, run logs, loggers' files, tables and
  progress bars (:func:`is_main`); the others log errors only.

Methods declare ``supports_ddp`` (:class:`benchmark.method.Method`); one that keeps state
outside its gradients that is not synchronised here (replay memory, prompt-selection counts) is
refused when the run is planned (:func:`refusal`).

What is equal to a single-process run, and what is not: the trained weights and recall are
the single-process ones up to float summation order (tested in ``tests/test_ddp.py``), random
crops included, since they are seeded per item. A last global batch of ``m`` pairs with
``1 < m < K`` (not every process would get a pair) is dropped under ``--ddp``, and the log says so.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .errors import BenchmarkError, ConfigError, one_line

log = logging.getLogger("benchmark.distributed")

LAUNCH = "torchrun --nproc_per_node=K -m benchmark run ... --ddp"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


_context: Context | None = None


# ---- joining and leaving ----------------------------------------------------------------------
def start(device_name: str = "auto") -> Context:
    """Join torchrun's process group (once per process) and return this process's context.

    ``device_name`` is the run's ``device`` setting: ``auto`` or ``cuda``/``cuda:N`` use
    ``cuda:LOCAL_RANK`` with nccl (``cuda:N`` is only accepted as a device type: torchrun
    decides the index), ``cpu`` uses gloo.

    Raises:
        ConfigError: the process was not started by torchrun, or CUDA was asked for without it.
    """
    global _context
    if _context is not None:
        return _context
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(f"--ddp needs the environment torchrun sets ({', '.join(missing)} missing); launch the "
                          f"run as `{LAUNCH}`, or drop --ddp to run in one process")
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not use_cuda:
        raise ConfigError(f"device {device_name!r} was asked for but CUDA is not available; use --device cpu "
                          "(gloo) or auto")
    if use_cuda:
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, **({"device_id": device} if use_cuda else {}))
        atexit.register(_leave)
    _context = Context(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)
    if rank != 0:  # one voice: the other processes report only errors
        for name in ("benchmark", "methods"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return _context


def _leave() -> None:
    global _context
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _context = None


def current() -> Context | None:
    """This process's context under ``--ddp``, or None in a single-process run."""
    return _context


def world_size() -> int:
    return _context.world_size if _context is not None else 1


def rank() -> int:
    return _context.rank if _context is not None else 0


def is_main() -> bool:
    """True in a single-process run and in process 0: the one process that writes."""
    return rank() == 0


@contextlib.contextmanager
def main_first():
    """Run the body in process 0 first, then in the others (e.g. building a cache that the others
    then read instead of building it again at the same time)."""
    if _context is None:
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def on_main(work: Callable[[], Any]) -> Any:
    """``work()`` run in process 0 alone, its result handed to every process; a
    :class:`~benchmark.errors.BenchmarkError` it raises is raised in every process."""
    if _context is None:
        return work()
    outcome = None
    if is_main():
        try:
            outcome = ("done", work())
        except BenchmarkError as error:
            share(("failed", one_line(error), type(error).__name__))
            raise
    outcome = share(outcome)
    if outcome[0] == "failed":
        raise BenchmarkError(outcome[1])  # the other processes stop too (process 0 prints the message)
    return outcome[1]


def share(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object), in every process."""
    if _context is None:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- what may run split -------------------------------------------------------------------------
def check_batch_size(batch_size: int, world: int) -> int:
    """The per-process batch: ``batch_size / world``, which must be a whole number."""
    if batch_size % world:
        raise ConfigError(f"--ddp splits training.batch_size {batch_size} over {world} processes, which does not "
                          f"divide it; choose a batch size that is a multiple of {world} (the global batch stays "
                          "the protocol's) or another --nproc_per_node")
    return batch_size // world


def refusal(method_cls, params) -> str | None:
    """Why ``method_cls`` with config ``params`` cannot run under ``--ddp``, as a one-line error, or None."""
    reason = method_cls.ddp_refusal(params)
    if reason is None:
        return None
    return f"method {method_cls.name!r} does not support --ddp: {reason}; run it without --ddp"


# ---- training batches -----------------------------------------------------------------------------
def global_batches(order: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    """The single-process loader's batches of ``order``: consecutive chunks of ``batch_size``,
    the last one dropped if ``drop_last`` and it is short."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def split_counts(size: int, world: int) -> list[int]:
    """How many of ``size`` items each of ``world`` processes takes: equal parts, the first
    ``size % world`` processes one more."""
    return [size // world + (1 if r < size % world else 0) for r in range(world)]


class ShardedBatchSampler(Sampler[list]):
    """Process ``rank``'s part of each global batch of ``sampler``'s order (see the module docstring).

    ``sampler`` is the single-process loader's item sampler (the training loader's
    :class:`~benchmark.data.loading.EpochSampler`, seeded by run seed, task and epoch, so every
    process draws the same order without talking to the others); it stays reachable as
    ``.sampler``, which is where the training loop finds it to call ``set_epoch``.
    ``drop_last`` as in torch's ``BatchSampler`` for the *global* batch. Global batch ``k`` is
    cut into ``world`` consecutive parts (:func:`split_counts`); a global batch too small to
    give every process a pair is dropped.
    """

    def __init__(self, sampler, batch_size: int, *, rank: int, world_size: int, drop_last: bool = False):
        self.sampler, self.batch_size = sampler, batch_size
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def _usable(self, batches: list[list]) -> list[list]:
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[list]:
        batches = global_batches(list(self.sampler), self.batch_size, self.drop_last)
        usable = self._usable(batches)
        if len(usable) < len(batches) and self.rank == 0:
            log.warning("--ddp: a last batch of %d pair(s) cannot give each of %d processes one; it is dropped "
                        "(a single-process run trains on it)", len(batches[-1]), self.world_size)
        for batch in usable:
            counts = split_counts(len(batch), self.world_size)
            start = sum(counts[:self.rank])
            yield batch[start:start + counts[self.rank]]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        last = 0 if rest == 0 or self.drop_last or rest < self.world_size else 1
        return full + last


# ---- the loss and the gradients -------------------------------------------------------------------
def _all_gather_autograd(x: Tensor) -> Tensor:
    """``[world * n, ...]``: every process's ``x`` ``[n, ...]`` (same ``n`` everywhere) stacked in
    rank order, with a gradient that flows back to each process's own ``x`` (summed over
    processes). torch 2.14's current name is ``_functional_collectives.all_gather_single_autograd``;
    older releases have ``all_gather_tensor_autograd`` and ``torch.distributed.nn.all_gather``
    (what open_clip 3.3 calls), which 2.13/2.14 deprecate with a FutureWarning."""
    from torch.distributed import _functional_collectives as fc

    group = dist.group.WORLD
    if hasattr(fc, "all_gather_single_autograd"):
        return fc.all_gather_single_autograd(x.contiguous(), 0, group)
    if hasattr(fc, "all_gather_tensor_autograd"):
        return fc.all_gather_tensor_autograd(x.contiguous(), 0, group)
    import torch.distributed.nn  # noqa: F401  (registers torch.distributed.nn.all_gather)

    return torch.cat(torch.distributed.nn.all_gather(x.contiguous()), dim=0)


def gather_sizes(count: int, device: torch.device) -> list[int]:
    """Every process's ``count`` (e.g. its batch size), in rank order."""
    local = torch.tensor([count], device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def gather_with_grad(x: Tensor, sizes: list[int]) -> Tensor:
    """Every process's rows of ``x`` (``sizes[r]`` rows in process ``r``), concatenated in rank
    order, differentiable with respect to this process's ``x``. Unequal sizes are padded for
    the collective and the padding removed."""
    most = max(sizes)
    padded = x if len(x) == most else torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])])
    gathered = _all_gather_autograd(padded)
    if all(s == most for s in sizes):
        return gathered
    return torch.cat([gathered[r * most:r * most + s] for r, s in enumerate(sizes)])


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over processes (a missing gradient counts as
    zero), in one flat all-reduce."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def sum_scalar(value: Tensor) -> Tensor:
    """A detached scalar summed over processes (e.g. the shares of the loss)."""
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy process 0's parameters and buffers into this process's ``module`` (in place)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if _context.backend == "nccl" and tensor.device.type != "cuda":  # nccl moves CUDA tensors only
            staged = tensor.data.to(_context.device)
            dist.broadcast(staged, src=0)
            tensor.data.copy_(staged)
        else:
            dist.broadcast(tensor.data, src=0)


# ---- evaluation -----------------------------------------------------------------------------------
def shard_range(size: int) -> range:
    """This process's contiguous part of ``size`` items (:func:`split_counts`)."""
    counts = split_counts(size, world_size())
    start = sum(counts[:rank()])
    return range(start, start + counts[rank()])


class GalleryShard(Dataset):
    """This process's contiguous shard of a task's test images and of its captions (the two are
    cut independently; ``caption_image`` stays the full gallery's, since ranking happens on the
    gathered gallery)."""

    def __init__(self, gallery, images: range, captions: range):
        self.gallery, self.images = gallery, images
        self.caption_tokens = gallery.caption_tokens[captions.start:captions.stop]
        self.caption_image = gallery.caption_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.gallery[self.images[index]]

    # What the evaluation's crop cache reads of a gallery (benchmark.evaluation.EvaluationCache).
    @property
    def transform(self):
        return self.gallery.transform

    def transform_parts(self):
        return self.gallery.transform_parts()

    def crop(self, index: int):
        return self.gallery.crop(self.images[index])

    def finish(self, crops):
        return self.gallery.finish(crops)


_shards: "weakref.WeakKeyDictionary[Any, GalleryShard]" = weakref.WeakKeyDictionary()


def shard_of(gallery) -> GalleryShard:
    """This process's shard of ``gallery``: one object per gallery, so that what the evaluation
    caches for it (decoded crops, frozen features) is found again in the next session."""
    shard = _shards.get(gallery)
    if shard is None:
        shard = _shards[gallery] = GalleryShard(gallery, shard_range(len(gallery)),
                                                shard_range(len(gallery.caption_tokens)))
    return shard


def wants_shards(gallery) -> bool:
    """True when a gallery should be encoded in shards: under ``--ddp``, not a shard already, and
    with at least one image and one caption for every process (a smaller one is encoded whole by
    each process)."""
    return (world_size() > 1 and not isinstance(gallery, GalleryShard)
            and min(len(gallery), len(gallery.caption_tokens)) >= world_size())


def encode_in_shards(encode: Callable[[Any], Any], gallery):
    """``encode(shard)`` on this process's :class:`GalleryShard`, then the whole task's
    features in every process: images and captions gathered in rank order (so in gallery
    order), and the routing accuracy of the whole task from the shards' counts.

    ``encode`` returns a :class:`benchmark.evaluation.TaskFeatures`; the gathered one is of the
    same type."""
    part = encode(shard_of(gallery))
    parts = [None] * world_size()
    dist.all_gather_object(parts, (part.images, part.texts, part.image_routing, part.text_routing))
    images = torch.cat([p[0] for p in parts])
    texts = torch.cat([p[1] for p in parts])

    def routing(index: int, sizes: list[int]) -> float | None:
        # Each shard's % back to its count of items routed right, then the % of the whole task
        # as the single-process evaluation computes it (a float32 mean of hits).
        values = [p[index] for p in parts]
        if any(v is None for v in values):
            return None
        hits = sum(round(v * n / 100.0) for v, n in zip(values, sizes))
        return 100.0 * float(torch.tensor(float(hits)) / sum(sizes))

    image_sizes, text_sizes = [len(p[0]) for p in parts], [len(p[1]) for p in parts]
    return type(part)(images, texts, gallery.caption_image, routing(2, image_sizes), routing(3, text_sizes))

