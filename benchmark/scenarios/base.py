"""What a scenario is, and the registry that names them.

A scenario is a fixed task stream: for each task, a training split (images with captions,
expanded to pairs for training) and a test split (images with all their captions). It is built
from data by a *builder* registered under a name, with an options dataclass that checks its own
values. :func:`benchmark.scenarios.streams.make_streams` turns it into an Avalanche benchmark.

Scenarios are found by name (:data:`SCENARIOS`, a :class:`benchmark.registry.Registry`): the
built-in ones (imported on first use), those added with :func:`register_scenario`, and those an
installed package publishes under the entry-point group ``benchmark.scenarios`` (the entry
point names a :class:`ScenarioBuilder` object, e.g. ``mypkg.scenarios:MY_SCENARIO``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.types import CaptionedImage
from ..errors import ConfigError, DataError
from ..registry import BrokenEntry, Registry


@dataclass
class Scenario:
    """A task stream, ready to be turned into Avalanche experiences.

    Attributes:
        name: the registry name (or the user scenario's own name).
        task_names: one per task, in stream order.
        train / test: per task, the images with their captions.
        default_backbone: the backbone used when the config names none.
        info: provenance recorded with every run (source files, assignment rules, options,
            counts of dropped items).
        method_defaults: per method name, hyperparameters this scenario recommends (applied
            under the user's ``method_params``, so the user always wins).
    """

    name: str
    task_names: list[str]
    train: list[list[CaptionedImage]]
    test: list[list[CaptionedImage]]
    default_backbone: str
    info: dict[str, Any] = field(default_factory=dict)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if not (len(self.task_names) == len(self.train) == len(self.test)):
            raise ValueError("task_names, train and test must have one entry per task")
        if not self.task_names:
            raise DataError(f"scenario {self.name!r} has no tasks")
        for name, train, test in zip(self.task_names, self.train, self.test):
            if not train or not test:
                which = "training" if not train else "test"
                raise DataError(f"task {name!r} of scenario {self.name!r} has no {which} images; "
                                "check the task column / files of that task")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def counts(self) -> list[dict[str, Any]]:
        """Per task: images and captions in each split."""
        return [{"task": name,
                 "train_images": len(train), "train_captions": sum(len(i.captions) for i in train),
                 "test_images": len(test), "test_captions": sum(len(i.captions) for i in test)}
                for name, train, test in zip(self.task_names, self.train, self.test)]


@dataclass(frozen=True)
class ScenarioBuilder:
    """A registered scenario: how to build it and what it needs."""

    name: str
    build: Callable[[Any, Path], Scenario]  # (options dataclass instance, data root) -> Scenario
    options: type  # a dataclass of the builder's options (all with defaults)
    summary: str
    needs: str  # what data must be present, for `benchmark scenarios`
    num_tasks: int | None  # None when it depends on the options/data


ENTRY_POINT_GROUP = "benchmark.scenarios"
# The built-in scenarios, imported on first use.
BUILTIN_SCENARIOS = {
    "synthetic": "benchmark.scenarios.synthetic:SYNTHETIC",
    "flickr_coco": "benchmark.scenarios.real:FLICKR_COCO",
    "coco_supercat": "benchmark.scenarios.real:COCO_SUPERCAT",
    "custom": "benchmark.scenarios.custom:CUSTOM",
}


def _check_builder(builder, origin: str) -> None:
    if not isinstance(builder, ScenarioBuilder):
        raise BrokenEntry(f"{origin} is not a benchmark.scenarios.ScenarioBuilder")
    if not dataclasses.is_dataclass(builder.options):
        raise BrokenEntry(f"{origin}: its options must be a dataclass")


SCENARIOS = Registry("scenario", group=ENTRY_POINT_GROUP, check=_check_builder,
                     advice=" (or `custom` with your own caption files)")
for _name, _path in BUILTIN_SCENARIOS.items():
    SCENARIOS.add_lazy(_name, _path)


def register_scenario(builder: ScenarioBuilder) -> ScenarioBuilder:
    """Add a scenario under ``builder.name`` (a name already taken is a ValueError)."""
    return SCENARIOS.register(getattr(builder, "name", repr(builder)), builder)


def available_scenarios() -> dict[str, ScenarioBuilder]:
    """Every scenario by name: the built-in and registered ones, then the published ones."""
    return SCENARIOS.available()


def get_scenario_builder(name: str) -> ScenarioBuilder:
    return SCENARIOS.get(name)


def parse_options(builder: ScenarioBuilder, options: dict[str, Any] | None) -> Any:
    """Validate a scenario's options mapping into its options dataclass (unknown keys are errors)."""
    from ..config import from_mapping

    return from_mapping(builder.options, dict(options or {}), f"scenario_options[{builder.name}]",
                        unknown=f"unknown option {{key!r}} for scenario {builder.name!r}{{hint}}; "
                                "its options are: {known}",
                        invalid=f"bad options for scenario {builder.name!r}: {{error}}")


def build_scenario(name: str, options: dict[str, Any] | None = None, data_root: str | Path | None = None) -> Scenario:
    """Build a registered scenario from its name, options and the data root."""
    builder = get_scenario_builder(name)
    parsed = parse_options(builder, options)
    try:
        scenario = builder.build(parsed, resolve_data_root(data_root))
    except ValueError as error:  # an option value the builder can only check against its data
        raise ConfigError(f"bad options for scenario {builder.name!r}: {error}") from None
    scenario.info.setdefault("options", dataclasses.asdict(parsed))
    return scenario


def resolve_data_root(data_root: str | Path | None) -> Path:
    """``--data-root``, else ``$CLVL_DATA_ROOT``, else ``./data``."""
    if data_root is None:
        data_root = os.environ.get("CLVL_DATA_ROOT", "data")
    return Path(data_root).expanduser().resolve()


def require_files(scenario: str, files: list[Path]) -> None:
    """Fail with one line naming every missing file (never fall back to other data)."""
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"scenario {scenario!r} needs {', '.join(missing)} (missing); "
                        "see datasets/README.md for how to get and lay out the data, "
                        "and point --data-root (or CLVL_DATA_ROOT) at it")

