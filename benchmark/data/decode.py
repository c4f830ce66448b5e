"""Training images: decoded on the host into uint8 crops, normalised on the device.

A training transform such as open_clip's (``RandomResizedCrop`` → mode conversion →
``ToTensor`` → ``Normalize``) ends with two steps that only turn bytes into model input:
scaling by 1/255 and subtracting the channel mean / dividing by the channel std. Done in the
data loader they quadruple what travels from the loader to the device (float32 instead of
uint8: 602 KB instead of 150 KB per 224×224 image) and cost worker time. So the transform is
*split* (:func:`split_transform`):

* the **host stage** runs in the data loader: decode, the geometric steps (crop, resize,
  flip), and ``uint8 [3, H, W]`` out;
* the **device stage** (:class:`ModelInput`) runs in the training loop right after the batch
  is moved: ``float32``, ``/ 255``, ``- mean``, ``/ std`` — the very operations of
  torchvision's ``ToTensor`` and ``Normalize``, in their order, so the model input is the
  same float tensor as the unsplit transform gives (bit for bit on the CPU).

A transform that cannot be split (not a ``Compose`` ending in ``ToTensor`` + ``Normalize``,
e.g. a method's own callable) runs whole on the host and its float output passes the device
stage unchanged.

**Decode paths** (``training.decode``, :data:`DECODE_PATHS`). How the host stage gets from the
file to the crop:

* ``pil`` (default, the reference): Pillow decodes the whole image, then the transform's own
  steps run on it. Exactly today's preprocessing.
* ``pil-draft``: for a ``RandomResizedCrop`` transform, the crop box is drawn first (from the
  image size in the file header, with the same random draws as the transform makes), then
  Pillow decodes the JPEG at the smallest DCT scale (1/1, 1/2, 1/4 or 1/8, Pillow's
  ``Image.draft``) that still leaves the box at least as large as the output, and the box is
  resized from that reduced image. It differs from ``pil`` only where a reduction happened:
  the JPEG decoder's scaled inverse DCT averages pixels where ``pil`` decodes them all and the
  bicubic filter then averages them, and the resize starts from a sub-pixel box of the
  reduced image. Files that are not JPEG, in-memory images and reductions of 1 give exactly
  ``pil``'s crop.
* ``torchvision``: ``torchvision.io.decode_image`` (libjpeg-turbo for JPEG, libpng, ...)
  on the file's bytes, then the crop and resize on the uint8 tensor
  (``torchvision.transforms.v2.functional.resized_crop``, antialiased); the crop box and the
  flip come from the same random draws as ``pil``'s. It differs from ``pil`` by the resize
  arithmetic (torch's uint8 bicubic kernel against Pillow's, which round differently) and by
  the decoder library's build.

Both fast paths are tested against ``pil`` (``tests/test_data_pipeline.py``: mean absolute
difference of the normalised crops on generated photo-like JPEGs, same crop and flip).
Transforms they cannot follow (no ``RandomResizedCrop`` first, or later steps they do not
know) use ``pil``; :func:`effective_decode` says which path a transform really gets, and the
run's provenance records it with the decoder libraries' versions.

Code followed: torchvision's ``transforms/transforms.py`` (``RandomResizedCrop.get_params``,
``ToTensor``, ``Normalize``), ``transforms/functional.py`` (``to_tensor``, ``resized_crop``),
Pillow's ``JpegImagePlugin.JpegImageFile.draft`` (how the DCT scale is chosen), open_clip's
``transform.py`` (``MaybeConvertMode``, ``MaybeToTensor``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..config import DECODES

DECODE_PATHS = {
    "pil": "Pillow decodes the whole image, then the transform's own steps (the reference)",
    "pil-draft": "Pillow decodes JPEGs at a reduced DCT scale (Image.draft) no smaller than the crop needs, "
                 "then the same crop and resize",
    "torchvision": "torchvision.io decodes the file (libjpeg-turbo for JPEG), crop and resize on uint8 tensors "
                   "(transforms.v2)",
}
DEFAULT_DECODE = "pil"
assert tuple(DECODE_PATHS) == DECODES, "benchmark.config.DECODES names the same paths"

# Set while the training loader fetches an item: datasets then return the host stage's uint8
# crop instead of the whole transform's float tensor (see benchmark.data.loading).
_UINT8_IMAGES = contextvars.ContextVar("uint8_images", default=False)


@contextlib.contextmanager
def uint8_images() -> Iterator[None]:
    """Inside this block, :class:`~benchmark.data.torch_datasets.CaptionPairs` items carry the
    host stage's uint8 crop (when their transform splits)."""
    token = _UINT8_IMAGES.set(True)
    try:
        yield
    finally:
        _UINT8_IMAGES.reset(token)


def uint8_requested() -> bool:
    return _UINT8_IMAGES.get()


@dataclass(frozen=True)
class ModelInput:
    """The device stage: uint8 ``[..., 3, H, W]`` → float32 model input.

    ``x / 255`` then ``(x - mean) / std``, per channel: what ``ToTensor`` and ``Normalize`` do,
    in their order, so the result equals the unsplit transform's.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32).div(255)
        mean, std = _channel_statistics(self.mean, self.std, x.device)
        return x.sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _channel_statistics(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """``[3, 1, 1]`` float32 mean and std on ``device``, made once: copying them there at every
    step would make the host wait for the device each time."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(device))


def to_model_input(images: Tensor, model_input: ModelInput | None, device: torch.device | None = None) -> Tensor:
    """Images as they leave a loader → model input on ``device`` (default: where they are).

    uint8 images (a split transform's host stage) are normalised by ``model_input`` after the
    copy; float images (an unsplit transform, already normalised) pass unchanged.
    """
    if device is not None:
        images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    if model_input is None:
        raise RuntimeError("uint8 training images but no ModelInput to normalise them: the training transform "
                           "was split without telling the training loop")
    return model_input(images)


# ------------------------------------------------------------------------------------------ split
@dataclass
class SplitTransform:
    """A transform cut in two: ``steps`` (PIL → PIL, run on the host) and the device stage."""

    steps: list[Callable]
    model_input: ModelInput

    @property
    def crop(self) -> T.RandomResizedCrop | None:
        """The leading ``RandomResizedCrop`` the fast decode paths follow, if any."""
        first = self.steps[0] if self.steps else None
        return first if isinstance(first, T.RandomResizedCrop) else None

    def host(self, image: Image.Image) -> Tensor:
        """The host stage on a decoded RGB image: every step, then uint8 ``[3, H, W]``."""
        for step in self.steps:
            image = step(image)
        return _uint8(image)


def _uint8(image) -> Tensor:
    if isinstance(image, Tensor):
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return TF.pil_to_tensor(image)


def split_transform(transform) -> SplitTransform | None:
    """The host/device split of ``transform``, or None when it does not end in
    ``ToTensor`` + ``Normalize`` (it then runs whole on the host)."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, T.ToTensor) or not isinstance(normalize, T.Normalize) or normalize.inplace:
        return None
    if any(isinstance(step, (T.ToTensor, T.Normalize, T.PILToTensor)) for step in steps[:-2]):
        return None
    mean, std = tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return SplitTransform(steps=list(steps[:-2]), model_input=ModelInput(mean, std))


# ----------------------------------------------------------------------------- the decode paths
def _tensor_safe(step) -> bool:
    """Steps the ``torchvision`` path may run on a uint8 tensor: flips, and open_clip's mode
    conversion (a no-op on tensors)."""
    return isinstance(step, T.RandomHorizontalFlip) or type(step).__name__ == "MaybeConvertMode"


def effective_decode(split: SplitTransform | None, decode: str) -> str:
    """The decode path a split transform really gets under ``decode`` (``pil`` when the fast
    path cannot follow it)."""
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    if decode == "pil" or split is None or split.crop is None:
        return "pil"
    if decode == "torchvision" and not all(_tensor_safe(step) for step in split.steps[1:]):
        return "pil"
    return decode


def decode_crop(source: Path | Image.Image, split: SplitTransform, decode: str,
                full_decode: Callable[[], Image.Image]) -> Tensor:
    """The host stage of ``split`` for one image, by decode path; ``full_decode`` is the
    reference decode (with the caller's error handling). Random draws: the same as the
    transform's own (crop box first, then the later steps' draws)."""
    decode = effective_decode(split, decode)
    if decode == "pil" or not isinstance(source, (str, Path)):
        return split.host(full_decode())
    if decode == "pil-draft":
        return _draft_crop(Path(source), split, full_decode)
    return _torchvision_crop(Path(source), split)


def _draft_crop(path: Path, split: SplitTransform, full_decode: Callable[[], Image.Image]) -> Tensor:
    crop = split.crop
    with Image.open(path) as image:
        if image.format != "JPEG":
            return split.host(full_decode())
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)  # the header's size, no decode
        out_h, out_w = crop.size
        full_w, full_h = image.size
        # Pillow picks the largest DCT reduction that keeps the image at least this big, so the
        # box, reduced alike, is still at least the output size.
        image.draft("RGB", (max(1, math.ceil(full_w * out_w / width)), max(1, math.ceil(full_h * out_h / height))))
        rgb = image.convert("RGB")
    resample = TF.pil_modes_mapping[crop.interpolation]
    if rgb.size == (full_w, full_h):  # no reduction: exactly torchvision's crop-then-resize
        resized = rgb.crop((left, top, left + width, top + height)).resize((out_w, out_h), resample)
    else:  # pixel (i, j) of the reduced image is the s×s block at (s*i, s*j) of the full one
        s = _draft_scale(full_w, full_h, rgb.size)
        box = (left / s, top / s, (left + width) / s, (top + height) / s)
        resized = rgb.resize((out_w, out_h), resample, box=box)
    for step in split.steps[1:]:
        resized = step(resized)
    return _uint8(resized)


def _draft_scale(full_w: int, full_h: int, reduced: tuple[int, int]) -> float:
    """The integer DCT scale s (1, 2, 4, 8) with reduced = ceil(full / s)."""
    for s in (8, 4, 2, 1):
        if (full_w + s - 1) // s == reduced[0] and (full_h + s - 1) // s == reduced[1]:
            return float(s)
    return full_w / reduced[0]


def _torchvision_crop(path: Path, split: SplitTransform) -> Tensor:
    from torchvision.transforms.v2 import functional as F2

    ImageReadMode, decode_image = _torchvision_io()
    crop = split.crop
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)  # a missing file: FileNotFoundError
    image = decode_image(data, mode=ImageReadMode.RGB)
    top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
    out = F2.resized_crop(image, top, left, height, width, list(crop.size), interpolation=crop.interpolation,
                          antialias=True)
    for step in split.steps[1:]:
        out = step(out)
    return out.contiguous()


@functools.lru_cache(maxsize=None)
def _torchvision_io():
    """torchvision.io's decoder. torchvision 0.29 deprecates its image decoding in favour of
    TorchCodec (a DeprecationWarning on every use); it still works, and is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image
    return ImageReadMode, _quiet(decode_image)


def _quiet(function):
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return function(*args, **kwargs)
    return call


# ------------------------------------------------------------------- measuring (for `bench`)
def pairs_for_files(files: Sequence[Path], transform, decode: str, tokenizer: Callable | None = None):
    """A :class:`~benchmark.data.torch_datasets.CaptionPairs` training set over image
    ``files`` (one caption each; ``tokenizer`` default: two zero tokens) decoding by
    ``decode``: put it in :func:`benchmark.data.loading.train_loader` to measure the real
    loader with workers."""
    from .torch_datasets import CaptionPairs
    from .types import CaptionedImage

    items = [CaptionedImage(image=Path(f), captions=("x",), image_id=str(i)) for i, f in enumerate(files)]
    tokenizer = tokenizer or (lambda texts: torch.zeros(len(texts), 2, dtype=torch.long))
    return CaptionPairs(items, transform, tokenizer, decode=decode)


def crop_dataset(files: Sequence[Path], transform, decode: str):
    """A dataset of the host stage's uint8 crops of ``files`` under ``transform`` and ``decode``
    (what a training loader's workers compute, without the captions)."""
    pairs = pairs_for_files(files, transform, decode)

    class Crops(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, index):
            with uint8_images():
                return pairs[index][0]

    return Crops()
