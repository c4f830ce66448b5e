"""The run configuration: defaults, YAML, command-line overrides, validation, hashing.

Precedence, lowest first: the defaults below, the YAML file (``--config``), the named
command-line options (``--methods``, ``--epochs``, ...), and ``--set KEY=VALUE`` overrides
(dotted keys, YAML-parsed values, e.g. ``--set training.epochs=3`` or
``--set method_params.finetune.replay_memory=200``; a method's parameters go under its name,
its class's ``name``, however it was selected). Unknown keys are errors that name the
key and the closest known one; every section, a method's hyperparameters and a scenario's
options are read by the one validator, :func:`from_mapping`, and each dataclass checks its own
values in ``__post_init__`` (so a bad value fails when the grid is planned, before any training).
The *effective* config (this merged result, with every
method's hyperparameters filled in from its ``Config``) is stored in each run record.

Example YAML::

    scenario: synthetic
    scenario_options: {train_images: 400}
    methods: [zeroshot, finetune]
    method_params:
      finetune: {lr: 1.0e-4, replay_memory: 0}
    backbone: null            # null: the scenario's default backbone
    protocol: {gallery: union, task_identity: inferred, tasks: seen}
    training: {epochs: 2, batch_size: 64, eval_batch_size: 256, deterministic: false,
               num_workers: auto, decode: pil, precision: auto, compile: none}   # num_workers: not part of a run's identity
    seeds: [0, 1, 2]
    device: auto              # auto | cpu | cuda | cuda:N
    output_dir: results
    loggers: []               # tensorboard, wandb, csv (benchmark/tracking.py); not part of a run's identity
    launcher: {gpus_per_cell: null, cpus_per_cell: 1}   # --launcher ray (benchmark/launch); not in the identity
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .registry import did_you_mean

LOGGERS = ("tensorboard", "wandb", "csv")  # experiment trackers (benchmark.tracking)
GALLERIES = ("union", "per_task")
TASK_IDENTITIES = ("inferred", "given")
EVAL_TASKS = ("seen", "all")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # benchmark.precision
COMPILE_MODES = ("none", "default", "reduce-overhead")  # torch.compile modes, benchmark.strategy
DECODES = ("pil", "pil-draft", "torchvision")  # training.decode, described in benchmark.data.decode.DECODE_PATHS


@dataclass
class TrainingConfig:
    epochs: int = 3  # passes over each task's training pairs
    batch_size: int = 64  # training pairs per step (the contrastive negatives)
    eval_batch_size: int = 256  # images / captions per encoding batch at test time
    num_workers: int | str = "auto"  # training DataLoader workers; auto: 0 on CPU, cores-1 (<= 16) on CUDA
    decode: str = "pil"  # training images: pil (reference) | pil-draft | torchvision (benchmark.data.decode)
    deterministic: bool = False  # CUDA: deterministic algorithms only (slower); CPU runs are always reproducible
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32; see benchmark/precision.py
    compile: str = "none"  # none | default | reduce-overhead: torch.compile the training forward pass (opt-in)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"training.{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("training.batch_size must be at least 2: contrastive training needs negatives")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"training.deterministic must be true or false, got {self.deterministic!r}")
        workers = self.num_workers
        if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise ConfigError(f"training.num_workers must be a non-negative integer or auto, got {workers!r}")
        if self.decode not in DECODES:  # named here: this module must not import torch
            raise ConfigError(f"training.decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.compile, bool):  # YAML `compile: true` / `false`
            self.compile = "default" if self.compile else "none"
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"training.compile must be one of {', '.join(COMPILE_MODES)} (or true / false), "
                              f"got {self.compile!r}")


@dataclass(frozen=True)
class Protocol:
    """How a run is evaluated (see :mod:`benchmark.evaluation`); recorded in every run record."""

    gallery: str = "union"  # union | per_task
    task_identity: str = "inferred"  # inferred | given
    tasks: str = "seen"  # seen | all

    def __post_init__(self):
        for value, allowed, name in ((self.gallery, GALLERIES, "gallery"),
                                     (self.task_identity, TASK_IDENTITIES, "task_identity"),
                                     (self.tasks, EVAL_TASKS, "tasks")):
            if value not in allowed:
                raise ValueError(f"protocol.{name} must be one of {', '.join(allowed)}, got {value!r}")

    def describe(self) -> str:
        return f"gallery={self.gallery}, task identity={self.task_identity}, tasks={self.tasks}"


ProtocolConfig = Protocol  # the config section's old name: one class for the config and the evaluation


@dataclass
class LauncherConfig:
    """What each run (a *cell*) asks of the cluster under ``--launcher ray`` (:mod:`benchmark.launch`).

    How to run, not what: never part of a run's identity or its record, and ignored by
    ``--launcher local``. ``gpus_per_cell`` null means 1 when the cluster has GPUs and ``device``
    is not ``cpu``, else 0; K > 1 runs the cell as ``torchrun --standalone --nproc_per_node=K``.
    Whole numbers only: a fraction of a GPU would put two trainings on one device."""

    gpus_per_cell: int | None = None
    cpus_per_cell: int = 1

    def __post_init__(self):
        for name, least in (("gpus_per_cell", 0), ("cpus_per_cell", 1)):
            value = getattr(self, name)
            if value is None and name == "gpus_per_cell":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"launcher.{name} must be a whole number >= {least}"
                                  f"{' or null (auto)' if name == 'gpus_per_cell' else ''}, got {value!r}")


@dataclass
class RunConfig:
    scenario: str = "synthetic"  # a registered scenario (`python -m benchmark scenarios`)
    scenario_options: dict[str, Any] = field(default_factory=dict)  # the scenario's own options
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "finetune"])  # names or module:Class
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: hyperparameters
    backbone: str | None = None  # e.g. ViT-B-16:openai; None = the scenario's default
    protocol: Protocol = field(default_factory=Protocol)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "results"  # run records go to <output_dir>/runs, tables to <output_dir>/tables
    data_root: str | None = None  # default: $CLVL_DATA_ROOT, else ./data
    cache_dir: str | None = None  # default: $CLVL_CACHE, else ~/.cache/clvl-benchmark
    # How to run, not what (like runner.RunControl): never part of a run's identity or its record.
    loggers: list[str] = field(default_factory=list)  # tensorboard | wandb | csv, see benchmark.tracking
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # --launcher ray: resources per run

    def __post_init__(self):
        _validate(self)

    def protocol_object(self) -> Protocol:
        return self.protocol

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"protocol": Protocol, "training": TrainingConfig, "launcher": LauncherConfig}
# Former fields that say how to run, not what (benchmark.run.RunControl): a clear error, not "unknown field".
_HOW_TO_RUN = {"force": "--force"}
_FREE_MAPPINGS = {"scenario_options", "method_params"}  # validated later by the scenario / method
_UNKNOWN_CONFIG_FIELD = "unknown config field {prefix}{key!r}{hint}; known fields: {known}"


# ============================================================================ the one validator


def check_keys(cls: type, data: Mapping[str, Any], *, unknown: str, prefix: str = "", where: str = "") -> None:
    """A :class:`ConfigError` for the first key of ``data`` that is not a field of dataclass ``cls``.

    ``unknown`` is the message, formatted with ``key``, ``hint`` (the did-you-mean), ``known``
    (the field names), ``prefix`` (put before the suggestion too, e.g. ``"training."``) and ``where``."""
    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key in data:
        if key not in fields:
            raise ConfigError(unknown.format(key=key, hint=did_you_mean(key, fields, prefix=prefix),
                                             known=", ".join(fields) or "none", prefix=prefix, where=where))


def from_mapping(cls: type, data: Mapping[str, Any] | None, where: str, *,
                 unknown: str = "unknown field {key!r} in {where}{hint}; its fields are: {known}",
                 invalid: str = "{where}: {error}", prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from YAML/CLI values, or a one-line :class:`ConfigError`.

    Unknown keys (message ``unknown``, see :func:`check_keys`), values that do not convert to
    the declared field types (:func:`coerce_to_fields`, naming ``where.field``) and values that
    ``cls.__post_init__`` rejects with a TypeError or ValueError (message ``invalid``, formatted
    with ``where`` and ``error``) are errors. Used for the config sections, every method's
    ``Config`` and every scenario's options.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    check_keys(cls, data, unknown=unknown, prefix=prefix, where=where)
    values = coerce_to_fields(cls, dict(data), where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(invalid.format(where=where, error=error)) from None


def _check_keys(data: dict[str, Any]) -> None:
    for key in data:
        if key in _HOW_TO_RUN:
            raise ConfigError(f"{key!r} is not a config field (it says how to run, not what to run): "
                              f"pass {_HOW_TO_RUN[key]} to `run` instead")
    check_keys(RunConfig, data, unknown=_UNKNOWN_CONFIG_FIELD)
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config field {key!r} must be a mapping, got {type(value).__name__}")
            check_keys(_SECTIONS[key], value, unknown=_UNKNOWN_CONFIG_FIELD, prefix=f"{key}.")
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
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": yaml(value)}}}``.

    A method selected by its ``package.module:Class`` path may be named by that path too:
    ``method_params.pkg.mod:Class.field=value`` keeps the path whole (everything between
    ``method_params.`` and the last dot); its name (the class's ``name``) is the usual key."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. training.epochs=3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    key = key.strip()
    section, _, rest = key.partition(".")
    if section == "method_params" and ":" in rest:
        selector, _, field_name = rest.rpartition(".") if "." in rest.partition(":")[2] else (rest, "", "")
        parts = [section, selector, field_name] if field_name else [section, selector]
    else:
        parts = key.split(".")
    for part in reversed(parts):
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
    sections = {name: from_mapping(cls, data[name], name, unknown=_UNKNOWN_CONFIG_FIELD, invalid="{error}",
                                   prefix=f"{name}.") for name, cls in _SECTIONS.items()}
    try:
        return RunConfig(**{k: v for k, v in data.items() if k not in _SECTIONS}, **sections)
    except TypeError as error:
        raise ConfigError(f"invalid config: {error}") from None


def _validate(config: RunConfig) -> None:
    """RunConfig's own checks (its sections check themselves); normalises short forms in place."""
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
    for name, cls in _SECTIONS.items():  # a RunConfig built in code may give a section as a mapping
        if isinstance(getattr(config, name), Mapping):
            setattr(config, name, from_mapping(cls, getattr(config, name), name, unknown=_UNKNOWN_CONFIG_FIELD,
                                               invalid="{error}", prefix=f"{name}."))
        elif not isinstance(getattr(config, name), cls):
            raise ConfigError(f"config field {name!r} must be a mapping, got {type(getattr(config, name)).__name__}")
    if not (config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name, params in config.method_params.items():
        if not isinstance(params, dict):
            raise ConfigError(f"method_params.{name} must be a mapping of parameter: value, got {params!r}")
    if config.method_params:  # keyed by each method's one name, its class's `name` (a selector is accepted too)
        from .method import select_methods

        _, config.method_params = select_methods(config.methods, config.method_params)


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
            raise ConfigError(f"unknown logger {name!r}{did_you_mean(name, LOGGERS)}; choose from {', '.join(LOGGERS)}")
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
