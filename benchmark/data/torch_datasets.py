"""Torch datasets over :class:`~benchmark.data.types.CaptionedImage` lists.

Avalanche moves every field of a mini-batch to the device, so every field is a tensor:
captions are tokenised once, up front, with the backbone's tokenizer.

* :class:`CaptionPairs` — training items ``(image, tokens, pair_index)``: one per (image,
  caption) pair, image through the *train* transform.
* :class:`GalleryImages` — evaluation items ``(image, image_index)``: one per image, through
  the backbone's *eval* preprocessing; the captions of the set are available as one token
  tensor (:attr:`GalleryImages.caption_tokens`) with their image index
  (:attr:`GalleryImages.caption_image`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .types import CaptionedImage


def load_image(item: CaptionedImage) -> Image.Image:
    """Decode an item's image as RGB, or raise :class:`DataError` naming the file."""
    if isinstance(item.image, Image.Image):
        return item.image.convert("RGB")
    path = Path(item.image)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path} (image {item.image_id}); check the data root") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot decode image {path} (image {item.image_id}): {error}; "
                        "replace or remove the file") from None


def tokenize_all(tokenizer: Callable[[list[str]], torch.Tensor], captions: Sequence[str],
                 chunk: int = 4096) -> torch.Tensor:
    """Token ids ``[N, context_length]`` for all captions (tokenised in chunks)."""
    parts = [tokenizer(list(captions[i:i + chunk])) for i in range(0, len(captions), chunk)]
    if not parts:
        raise DataError("no captions to tokenise")
    return torch.cat(parts).long()


class CaptionPairs(Dataset):
    """(image, one caption) training pairs of one task."""

    def __init__(self, items: Sequence[CaptionedImage], transform: Callable, tokenizer: Callable):
        self.items = list(items)
        self.transform = transform
        self.pair_image = [i for i, item in enumerate(self.items) for _ in item.captions]
        self.tokens = tokenize_all(tokenizer, [c for item in self.items for c in item.captions])

    def __len__(self) -> int:
        return len(self.pair_image)

    def __getitem__(self, index: int):
        item = self.items[self.pair_image[index]]
        return self.transform(load_image(item)), self.tokens[index], torch.tensor(index)


class GalleryImages(Dataset):
    """The test images of one task (captions kept together, for multi-caption recall)."""

    def __init__(self, items: Sequence[CaptionedImage], transform: Callable, tokenizer: Callable):
        self.items = list(items)
        self.transform = transform
        self.caption_tokens = tokenize_all(tokenizer, [c for item in self.items for c in item.captions])
        self.caption_image = torch.tensor([i for i, item in enumerate(self.items) for _ in item.captions])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.items[index])), torch.tensor(index)
