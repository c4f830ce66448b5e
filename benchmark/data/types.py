"""The one record type every reader produces.

Readers turn a caption dataset in whatever format it ships in into a list of
:class:`CaptionedImage`: one entry per *image*, with all of that image's captions. Training
later expands it to (image, one caption) pairs; evaluation keeps the captions together so that
image->text recall can count a hit on any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

# A file on disk, or an image already in memory (the synthetic scenario draws its own).
ImageSource = Union[Path, Image.Image]


@dataclass(frozen=True)
class CaptionedImage:
    """One image and all of its captions.

    Attributes:
        image: path to the image file (absolute, or relative to the working directory), or a
            PIL image held in memory.
        captions: the image's captions, in source order, at least one.
        image_id: a stable identifier, unique within one reader's output (used for provenance,
            de-duplication and error messages).
        task: the task this image belongs to when the source says so (a COCO supercategory, the
            ``task`` column of a custom file), else ``None``.
    """

    image: ImageSource
    captions: tuple[str, ...]
    image_id: str
    task: str | None = None

    def describe(self) -> str:
        """A short name for error messages: the file path, or the id of an in-memory image."""
        return str(self.image) if isinstance(self.image, (str, Path)) else f"<in-memory image {self.image_id}>"
