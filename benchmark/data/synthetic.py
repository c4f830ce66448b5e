"""Procedural image-caption data for the offline default scenario.

Each image holds one object drawn with numpy: a shape (circle, square, triangle, cross,
diamond, ring), a colour, a size, a position and a fill texture, on a background whose style is
the task's *domain*. Captions come from a small grammar and describe only the attributes that
the task is *about*; the other attributes vary freely and are nuisance. Tasks therefore shift
both the domain (background) and the content (what captions talk about):

=========  ==================  ==================================  ============================
task       background          captions describe                   nuisance
=========  ==================  ==================================  ============================
colours    plain, dark         colour, shape, size                 position
layout     grey pixel noise    shape, size, position               colour
textures   colour gradient     texture (fill), shape, position     colour (size is always large)
=========  ==================  ==================================  ============================

A model fine-tuned on ``layout`` learns that colour does not matter, which is exactly what
``colours`` needs: sequential fine-tuning forgets. The backbone for this scenario is pretrained
by the harness on a *base* split (solid objects on dark backgrounds, captions naming every
attribute except texture), so zero-shot retrieval works but is clearly improvable, worst on the
shifted domains and on the texture words it never saw.

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

GENERATOR_VERSION = 1  # bump when drawings or captions change: it invalidates cached backbones

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 220, 50),
    "magenta": (210, 60, 210), "cyan": (60, 210, 220), "orange": (240, 140, 30), "white": (235, 235, 235),
}
SIZES = {"small": 5, "large": 9}  # radius in pixels at 32x32
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "centre": (16, 16)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
TEXTURES = ("solid", "striped", "dotted", "checkered")
TEXTURE_NOUNS = {"solid": "plain", "striped": "stripes", "dotted": "dots", "checkered": "checks"}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str
    texture: str


@dataclass(frozen=True)
class TaskSpec:
    """How one task draws images and writes captions."""

    name: str
    background: str  # "dark", "noise", "gradient"
    described: tuple[str, ...]  # attributes named in captions; the others are nuisance
    templates: tuple[str, ...]  # caption paraphrases (str.format with the attribute words)
    fixed: tuple[tuple[str, str], ...] = ()  # attributes held constant, e.g. (("size", "large"),)


TASKS: dict[str, TaskSpec] = {
    "colours": TaskSpec(
        "colours", "dark", ("colour", "shape", "size"),
        ("a {size} {colour} {shape}", "a {colour} {shape} that is {size}",
         "there is a {size} {shape} coloured {colour}", "{size} {shape} in {colour}"),
        fixed=(("texture", "solid"),)),
    "layout": TaskSpec(
        "layout", "noise", ("shape", "size", "position"),
        ("a {size} {shape} {where}", "a {shape}, {size}, {where}",
         "{where} there is a {size} {shape}", "{size} {shape} placed {where}"),
        fixed=(("texture", "solid"),)),
    "textures": TaskSpec(
        "textures", "gradient", ("texture", "shape", "position"),
        ("a {texture} {shape} {where}", "a {shape} with {pattern} {where}",
         "{where} a {shape} filled with {pattern}", "{texture} {shape} {where}"),
        fixed=(("size", "large"),)),
}
TASK_ORDER = ("colours", "layout", "textures")

# The pretraining split: solid objects on dark backgrounds, captions naming colour, shape,
# size and position (never texture, never the noise/gradient domains).
BASE_TASK = TaskSpec(
    "base", "dark", ("colour", "shape", "size", "position"),
    ("a {size} {colour} {shape} {where}", "{where} there is a {colour} {shape}, {size}",
     "a {colour} {shape} {where}", "a {size} {shape} coloured {colour}"),
    fixed=(("texture", "solid"),))

_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
           "texture": TEXTURES}


def caption(spec: TaskSpec, attrs: Attributes, template: str) -> str:
    words = {"shape": attrs.shape, "colour": attrs.colour, "size": attrs.size,
             "where": POSITION_PHRASES[attrs.position], "texture": attrs.texture,
             "pattern": TEXTURE_NOUNS[attrs.texture]}
    return template.format(**words)


def draw(attrs: Attributes, background: str, rng: np.random.Generator) -> Image.Image:
    """Render one 32x32 RGB image."""
    n = IMAGE_SIZE
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    image = _background(background, rng)

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


def _background(style: str, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE
    if style == "dark":
        return np.full((n, n, 3), rng.integers(0, 30), np.float32)
    if style == "noise":
        return rng.integers(60, 140, (n, n, 1)).repeat(3, axis=2).astype(np.float32)
    if style == "gradient":
        a, b = rng.integers(40, 120, 3), rng.integers(40, 120, 3)
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
    if shape == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if texture == "solid":
        return np.ones_like(xs, dtype=bool)
    if texture == "striped":
        return (xs // 2) % 2 == 0
    if texture == "dotted":
        return (xs % 4 < 2) & (ys % 4 < 2)
    if texture == "checkered":
        return (xs // 3 + ys // 3) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _random_attributes(spec: TaskSpec, rng: np.random.Generator, described: dict[str, str] | None = None) -> Attributes:
    values = {key: str(rng.choice(options)) for key, options in _VALUES.items()}
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
    combos = [dict(zip(free, values)) for values in product(*(_VALUES[key] for key in free))]
    if test_images > len(combos):
        raise ValueError(f"task {spec.name!r} has only {len(combos)} distinct test combinations; "
                         f"ask for at most that many test images")
    chosen = rng.permutation(len(combos))[:test_images]
    test_attrs = [_random_attributes(spec, rng, combos[i]) for i in chosen]
    train_attrs = [_random_attributes(spec, rng) for _ in range(train_images)]
    train = _items(spec, train_attrs, rng, captions_per_image, f"{spec.name}-train")
    test = _items(spec, test_attrs, rng, captions_per_image, f"{spec.name}-test")
    return train, test


def make_base_split(*, images: int, captions_per_image: int, seed: int) -> list[CaptionedImage]:
    """The pretraining split for the synthetic backbone (see the module docstring)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, 7])
    attrs = [_random_attributes(BASE_TASK, rng) for _ in range(images)]
    return _items(BASE_TASK, attrs, rng, captions_per_image, "base")
