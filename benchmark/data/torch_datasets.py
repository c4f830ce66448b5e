"""Torch datasets over :class:`~benchmark.data.types.CaptionedImage` lists.

Avalanche moves every field of a mini-batch to the device, so every field is a tensor:
captions are tokenised once, up front, with the backbone's tokenizer (and the ids are kept for
the next run with the same tokenizer and captions, :mod:`benchmark.data.token_cache`).

* :class:`CaptionPairs` — training items ``(image, tokens, pair_index)``: one per (image,
  caption) pair, image through the *train* transform.
* :class:`GalleryImages` — evaluation items ``(image, image_index)``: one per image, through
  the backbone's *eval* preprocessing; the captions of the set are available as one token
  tensor (:attr:`GalleryImages.caption_tokens`) with their image index
  (:attr:`GalleryImages.caption_image`). :meth:`GalleryImages.crop` / :meth:`GalleryImages.finish`
  split a deterministic eval transform into the part worth keeping (the decoded, resized and
  cropped uint8 image) and the cheap rest (to float, normalise), for the evaluation cache.

Bad input: an image that is missing, corrupt or truncated raises :class:`DataError` naming the
file when it is loaded (the run stops; its last checkpoint is kept, so after fixing the file
``--resume`` continues). An empty caption is a :class:`DataError` when the dataset is built.
A caption longer than the text encoder's context is truncated, as CLIP always does (the
end-of-text token takes the last position); the datasets count such captions
(``truncated_captions``), a warning says how many, and the run record keeps the counts.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

import numpy as np
from torchvision import transforms as T

from ..errors import DataError
from . import token_cache
from .token_cache import TokenCache
from .decode import DEFAULT_DECODE, SplitTransform, decode_crop, split_transform, uint8_requested
from .preprocessing import KeyFittingTransform
from .types import CaptionedImage

log = logging.getLogger(__name__)


# What Pillow raises for a file that is not a decodable image (SyntaxError: some malformed headers).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError)


def decode_rgb(path: Path) -> Image.Image:
    """Decode the whole image file at ``path`` as RGB (Pillow's errors propagate)."""
    with Image.open(path) as image:
        return image.convert("RGB")


@contextlib.contextmanager
def _named_decode_errors(item: CaptionedImage, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a missing or undecodable image file into a :class:`DataError` naming the file."""
    path = Path(item.image)
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"image file not found: {path} (image {item.image_id}); check the data root") from None
    except DECODE_ERRORS + also as error:
        raise DataError(f"cannot decode image {path} (image {item.image_id}): {error}; "
                        "replace or remove the file") from None


def load_image(item: CaptionedImage) -> Image.Image:
    """Decode an item's image as RGB, or raise :class:`DataError` naming the file."""
    if isinstance(item.image, Image.Image):
        return item.image.convert("RGB")
    with _named_decode_errors(item):
        return decode_rgb(Path(item.image))


def tokenize_all(tokenizer: Callable[[list[str]], torch.Tensor], captions: Sequence[str],
                 chunk: int = 4096, cache: TokenCache | None = None) -> torch.Tensor:
    """Token ids ``[N, context_length]`` (int64) for all captions: from ``cache`` (default: the
    one in effect, :func:`benchmark.data.token_cache.current`) when it has them, else tokenised
    in chunks (and then kept there)."""
    if not captions:
        raise DataError("no captions to tokenise")

    def tokenize() -> torch.Tensor:
        return torch.cat([tokenizer(list(captions[i:i + chunk])) for i in range(0, len(captions), chunk)]).long()

    return (cache or token_cache.current()).tokens(tokenizer, captions, tokenize)


def count_truncated(tokenizer, captions: Sequence[str], tokens: torch.Tensor) -> int | None:
    """How many captions did not fit the context and were cut; None if the tokenizer cannot tell.

    Only rows that fill the whole context (no padding left) can have been cut; those few are
    encoded again without the limit (open_clip's tokenizer: start + BPE tokens + end).
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is None or tokens.numel() == 0:
        return None
    context = tokens.shape[1]
    full = torch.nonzero(tokens[:, -1] != 0).flatten().tolist()
    return sum(1 for i in full if len(encode(captions[i])) + 2 > context)


def _captions(items: Sequence[CaptionedImage], what: str) -> list[str]:
    """Every caption in item order; an empty one is an error naming its image."""
    captions = []
    for item in items:
        for caption in item.captions:
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"image {item.describe()} has an empty caption in the {what} set; "
                                "remove the caption or fill it in")
            captions.append(caption)
    return captions


def _tokenize_checked(tokenizer, captions: list[str], what: str) -> tuple[torch.Tensor, int | None]:
    tokens = tokenize_all(tokenizer, captions)
    truncated = count_truncated(tokenizer, captions, tokens)
    if truncated:
        log.warning("%d of %d %s captions are longer than the text encoder's context (%d tokens) and were "
                    "truncated", truncated, len(captions), what, tokens.shape[1])
    return tokens, truncated


class CaptionPairs(Dataset):
    """(image, one caption) training pairs of one task.

    ``dataset[i]`` is ``(image, tokens, i)`` with the image through the whole ``transform``
    (float, normalised): what a method's hooks and key fitting read. Inside
    :func:`benchmark.data.decode.uint8_images` (the training loader) the image is the host
    stage's uint8 crop instead, by the ``decode`` path, when the transform splits
    (:mod:`benchmark.data.decode`); the training loop normalises it on the device.
    """

    def __init__(self, items: Sequence[CaptionedImage], transform: Callable, tokenizer: Callable,
                 decode: str = DEFAULT_DECODE):
        self.items = list(items)
        self.transform = transform
        self.decode = decode
        self.pair_image = [i for i, item in enumerate(self.items) for _ in item.captions]
        self.tokens, self.truncated_captions = _tokenize_checked(tokenizer, _captions(self.items, "training"),
                                                                 "training")
        self._split: tuple[Callable, SplitTransform | None] | None = None  # (transform it was made from, split)

    def __len__(self) -> int:
        return len(self.pair_image)

    def host_split(self) -> SplitTransform | None:
        """The host/device split of the transform the training loader applies (the training
        side of a :class:`~benchmark.data.preprocessing.KeyFittingTransform`); None if it does
        not split. Recomputed when ``transform`` is replaced."""
        transform = self.transform
        if isinstance(transform, KeyFittingTransform):
            transform = transform.keys if transform.fitting else transform.train
        if self._split is None or self._split[0] is not transform:
            self._split = (transform, split_transform(transform))
        return self._split[1]

    def __getitem__(self, index: int):
        item = self.items[self.pair_image[index]]
        split = self.host_split() if uint8_requested() else None
        if split is None:
            image = self.transform(load_image(item))
        elif isinstance(item.image, Image.Image):
            image = split.host(load_image(item))
        else:
            with _named_decode_errors(item, also=(RuntimeError,)):  # torchvision.io's decode errors
                image = decode_crop(item.image, split, self.decode, lambda: load_image(item))
        return image, self.tokens[index], torch.tensor(index)


class GalleryImages(Dataset):
    """The test images of one task (captions kept together, for multi-caption recall)."""

    def __init__(self, items: Sequence[CaptionedImage], transform: Callable, tokenizer: Callable):
        self.items = list(items)
        self.transform = transform
        self.caption_tokens, self.truncated_captions = _tokenize_checked(tokenizer, _captions(self.items, "test"),
                                                                         "test")
        self.caption_image = torch.tensor([i for i, item in enumerate(self.items) for _ in item.captions])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.items[index])), torch.tensor(index)

    # ---- the evaluation cache's view (benchmark.evaluation.EvaluationCache) -------------------
    def transform_parts(self) -> "TransformParts | None":
        """The eval transform as (deterministic uint8 crop, float finish), or None when it cannot
        be split that way (see :func:`split_eval_transform`)."""
        return split_eval_transform(self.transform)

    def crop(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded, resized and cropped: ``[3, H, W]`` uint8, what the cache keeps.

        :meth:`finish` of a batch of these gives exactly what ``self[index][0]`` gives (the same
        float operations, in the same order). Raises ValueError if the transform cannot be split.
        """
        parts = self.transform_parts()
        if parts is None:
            raise ValueError(f"the eval transform {self.transform!r} is not a deterministic crop + ToTensor + Normalize")
        return parts.crop(load_image(self.items[index]))

    def finish(self, crops: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` uint8 crops (on any device) to the model's float input."""
        parts = self.transform_parts()
        if parts is None:
            raise ValueError(f"the eval transform {self.transform!r} is not a deterministic crop + ToTensor + Normalize")
        return parts.finish(crops)


def worker_errors_unwrapped(batches: Iterable):
    """Iterate ``batches`` (a DataLoader). A :class:`DataError` raised in a loader worker arrives
    wrapped in torch's multi-line "Caught DataError in DataLoader worker process" text with the
    worker's traceback; it is raised again with its own one-line message."""
    try:
        yield from batches
    except DataError as error:
        text = str(error).rstrip()
        if not text.startswith("Caught DataError"):
            raise
        last = text.splitlines()[-1]  # "benchmark.errors.DataError: <the message>"
        raise DataError(last.split(": ", 1)[1] if ": " in last else last) from None


class TransformParts(NamedTuple):
    crop: Callable[[Image.Image], torch.Tensor]  # PIL image -> [3, H, W] uint8
    finish: Callable[[torch.Tensor], torch.Tensor]  # [B, 3, H, W] uint8 -> normalised float32


# Steps of torchvision / open_clip eval transforms that are deterministic functions of the image
# (by class name, so open_clip's own MaybeConvertMode and the _convert_to_rgb function count).
_DETERMINISTIC_STEPS = {"Resize", "CenterCrop", "MaybeConvertMode", "_convert_to_rgb"}
_TO_TENSOR_STEPS = {"ToTensor", "MaybeToTensor"}


def split_eval_transform(transform) -> TransformParts | None:
    """Split ``Compose([deterministic steps..., ToTensor, Normalize])`` into a uint8 crop and a finish.

    ``ToTensor`` turns a uint8 PIL image into ``uint8 -> float32 / 255`` (torchvision's
    ``functional.to_tensor``), and ``Normalize`` is ``(x - mean) / std`` per channel; the finish
    applies exactly those operations to the kept uint8 crop, so its output is bit-identical to the
    whole transform's, on the CPU or on a GPU (elementwise IEEE float32 operations). Anything else
    (a random step such as LPI's ``reference`` RandomResizedCrop, an unknown step, no Normalize) gives
    None: such a transform is applied afresh every session, as before.
    """
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    *pre, to_tensor, normalize = steps
    name = lambda step: getattr(step, "__name__", type(step).__name__)  # noqa: E731 (functions and objects)
    if (name(to_tensor) not in _TO_TENSOR_STEPS or not isinstance(normalize, T.Normalize) or normalize.inplace
            or not all(name(step) in _DETERMINISTIC_STEPS for step in pre)):
        return None
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (normalize.mean, normalize.std))

    def crop(image: Image.Image) -> torch.Tensor:
        for step in pre:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise ValueError("the eval transform's steps before ToTensor must give an RGB PIL image")
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()

    def finish(crops: torch.Tensor) -> torch.Tensor:
        x = crops.to(torch.float32).div(255)  # torchvision's to_tensor of a uint8 image
        return (x - mean.to(x.device)) / std.to(x.device)  # torchvision's normalize (sub, then div)

    return TransformParts(crop, finish)
