"""Image preprocessing a method can ask for, by name, for each stage of a run.

The harness's default is the backbone's own open_clip transforms: its training transform for
the training pairs (a light ``RandomResizedCrop``, scale 0.9-1, bicubic, CLIP mean/std) and its
evaluation transform for the test galleries (resize + center crop, bicubic, CLIP mean/std). A
method that must reproduce a reference implementation's preprocessing names another choice
(:meth:`benchmark.method.Method.image_transforms` returns the transforms, and
:meth:`benchmark.scenarios.streams.Streams.use_transforms` puts them on the datasets).

Choices (:func:`image_transform`):

* ``clip`` — open_clip's evaluation transform of the backbone (deterministic).
* ``clip_train`` — open_clip's training transform of the backbone.
* ``reference`` — what LPI's reference retrieval code (Kelvin-ywc/LPI,
  ``retrieval/utils/data.py``, the default ``transform`` of ``Coco`` and ``CocoEval``) applies
  for training, key fitting *and* evaluation: torchvision's ``RandomResizedCrop`` at the
  backbone's input size (224 on ViT-B/16) with torchvision's defaults (scale 0.08-1, aspect
  3/4-4/3, bilinear), ``RandomHorizontalFlip`` (p = 0.5), ``ToTensor`` and ImageNet mean/std
  normalisation. It is random, so an evaluation with it differs from draw to draw (fixed by the
  run's seed), and it feeds CLIP other statistics than CLIP was trained with.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torchvision import transforms as T

PREPROCESSING = ("clip", "clip_train", "reference")

# torchvision's / ImageNet's channel statistics, as the reference code normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_transform(size: int | tuple[int, int] = 224) -> T.Compose:
    """LPI reference code's image pipeline (see the module docstring)."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_transform(choice: str, backbone) -> Callable:
    """The transform named ``choice`` (one of :data:`PREPROCESSING`) for ``backbone``."""
    if choice == "clip":
        return backbone.preprocess_eval
    if choice == "clip_train":
        return backbone.preprocess_train
    if choice == "reference":
        return reference_transform(tuple(backbone.image_size))
    raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {choice!r}")


class KeyFittingTransform:
    """A training-set transform that switches to another one while routing keys are fitted.

    Methods fit routing keys on the task's training set (the dataset handed to
    ``after_training_exp``), so a key-fitting preprocessing that differs from the training one
    has to be switched on that same dataset. The switch is a plain attribute read at every call:
    the key-fitting pass loads its batches in the main process, and a worker started inside the
    ``with`` block (fork or spawn) copies the switched state too.
    """

    def __init__(self, train: Callable, keys: Callable):
        self.train, self.keys = train, keys
        self.fitting = False

    def __call__(self, image):
        return (self.keys if self.fitting else self.train)(image)

    @contextlib.contextmanager
    def fitting_keys(self) -> Iterator[None]:
        self.fitting = True
        try:
            yield
        finally:
            self.fitting = False

    def __repr__(self) -> str:
        return f"KeyFittingTransform(train={self.train!r}, keys={self.keys!r})"
