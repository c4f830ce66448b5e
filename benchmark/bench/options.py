"""What a bench measures and how long it takes: the options of ``python -m benchmark bench``,
checked, with defaults that depend on the device.

A full bench at ViT-B/16 shapes is quick on a GPU and slow on a CPU, so the counts adapt:
:data:`PROFILES` holds the step, repeat and size defaults for ``cuda``, ``cpu`` and ``tiny``
(the CI mode: the tiny ``clvl-tiny`` model, three methods, a handful of steps). An option given
on the command line always wins over the profile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

SECTIONS = ("hooks", "training", "data", "evaluation", "checkpoints", "device")
PRECISIONS = ("bf16", "fp16", "fp32")
GOAL_PAIRS_PER_S = 3800.0  # issue 14: lpi on ViT-B/16 in bf16, the 12-task COCO protocol in ~30 min
GOAL_MODEL = "ViT-B-16"
# Methods the evaluation section measures when they are selected: `lpi` (the workload the goal is
# about, with routing keys) and `zeroshot` (one prompt-free pass: the floor).
EVALUATION_METHODS = ("zeroshot", "lpi")
ALL_METHODS = ("zeroshot", "finetune", "l2p", "dualprompt", "coda", "sprompts", "lora", "lpi", "lpi_released")
TINY_METHODS = ("zeroshot", "finetune", "lpi")

# Defaults per profile. warmup/steps: training steps per feed; hook_repeats x hook_number calls
# per hook variant; photos: generated JPEGs for the data and training sections (photo_size, q90);
# eval_images: N of the N x 5N union gallery; repeats: of the data, evaluation and checkpoint figures.
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {"model": GOAL_MODEL, "batch_size": 64, "warmup": 5, "steps": 20, "hook_warmup": 3, "hook_repeats": 7,
             "hook_number": 5, "photos": 512, "photo_size": (640, 480), "data_items": 256, "eval_images": 500,
             "repeats": 3, "profile_steps": 3},
    "cpu": {"model": GOAL_MODEL, "batch_size": 8, "warmup": 1, "steps": 3, "hook_warmup": 1, "hook_repeats": 3,
            "hook_number": 1, "photos": 48, "photo_size": (640, 480), "data_items": 48, "eval_images": 16,
            "repeats": 1, "profile_steps": 0},
    "tiny": {"model": "clvl-tiny", "batch_size": 4, "warmup": 1, "steps": 3, "hook_warmup": 1, "hook_repeats": 2,
             "hook_number": 1, "photos": 12, "photo_size": (96, 72), "data_items": 12, "eval_images": 8,
             "repeats": 1, "profile_steps": 0},
}


@dataclass
class BenchOptions:
    """A bench's settings once defaults are filled in (:func:`resolve_options`)."""

    device: torch.device
    model: str
    methods: list[str]
    sections: list[str]
    precision: str
    batch_size: int
    steps: int
    warmup: int
    output_dir: str
    tiny: bool = False
    num_workers: int = 0
    eval_images: int = 16
    profile: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["device"] = str(self.device)
        return values


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum or str(number) != str(value).strip():
        raise ConfigError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return number


def _names(option: str, text: str | None, known: tuple[str, ...] | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{option} needs at least one name, e.g. {option} {known[0] if known else 'lpi'}")
    if known is not None:
        from ..registry import did_you_mean

        for name in names:
            if name not in known:
                raise ConfigError(f"{option}: unknown {name!r}{did_you_mean(name, list(known))}; "
                                  f"choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{option} lists a name twice ({text}); list each once")
    return names


def resolve_options(*, tiny: bool = False, model: str | None = None, methods: str | None = None,
                    sections: str | None = None, steps: str | int | None = None,
                    batch_size: str | int | None = None, device: str | None = None, precision: str | None = None,
                    output_dir: str | None = None, num_workers: str | int | None = None,
                    eval_images: str | int | None = None) -> BenchOptions:
    """Check the command line's values (a bad one is a :class:`ConfigError` saying what to give
    instead) and fill in the profile's defaults."""
    from ..config import TrainingConfig
    from ..method import get_method
    from ..run.runtime import resolve_device
    from ..precision import resolve as resolve_precision

    from ..backbone import list_architectures
    from ..registry import did_you_mean

    chosen_sections = _names("--sections", sections, SECTIONS) or list(SECTIONS)
    if model is not None and model not in list_architectures():
        hint = did_you_mean(model, list_architectures(), n=3)
        raise ConfigError(f"--model must be an open_clip architecture (the bench builds it with random weights, "
                          f"nothing is downloaded), got {model!r}{hint}; e.g. --model ViT-B-16")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    resolved_device = resolve_device(device or "auto")
    profile = dict(PROFILES["tiny" if tiny else "cuda" if resolved_device.type == "cuda" else "cpu"])
    chosen_methods = _names("--methods", methods, None) or list(TINY_METHODS if tiny else ALL_METHODS)
    for name in chosen_methods:
        get_method(name)  # an unknown method is a RegistryError naming the known ones
    if precision is None:  # what a run uses by default: training.precision auto (bf16 on CUDA, fp32 elsewhere)
        precision = resolve_precision("auto", resolved_device)
    size = profile["batch_size"] if batch_size is None else _positive("--batch-size", batch_size, 2)
    return BenchOptions(
        device=resolved_device, model=model or profile["model"], methods=chosen_methods, sections=chosen_sections,
        precision=precision, batch_size=size,
        steps=profile["steps"] if steps is None else _positive("--steps", steps),
        warmup=profile["warmup"], output_dir=output_dir or "results/bench", tiny=tiny,
        num_workers=(TrainingConfig().num_workers if num_workers is None
                     else _positive("--num-workers", num_workers, 0)),
        eval_images=profile["eval_images"] if eval_images is None else _positive("--eval-images", eval_images, 2),
        profile=profile)
