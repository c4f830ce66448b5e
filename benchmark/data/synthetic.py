"""Procedural image-caption data for the offline default scenario.

Each image holds one object drawn with numpy: a shape, a colour, a size, a position and a fill
texture, on a background whose style is the task's *domain*. Captions come from a small grammar
and describe only the attributes that the task is *about*; the other attributes vary freely and
are nuisance. Tasks therefore shift the domain (background), the content (which shapes occur)
and what captions talk about:

========  ======================  ===========================  ===============================  ==========
task      background              shapes                       captions describe                nuisance
========  ======================  ===========================  ===============================  ==========
colours   plain, dark             circle, square, triangle     colour, shape, size              position
backdrops named plain colour      cross, diamond, ring         shape, size, background colour   colour
textures  dark colour gradient    bar, column, frame           fill pattern, shape, size        colour
========  ======================  ===========================  ===============================  ==========

The shape sets are disjoint so that, in a ``union`` gallery, a caption of one task never also
describes an image of another task truthfully: a cross-task match is an error, not an
ambiguity. A model fine-tuned on ``backdrops`` and ``textures`` learns that the object's colour
does not matter (and, on ``backdrops``, that colour words name the background), which is
exactly what ``colours`` needs, so sequential fine-tuning forgets.

The backbone for this scenario is pretrained by the harness on a *base* split: objects of
every shape and fill on dark or plain coloured backgrounds, in eight of the twelve colours, with
captions that each name a few of colour, shape, size, position, fill and background. Zero-shot
retrieval therefore works but is clearly improvable: the ``colours`` task adds four colour words
the backbone never saw (pink, brown, grey, lime), ``textures`` brings gradient backgrounds, and
every task's captions combine the attributes in ways the base captions never do.

Test images of a task take distinct combinations of the described attributes, so every test
caption has one right image up to paraphrase; several captions (paraphrases) per test image.
Everything is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from .types import CaptionedImage

GENERATOR_VERSION = 5  # bump when drawings or captions change: it invalidates cached backbones

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "bar", "column", "frame")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 220, 50),
    "magenta": (210, 60, 210), "cyan": (60, 210, 220), "orange": (240, 140, 30), "white": (235, 235, 235),
    # Never named in the base split: the backbone meets these words first in the `colours` task.
    "pink": (250, 160, 190), "brown": (130, 80, 40), "grey": (140, 140, 140), "lime": (170, 240, 90),
}
BASE_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
SIZES = {"small": 5, "large": 9}  # radius in pixels at 32x32
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "centre": (16, 16)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
TEXTURES = ("solid", "striped", "hatched", "dotted", "checkered")
PATTERNS = TEXTURES[1:]  # the textures task never draws solid objects
TEXTURE_NOUNS = {"solid": "plain", "striped": "stripes", "hatched": "hatching", "dotted": "dots", "checkered": "checks"}
BACKDROPS = {"red": (120, 30, 30), "green": (30, 110, 40), "blue": (30, 50, 140), "yellow": (130, 120, 30),
             "purple": (90, 40, 120), "teal": (20, 100, 100)}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str
    texture: str
    backdrop: str = "none"  # the named background colour of the `backdrops` task


@dataclass(frozen=True)
class TaskSpec:
    """How one task draws images and writes captions."""

    name: str
    background: str  # "dark", "backdrop" (a named plain colour), "gradient"
    described: tuple[str, ...]  # attributes named in captions; the others are nuisance
    templates: tuple[str, ...]  # caption paraphrases (str.format with the attribute words)
    fixed: tuple[tuple[str, str], ...] = ()  # attributes held constant, e.g. (("size", "large"),)
    shapes: tuple[str, ...] = SHAPES  # the task's own shapes: disjoint across tasks (see below)
    textures: tuple[str, ...] = ("solid",)


TASKS: dict[str, TaskSpec] = {
    "colours": TaskSpec(
        "colours", "dark", ("colour", "shape", "size"),
        ("a {size} {colour} {shape}", "a {colour} {shape} that is {size}",
         "there is a {size} {shape} coloured {colour}", "{size} {shape} in {colour}"),
        shapes=("circle", "square", "triangle")),
    "backdrops": TaskSpec(
        "backdrops", "backdrop", ("shape", "size", "backdrop"),
        ("a {size} {shape} on a {backdrop} background", "a {backdrop} background with a {size} {shape}",
         "{size} {shape} in front of {backdrop}", "there is a {size} {shape} on {backdrop}"),
        shapes=("cross", "diamond", "ring")),
    "textures": TaskSpec(
        "textures", "gradient", ("texture", "shape", "size"),
        ("a {size} {texture} {shape}", "a {size} {shape} with {pattern}",
         "a {shape} filled with {pattern}, {size}", "{texture} {shape} that is {size}"),
        shapes=("bar", "column", "frame"), textures=PATTERNS),
}
TASK_ORDER = ("colours", "backdrops", "textures")

# The pretraining split: objects of every shape and fill on dark or plain coloured backgrounds;
# each caption names a few of colour, shape, size, position, fill and background.
BASE_TASK = TaskSpec(
    "base", "varied", ("colour", "shape", "size", "position", "texture", "backdrop"),
    ("a {size} {colour} {shape} {where}", "a {colour} {shape} on a {backdrop} background",
     "a {size} {texture} {shape} coloured {colour}", "{where} there is a {colour} {shape}, {size}"),
    textures=TEXTURES)

_VALUES = {"colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}


def _values(spec: TaskSpec, key: str) -> tuple[str, ...]:
    if key == "shape":
        return spec.shapes
    if key == "texture":
        return spec.textures
    if key == "colour" and spec is BASE_TASK:
        return BASE_COLOURS
    if key == "backdrop":
        if spec is BASE_TASK:
            return (*BACKDROPS, "dark")
        return tuple(BACKDROPS) if spec.background == "backdrop" else ("none",)
    return _VALUES[key]


def caption(spec: TaskSpec, attrs: Attributes, template: str) -> str:
    words = {"shape": attrs.shape, "colour": attrs.colour, "size": attrs.size,
             "where": POSITION_PHRASES[attrs.position], "texture": attrs.texture,
             "pattern": TEXTURE_NOUNS[attrs.texture], "backdrop": attrs.backdrop}
    return template.format(**words)


def draw(attrs: Attributes, background: str, rng: np.random.Generator) -> Image.Image:
    """Render one 32x32 RGB image."""
    n = IMAGE_SIZE
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    image = _background(background, rng, attrs.backdrop)

    radius = SIZES[attrs.size]
    cx, cy = POSITIONS[attrs.position]
    cx = float(np.clip(cx + rng.integers(-2, 3), radius, n - 1 - radius))
    cy = float(np.clip(cy + rng.integers(-2, 3), radius, n - 1 - radius))
    mask = _shape_mask(attrs.shape, xs - cx, ys - cy, radius)

    colour = np.clip(np.array(COLOURS[attrs.colour], np.float32) + rng.integers(-15, 16, 3), 0, 255)
    pattern = _texture(attrs.texture, xs.astype(int), ys.astype(int))
    fill = np.where(pattern[..., None], colour, colour * 0.3)
    image = np.where(mask[..., None], fill, image)
    return Image.fromarray(image.astype(np.uint8), "RGB")


def _background(style: str, rng: np.random.Generator, backdrop: str = "none") -> np.ndarray:
    n = IMAGE_SIZE
    if style == "varied":  # the base split: dark, or a plain colour
        style = "dark" if backdrop == "dark" else "backdrop"
    if style == "dark":
        return np.full((n, n, 3), rng.integers(0, 30), np.float32)
    if style == "backdrop":  # a named plain colour, slightly jittered
        colour = np.array(BACKDROPS[backdrop], np.float32) + rng.integers(-10, 11, 3)
        return np.broadcast_to(colour, (n, n, 3)).astype(np.float32).copy()
    if style == "gradient":
        a, b = rng.integers(20, 80, 3), rng.integers(20, 80, 3)
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :, None]
        return np.broadcast_to(a * (1 - t) + b * t, (n, n, 3)).astype(np.float32)
    raise ValueError(f"unknown background {style!r}")


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "bar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.4 * r)
    if shape == "column":
        return (np.abs(dx) <= 0.4 * r) & (np.abs(dy) <= r)
    if shape == "frame":
        edge = np.maximum(np.abs(dx), np.abs(dy))
        return (edge <= 0.9 * r) & (edge >= 0.5 * r)
    if shape == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if texture == "solid":
        return np.ones_like(xs, dtype=bool)
    if texture == "striped":
        return (xs // 2) % 2 == 0
    if texture == "hatched":
        return ((xs + ys) // 2) % 2 == 0
    if texture == "dotted":
        return (xs % 4 < 2) & (ys % 4 < 2)
    if texture == "checkered":
        return (xs // 3 + ys // 3) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _random_attributes(spec: TaskSpec, rng: np.random.Generator, described: dict[str, str] | None = None) -> Attributes:
    values = {key: str(rng.choice(_values(spec, key))) for key in ("shape", "colour", "size", "position", "texture", "backdrop")}
    values.update(dict(spec.fixed))
    values.update(described or {})
    return Attributes(**values)


def _items(spec: TaskSpec, attrs_list: list[Attributes], rng: np.random.Generator, captions_per_image: int,
           prefix: str) -> list[CaptionedImage]:
    items = []
    for index, attrs in enumerate(attrs_list):
        templates = rng.permutation(len(spec.templates))[:captions_per_image]
        captions = tuple(caption(spec, attrs, spec.templates[t]) for t in templates)
        image = draw(attrs, spec.background, rng)
        items.append(CaptionedImage(image=image, captions=captions, image_id=f"{prefix}-{index:05d}", task=spec.name))
    return items


def make_task(spec: TaskSpec, *, train_images: int, test_images: int, captions_per_image: int,
              seed: int) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """Draw one task's train and test split.

    Test images take *distinct* combinations of the described attributes (so at most as many
    as there are combinations); train images draw them at random.
    """
    rng = np.random.default_rng([seed, GENERATOR_VERSION, sum(map(ord, spec.name))])
    fixed = dict(spec.fixed)
    free = [key for key in spec.described if key not in fixed]
    combos = [dict(zip(free, values)) for values in product(*(_values(spec, key) for key in free))]
    if test_images > len(combos):
        raise ValueError(f"task {spec.name!r} has only {len(combos)} distinct test combinations; "
                         f"ask for at most that many test images")
    chosen = rng.permutation(len(combos))[:test_images]
    test_attrs = [_random_attributes(spec, rng, combos[i]) for i in chosen]
    # The test split is drawn first, so its images do not depend on the training-set size.
    test = _items(spec, test_attrs, rng, captions_per_image, f"{spec.name}-test")
    train_attrs = [_random_attributes(spec, rng) for _ in range(train_images)]
    train = _items(spec, train_attrs, rng, captions_per_image, f"{spec.name}-train")
    return train, test


def make_base_split(*, images: int, captions_per_image: int, seed: int) -> list[CaptionedImage]:
    """The pretraining split for the synthetic backbone (see the module docstring)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, 7])
    attrs = [_random_attributes(BASE_TASK, rng) for _ in range(images)]
    return _items(BASE_TASK, attrs, rng, captions_per_image, "base")
