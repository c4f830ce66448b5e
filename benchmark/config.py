"""The run configuration: defaults, YAML, command-line overrides, validation, hashing.

Precedence, lowest first: the defaults below, the YAML file (``--config``), the named
command-line options (``--methods``, ``--epochs``, ...), and ``--set KEY=VALUE`` overrides
(dotted keys, YAML-parsed values, e.g. ``--set training.epochs=3`` or
``--set method_params.finetune.replay_memory=200``). Unknown keys are errors that name the
key and the closest known one. The *effective* config (this merged result, with every
method's hyperparameters filled in from its ``Config``) is stored in each run record.

Example YAML::

    scenario: synthetic
    scenario_options: {train_images: 400}
    methods: [zeroshot, finetune]
    method_params:
      finetune: {lr: 1.0e-4, replay_memory: 0}
    backbone: null            # null: the scenario's default backbone
    protocol: {gallery: union, task_identity: inferred, tasks: seen}
    training: {epochs: 2, batch_size: 64, eval_batch_size: 256, deterministic: false}
    seeds: [0, 1, 2]
    device: auto              # auto | cpu | cuda | cuda:N
    output_dir: results
    loggers: []               # tensorboard, wandb, csv (benchmark/tracking.py); not part of a run's identity
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .evaluation import Protocol

LOGGERS = ("tensorboard", "wandb", "csv")  # experiment trackers (benchmark.tracking)


@dataclass
class TrainingConfig:
    epochs: int = 3  # passes over each task's training pairs
    batch_size: int = 64  # training pairs per step (the contrastive negatives)
    eval_batch_size: int = 256  # images / captions per encoding batch at test time
    num_workers: int = 0  # DataLoader workers for training
    deterministic: bool = False  # CUDA: deterministic algorithms only (slower); CPU runs are always reproducible


@dataclass
class ProtocolConfig:
    gallery: str = "union"  # union | per_task
    task_identity: str = "inferred"  # inferred | given
    tasks: str = "seen"  # seen | all


@dataclass
class RunConfig:
    scenario: str = "synthetic"  # a registered scenario (`python -m benchmark scenarios`)
    scenario_options: dict[str, Any] = field(default_factory=dict)  # the scenario's own options
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "finetune"])  # names or module:Class
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: hyperparameters
    backbone: str | None = None  # e.g. ViT-B-16:openai; None = the scenario's default
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "results"  # run records go to <output_dir>/runs, tables to <output_dir>/tables
    data_root: str | None = None  # default: $CLVL_DATA_ROOT, else ./data
    cache_dir: str | None = None  # default: $CLVL_CACHE, else ~/.cache/clvl-benchmark
    # How to run, not what (like runner.RunControl): never part of a run's identity or its record.
    loggers: list[str] = field(default_factory=list)  # tensorboard | wandb | csv, see benchmark.tracking

    def protocol_object(self) -> Protocol:
        return Protocol(**dataclasses.asdict(self.protocol))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"protocol": ProtocolConfig, "training": TrainingConfig}
# Former fields that say how to run, not what (benchmark.run.RunControl): a clear error, not "unknown field".
_HOW_TO_RUN = {"force": "--force"}
_FREE_MAPPINGS = {"scenario_options", "method_params"}  # validated later by the scenario / method


def _unknown_key(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {where}{close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config field {where}{key!r}{hint}; known fields: {', '.join(sorted(known))}")


def _check_keys(data: dict[str, Any]) -> None:
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in data.items():
        if key in _HOW_TO_RUN:
            raise ConfigError(f"{key!r} is not a config field (it says how to run, not what to run): "
                              f"pass {_HOW_TO_RUN[key]} to `run` instead")
        if key not in top:
            raise _unknown_key(key, top, "")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config field {key!r} must be a mapping, got {type(value).__name__}")
            known = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            for sub in value:
                if sub not in known:
                    raise _unknown_key(sub, known, f"{key}.")
        if key in _FREE_MAPPINGS and not isinstance(value, dict):
            raise ConfigError(f"config field {key!r} must be a mapping, got {type(value).__name__}")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_assignment(text: str) -> dict[str, Any]:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": yaml(value)}}}``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. training.epochs=3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def build_config(yaml_path: str | Path | None = None, options: dict[str, Any] | None = None,
                 assignments: list[str] | None = None) -> RunConfig:
    """Merge defaults, YAML, named options (None = not given) and ``--set`` assignments."""
    data = RunConfig().to_dict()
    layers = []
    if yaml_path is not None:
        layers.append(read_yaml(yaml_path))
    layers.append({k: v for k, v in (options or {}).items() if v is not None})
    layers.extend(parse_assignment(a) for a in assignments or [])
    for layer in layers:
        _check_keys(layer)
        data = _merge(data, layer)
    return _from_dict(data)


def _from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig(**{k: v for k, v in data.items() if k not in _SECTIONS},
                           protocol=ProtocolConfig(**data["protocol"]), training=TrainingConfig(**data["training"]))
    except TypeError as error:
        raise ConfigError(f"invalid config: {error}") from None
    _validate(config)
    return config


def _validate(config: RunConfig) -> None:
    for name in ("output_dir", "data_root", "cache_dir"):  # `--set output_dir=2024` reads as an int
        value = getattr(config, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, name, str(value))
    for name in ("scenario", "device", "output_dir", "backbone", "data_root", "cache_dir"):
        value = getattr(config, name)
        optional = name in ("backbone", "data_root", "cache_dir")
        if not (isinstance(value, str) and value.strip()) and not (optional and value is None):
            raise ConfigError(f"{name} must be a non-empty string{' or null' if optional else ''}, got {value!r}")
    if isinstance(config.methods, str):
        config.methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    if not isinstance(config.methods, list) or not config.methods or not all(isinstance(m, str) for m in config.methods):
        raise ConfigError("methods must be a non-empty list of method names (e.g. [zeroshot, finetune])")
    if len(set(config.methods)) != len(config.methods):
        raise ConfigError("methods lists a method twice")
    _validate_loggers(config)
    if isinstance(config.seeds, int):
        config.seeds = [config.seeds]
    if not isinstance(config.seeds, list) or not config.seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
        raise ConfigError("seeds must be a non-empty list of integers (e.g. [0, 1, 2])")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        value = getattr(config.training, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"training.{name} must be a positive integer, got {value!r}")
    if config.training.batch_size < 2:
        raise ConfigError("training.batch_size must be at least 2: contrastive training needs negatives")
    if not isinstance(config.training.deterministic, bool):
        raise ConfigError(f"training.deterministic must be true or false, got {config.training.deterministic!r}")
    workers = config.training.num_workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError("training.num_workers must be a non-negative integer")
    try:
        config.protocol_object()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not (config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name, params in config.method_params.items():
        if not isinstance(params, dict):
            raise ConfigError(f"method_params.{name} must be a mapping of parameter: value, got {params!r}")
        if name not in config.methods:
            raise ConfigError(f"method_params names {name!r}, which is not in methods ({', '.join(config.methods)})")


def _validate_loggers(config: RunConfig) -> None:
    loggers = config.loggers
    if loggers is None:
        loggers = []
    if isinstance(loggers, str):
        loggers = [part.strip() for part in loggers.split(",") if part.strip()]
    if not isinstance(loggers, list) or not all(isinstance(name, str) for name in loggers):
        raise ConfigError(f"loggers must be a list of logger names ({', '.join(LOGGERS)}), got {config.loggers!r}")
    for name in loggers:
        if name not in LOGGERS:
            close = difflib.get_close_matches(name, LOGGERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown logger {name!r}{hint}; choose from {', '.join(LOGGERS)}")
    config.loggers = list(dict.fromkeys(loggers))  # each once, in the order given


def coerce_to_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Convert YAML/CLI values to the types a dataclass declares (``"5e-4"`` -> 0.0005).

    YAML reads ``5e-4`` (no dot) as a string and ``--set x=3`` as an int; both are fine where
    the field is a float. Anything that does not convert is a :class:`ConfigError` naming the field.
    """
    hints = typing.get_type_hints(cls)
    converted = dict(values)
    for key, value in values.items():
        expected = hints.get(key)
        try:
            if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
                converted[key] = float(value)
            elif expected is int and isinstance(value, str):
                converted[key] = int(value)
            elif expected is int and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                converted[key] = int(value)
            elif expected is bool and not isinstance(value, bool):
                raise ValueError
            elif typing.get_origin(expected) is list and isinstance(value, str):
                converted[key] = [part.strip() for part in value.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{where}.{key} must be {getattr(expected, '__name__', expected)}, "
                              f"got {value!r}") from None
        if expected in (int, float) and (isinstance(converted[key], bool)
                                         or not isinstance(converted[key], (int, float))):
            raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
    return converted


def config_hash(payload: dict[str, Any]) -> str:
    """A stable hash of everything that determines a run's results."""
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
