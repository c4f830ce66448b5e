"""Building a method for a scenario, its training loop and what its hooks are given
(:func:`train_data`), the one way every run does it.

Both the runner (:mod:`benchmark.run.loop`) and the conformance check (:mod:`benchmark.testing`)
build through here, so a check run and a real run with the same seed draw the same random
numbers in the same order and get the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..method import Method

from ..backbone import ClipBackbone
from ..config import TrainingConfig
from ..data.token_cache import TokenCache
from ..errors import ConfigError
from ..scenarios import Scenario
from ..scenarios.streams import Streams, make_streams
# train_data: what the training loop hands a method's hooks; a rebuilt run replays them with it.
from ..strategy import ContrastiveStrategy, train_data  # noqa: F401
from .runtime import seed_everything


@dataclass
class MethodSetup:
    """A method built as a run builds it: with its backbone, on the scenario's streams."""

    method: Method
    backbone: ClipBackbone
    scenario: Scenario
    streams: Streams
    device: torch.device
    seed: int = 0  # the run's seed (also of the training data's order and augmentation)


def build_method(method_cls: type[Method], params: Any, scenario: Scenario, device: torch.device, *, seed: int,
                 load_backbone: Callable[[], ClipBackbone], config_errors: bool = False,
                 token_cache: TokenCache | None = None) -> MethodSetup:
    """Seed, load the backbone, wrap the scenario's data for it, seed again and build the method.

    ``config_errors``: a ``ValueError`` from the method's constructor (it rejected its config)
    becomes a :class:`~benchmark.errors.ConfigError`, which the CLI prints as one line; without
    it (:mod:`benchmark.testing`) the error propagates as the method raised it.
    ``token_cache``: where caption token ids are kept between runs
    (:mod:`benchmark.data.token_cache`; None: this process only).
    """
    seed_everything(seed)
    backbone = load_backbone()
    streams = make_streams(scenario, backbone, token_cache)
    seed_everything(seed)  # building the backbone may have drawn random numbers
    try:
        method = method_cls(backbone, params, scenario.num_tasks).to(device)
    except ValueError as error:
        if not config_errors:
            raise
        raise ConfigError(f"method {method_cls.name!r}: {error}") from None
    streams.use_transforms(**method.image_transforms())
    return MethodSetup(method=method, backbone=backbone, scenario=scenario, streams=streams, device=device, seed=seed)


def build_strategy(setup: MethodSetup, training: TrainingConfig, plugins: Iterable = (),
                   step_hook: Callable[[ContrastiveStrategy], None] | None = None) -> ContrastiveStrategy:
    """The training loop for ``setup.method`` with the settings of ``training``; ``plugins`` are
    all of them (the method's own included), in the order they are to be called. The training
    sets decode by ``training.decode``; the loop normalises their uint8 crops on the device."""
    return ContrastiveStrategy(
        method=setup.method, train_epochs=training.epochs, train_mb_size=training.batch_size,
        eval_mb_size=training.eval_batch_size, device=setup.device, task_names=setup.scenario.task_names,
        plugins=list(plugins), num_workers=training.num_workers, step_hook=step_hook, seed=setup.seed,
        precision=training.precision, compile=training.compile,
        image_input=training_images(setup.streams, training.decode))


def training_images(streams: Streams, decode: str):
    """Put the decode path on every training set; the device stage of their (one) training
    transform, or None when it does not split (see :mod:`benchmark.data.decode`)."""
    inputs = set()
    for pairs in streams.train_pairs or []:
        pairs.decode = decode
        split = pairs.host_split()
        inputs.add(split.model_input if split is not None else None)
    if len(inputs) > 1:
        raise RuntimeError("the training sets of one run have different normalisations")
    return inputs.pop() if inputs else None

