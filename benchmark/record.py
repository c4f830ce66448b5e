"""The run record: the one place that knows its JSON layout.

A run record is the file ``python -m benchmark run`` writes for each (method, scenario, seed) to
``<output_dir>/runs/<run_id>.json``, schema :data:`RECORD_SCHEMA`. The runner makes one with
:func:`build`, and writes :meth:`RunRecord.to_json`; tables, statistics and the protocol card of
``show`` read them with :func:`load` and use the typed fields of :class:`RunRecord`, never the
JSON itself (the protocol card still reads a few nested blocks, such as ``provenance``, as
mappings).

Top-level keys, in the order they are written: ``schema``, ``run_id``, ``method``, ``scenario``,
``seed``, ``config`` (the effective config of this one run), ``config_hash``, ``protocol``,
``tasks``, ``task_counts``, ``scenario_info``, ``recall`` (``{direction: {"K": T x T}}``, percent,
``null`` where not evaluated), ``recall_initial`` (before training, protocol ``tasks: all``),
``routing_accuracy``, ``recall_tie_rule``, ``final_session_queries`` (per-query ranks of the
final session, encoded as below), ``method_access``, ``method_adjusted`` (settings the method
could not use as asked: asked, used, why), ``captions_truncated``, ``costs``, ``resumed``,
``provenance``, ``created``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .errors import BenchmarkError

RECORD_SCHEMA = "clvl-benchmark/run-record/v1"
SCHEMA_FAMILY = "clvl-benchmark/run-record/"
REQUIRED_KEYS = ("schema", "run_id", "method", "scenario", "seed", "protocol", "tasks", "recall")
# Per-query ranks are stored one character each: "0".."9" for ranks 0..9, "x" for 10 or worse.
# Enough for recall at K <= 10, and 25k queries cost 25 kB.
RANK_CHARS = "0123456789"
RANK_BEYOND = "x"
RANK_CAP = len(RANK_CHARS)  # the decoded value of RANK_BEYOND: "10 or worse"
QUERY_ENCODING = (
    "ranks: one character per query, tasks in order: '0'..'9' = number of gallery items scoring "
    "strictly above the best true match, 'x' = 10 or more; ties: [query, tied, tied_true] for the "
    "queries whose best true match ties with other items (tied = non-matching items at its score, "
    "tied_true = true items at it), hit at K = expected hit under a random order of the ties "
    "(benchmark.retrieval); queries not listed have no ties, hit at K means rank < K")
PROTOCOL_KEYS = ("gallery", "task_identity", "tasks")
TIE_RULE = "expected"  # benchmark.retrieval: ties count as the expected hit
# ``<run_id>.error.json`` beside the records: a run that failed under ``--launcher ray``
# (benchmark.launch.cell), not a record; readers of records skip it, as they skip hidden temp files.
ERROR_SUFFIX = ".error.json"


def record_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The run record files of ``folder`` (``*.json``), sorted; error records and hidden files excluded."""
    return sorted(path for path in Path(folder).glob("*.json")
                  if not path.name.endswith(ERROR_SUFFIX) and not path.name.startswith("."))


class RecordError(BenchmarkError):
    """A file that is not a usable run record. ``str()`` is the one-line message for a user;
    ``reason`` says why in a few words, for a caller that names the file itself."""

    def __init__(self, message: str, reason: str, path: Path):
        super().__init__(message)
        self.reason, self.path = reason, path


class _Invalid(Exception):
    """Why a JSON value is not a valid record (turned into a RecordError by load)."""


# ============================================================================ encoding


def encode_ranks(ranks: torch.Tensor) -> str:
    return "".join(RANK_CHARS[r] if r < len(RANK_CHARS) else RANK_BEYOND for r in ranks.tolist())


def encode_ties(columns: torch.Tensor) -> list[list[int]]:
    """``[query, tied, tied_true]`` for each query (rows of ``columns`` = above, tied, tied_true)
    whose ties can change a hit at K <= 10; healthy features have none, so the list is short."""
    relevant = (columns[:, 1] > 0) & (columns[:, 0] < len(RANK_CHARS))
    index = torch.nonzero(relevant).flatten()
    return [[int(q), int(columns[q, 1]), int(columns[q, 2])] for q in index.tolist()]


def protocol_label(protocol: Mapping[str, Any]) -> str:
    """A stable one-line label such as ``gallery=union, task_identity=inferred, tasks=seen``.

    The three standard keys come first in a fixed order so two records with the same
    protocol always get the same label, whatever order their JSON keys were in.
    """
    keys = [k for k in PROTOCOL_KEYS if k in protocol] + sorted(k for k in protocol if k not in PROTOCOL_KEYS)
    return ", ".join(f"{key}={protocol[key]}" for key in keys)


# ============================================================================ the typed record


@dataclass(frozen=True)
class QueryRanks:
    """One direction's per-query ranks of the final session, decoded."""

    query_set: str  # digest of the test queries: two records pair query by query only when equal
    tasks: tuple[int, ...]
    counts: tuple[int, ...]  # queries per task, in the order of ``tasks``
    ranks: np.ndarray = dataclasses.field(repr=False)  # int64; RANK_CAP stands for "10 or worse"
    ties: np.ndarray | None = dataclasses.field(repr=False)  # [n, 3] (query, tied, tied_true), or None

    @property
    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *self.counts])

    def per_task(self, values: np.ndarray | None = None) -> list[np.ndarray]:
        """``values`` (default: the ranks), one per query in record order, cut into tasks."""
        values = self.ranks if values is None else values
        bounds = self.bounds
        return [values[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


@dataclass(frozen=True)
class Costs:
    """The ``costs`` block; any field a record lacks (or holds no number for) is None."""

    trainable_params: float | None = None
    total_params: float | None = None
    backbone_params: float | None = None
    added_params: float | None = None
    params_per_task: float | None = None
    params_shared: float | None = None
    forward_passes_per_query: float | None = None
    wall_time_s: float | None = None
    train_time_s_per_task: tuple[float, ...] | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None


@dataclass(frozen=True)
class ReplayMemory:
    plugin: str | None
    mem_size: int | None


@dataclass(frozen=True)
class Access:
    """What the method was allowed to see (``method_access``)."""

    task_labels_in_training: bool | None = None
    task_identity_at_test: str | None = None  # None: not recorded, the protocol's applies
    current_task_training_data: bool = True
    replay_memory: tuple[ReplayMemory, ...] = ()
    plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Truncation:
    """Captions cut at the text encoder's context (``captions_truncated``), per task."""

    context_length: int | None
    train: tuple[int | None, ...]
    test: tuple[int | None, ...]

    @property
    def total(self) -> int:
        return sum(v or 0 for v in self.train + self.test)


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One run record. Matrices are float arrays with NaN for missing cells; ``raw`` is the JSON
    as read or built (what :meth:`to_json` returns a copy of)."""

    run_id: str
    method: str
    scenario: str
    seed: int
    protocol: Mapping[str, Any]
    tasks: tuple[str, ...]
    recall: Mapping[str, Mapping[int, np.ndarray]]  # direction -> K -> T x T
    recall_initial: Mapping[str, Mapping[int, np.ndarray]] | None  # direction -> K -> T
    created: str | None
    path: Path | None
    raw: Mapping[str, Any] = dataclasses.field(repr=False)
    schema: str = RECORD_SCHEMA
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # the effective config
    config_hash: str | None = None
    task_counts: tuple[Mapping[str, Any], ...] = ()
    scenario_info: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    routing_accuracy: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)
    recall_tie_rule: str | None = None
    final_queries: Mapping[str, QueryRanks] = dataclasses.field(default_factory=dict, repr=False)  # by direction
    access: Access | None = None
    captions_truncated: Truncation | None = None
    costs: Costs | None = None
    resumed: tuple[Mapping[str, Any], ...] = ()
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    # field -> {asked, used, why}: settings the method could not use as asked (older records: empty)
    method_adjusted: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def protocol_label(self) -> str:
        return protocol_label(self.protocol)

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON-ready dict that is written (:func:`benchmark.io.atomic_write_json`)."""
        return copy.deepcopy(dict(self.raw))

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> "RunRecord":
        """A validated record (raises :class:`RecordError`, as :func:`load` does)."""
        where = Path(path) if path is not None else Path("<record>")
        try:
            return _typed(data, path, strict=True)
        except _Invalid as why:
            raise RecordError(f"{where}: {why}", str(why), where) from None


def load(path: str | os.PathLike[str], *, strict: bool = True) -> RunRecord:
    """Read one run record.

    ``strict`` (tables, statistics): the schema must be :data:`RECORD_SCHEMA` and the record
    well formed (complete lower triangle, recall in 0..100 percent, ...). Not strict (the
    protocol card): any schema of this harness, and whatever fields are there. Raises
    :class:`RecordError` with a one-line message otherwise.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        if strict:
            raise RecordError(f"{path}: cannot be read ({error})", f"cannot be read ({error})", path) from None
        raise RecordError(f"run record {path} does not exist", "does not exist", path) from None
    except json.JSONDecodeError as error:
        if strict:
            raise RecordError(f"{path}: not valid JSON ({error})", f"not valid JSON ({error})", path) from None
        raise RecordError(f"{path} is not a readable run record ({error})", f"not valid JSON ({error})", path) from None
    except (OSError, UnicodeDecodeError) as error:
        if strict:
            raise RecordError(f"{path}: cannot be read ({error})", f"cannot be read ({error})", path) from None
        raise RecordError(f"{path} is not a readable run record ({error})", f"cannot be read ({error})", path) from None
    if not strict:
        if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(SCHEMA_FAMILY):
            raise RecordError(f"{path} is not a run record of this harness (no clvl-benchmark schema)",
                              "no clvl-benchmark schema", path)
        return _typed(data, path, strict=False)
    return RunRecord.from_json(data, path)


# ============================================================================ writing


def build(*, run, config, scenario, backbone: str, recall: Mapping, recall_initial: Mapping | None,
          routing: Mapping | None, last_ranks: Mapping | None, query_set: str | None, plugins: Sequence,
          task_identity: str, trains: bool, streams, parameter_counts: Mapping[str, Any], forward_passes: int,
          wall_time_s: float, train_times: list, peak_memory: tuple[float, str], earlier_peak_mb: float, resumed: list,
          machine: Mapping[str, Any], code: Mapping[str, Any], data_manifest: Mapping[str, Any],
          backbone_weights: Mapping[str, Any] | None, deterministic_algorithms: bool,
          method_adjusted: Mapping[str, Any] | None = None,
          created: str | None = None, directions: Sequence[str] = ("i2t", "t2i"),
          ks: Sequence[int] = (1, 5, 10)) -> RunRecord:
    """The record of a finished run (what the runner writes).

    ``run`` is the planned run (``run_id``, ``method_name``, ``method_cls``, ``params``, ``seed``,
    ``digest``); ``config`` its grid's :class:`~benchmark.config.RunConfig`; ``recall`` /
    ``recall_initial`` ``{direction: {K: values}}``; ``last_ranks`` the final evaluation's
    ``{direction: {task: [n, 3] (above, tied, tied_true)}}``, ``query_set`` their digest;
    ``peak_memory`` this attempt's (MB, kind) and ``earlier_peak_mb`` that of the attempts before a
    resume; ``machine`` :func:`benchmark.provenance.provenance` of the device. ``created`` defaults to now.
    """
    effective = config.to_dict()
    effective.pop("loggers", None)  # how the run was watched, not what it is (like RunControl)
    effective.pop("launcher", None)  # where it ran (--launcher ray), not what it is: same record either way
    effective["backbone"] = backbone
    effective["method_params"] = {run.method_cls.name: dataclasses.asdict(run.params)}  # one name per method
    effective["methods"] = [run.method_name]
    effective["seeds"] = [run.seed]
    record_provenance = dict(machine)
    record_provenance["code"] = code
    record_provenance["data_manifest"] = data_manifest
    record_provenance["backbone_weights"] = backbone_weights
    record_provenance["deterministic_algorithms"] = deterministic_algorithms
    peak, peak_kind = peak_memory
    counts = parameter_counts
    data = {
        "schema": RECORD_SCHEMA,
        "run_id": run.run_id,
        "method": run.method_cls.name,
        "scenario": scenario.name,
        "seed": run.seed,
        "config": effective,
        "config_hash": run.digest,
        "protocol": dataclasses.asdict(config.protocol),
        "tasks": list(scenario.task_names),
        "task_counts": scenario.counts(),
        "scenario_info": scenario.info,
        "recall": {d: {str(k): recall[d][k] for k in ks} for d in directions},
        "recall_initial": (None if recall_initial is None
                           else {d: {str(k): recall_initial[d][k] for k in ks} for d in directions}),
        "routing_accuracy": routing,
        "recall_tie_rule": TIE_RULE,
        "final_session_queries": final_queries_block(last_ranks, query_set, directions),
        "method_access": access_block(plugins, task_identity, trains),
        # What the method could not use as asked on this backbone (benchmark.method.Method.adjust):
        # field -> {asked, used, why}; config.method_params keeps what was asked (the run's identity).
        "method_adjusted": dict(method_adjusted or {}),
        "captions_truncated": truncation_block(streams),
        "costs": {"trainable_params": counts["trainable"], "total_params": counts["total"],
                  "backbone_params": counts["backbone"], "added_params": counts["added"],
                  "params_per_task": counts.get("per_task"), "params_shared": counts.get("shared"),
                  "forward_passes_per_query": forward_passes,
                  "wall_time_s": wall_time_s,
                  "train_time_s_per_task": train_times,
                  "peak_memory_mb": max(peak, earlier_peak_mb), "peak_memory_kind": peak_kind},
        "resumed": resumed,
        "provenance": record_provenance,
        "created": created if created is not None else datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return _typed(data, None, strict=False)


def final_queries_block(ranks: Mapping | None, query_set: str | None,
                        directions: Sequence[str] = ("i2t", "t2i")) -> dict[str, Any] | None:
    """Per-query ranks of the final session (for paired tests over queries, benchmark.stats)."""
    if not ranks:
        return None
    out: dict[str, Any] = {"query_set": query_set, "encoding": QUERY_ENCODING}
    for direction in directions:
        tasks = sorted(ranks[direction])
        columns = torch.cat([torch.as_tensor(ranks[direction][j]).reshape(-1, 3) for j in tasks])
        out[direction] = {"tasks": tasks, "counts": [len(ranks[direction][j]) for j in tasks],
                          "ranks": encode_ranks(columns[:, 0]), "ties": encode_ties(columns)}
    return out


def access_block(plugins: Iterable, task_identity: str, trains: bool) -> dict[str, Any]:
    """What the method was allowed to see (for the protocol card, ``benchmark show``)."""
    plugins = list(plugins)
    replay = [{"plugin": type(p).__name__, "mem_size": getattr(p, "mem_size", None)}
              for p in plugins if hasattr(p, "storage_policy")]
    return {"task_labels_in_training": True,
            "task_identity_at_test": task_identity,
            "current_task_training_data": bool(trains),
            "replay_memory": replay,
            "plugins": [type(p).__name__ for p in plugins]}


def truncation_block(streams) -> dict[str, Any]:
    train = streams.train_pairs or []
    return {"context_length": int(streams.galleries[0].caption_tokens.shape[1]),
            "train": [p.truncated_captions for p in train],
            "test": [g.truncated_captions for g in streams.galleries]}


# ============================================================================ reading


def _typed(data: Any, path: Path | None, *, strict: bool) -> RunRecord:
    """The RunRecord of a JSON value. ``strict`` validates (raising _Invalid); otherwise every
    field is taken as far as it is usable, which is what a record this module just built is."""
    if strict:
        _check_top_level(data)
    get = data.get
    tasks = get("tasks")
    tasks = tuple(tasks) if isinstance(tasks, list) else ()
    T = len(tasks)
    recall = _parse_recall(get("recall"), "recall", lambda v, where: _matrix(v, T, where, strict), strict)
    recall_initial = None
    if get("recall_initial") is not None:
        recall_initial = _parse_recall(get("recall_initial"), "recall_initial",
                                       lambda v, where: _vector(v, T, where, strict), strict)
    created = get("created")
    protocol = get("protocol")
    return RunRecord(
        run_id=get("run_id"),
        method=get("method"),
        scenario=get("scenario"),
        seed=get("seed"),
        protocol=dict(protocol) if isinstance(protocol, dict) else {},
        tasks=tasks,
        recall=recall,
        recall_initial=recall_initial,
        created=created if isinstance(created, str) else None,
        path=path,
        raw=data,
        schema=get("schema"),
        config=get("config") if isinstance(get("config"), dict) else {},
        config_hash=get("config_hash"),
        task_counts=tuple(c for c in get("task_counts") or [] if isinstance(c, dict)),
        scenario_info=get("scenario_info") if isinstance(get("scenario_info"), dict) else {},
        routing_accuracy=get("routing_accuracy"),
        recall_tie_rule=get("recall_tie_rule"),
        final_queries=_parse_final_queries(get("final_session_queries")),
        access=_parse_access(get("method_access")),
        captions_truncated=_parse_truncation(get("captions_truncated")),
        costs=_parse_costs(get("costs")),
        resumed=tuple(r for r in get("resumed") or [] if isinstance(r, dict)),
        provenance=get("provenance") if isinstance(get("provenance"), dict) else {},
        method_adjusted={k: v for k, v in (get("method_adjusted") or {}).items() if isinstance(v, dict)}
        if isinstance(get("method_adjusted"), dict) else {},
    )


def _check_top_level(data: Any) -> None:
    if not isinstance(data, dict) or "schema" not in data:
        raise _Invalid(f"not a run record (no 'schema' field; expected {RECORD_SCHEMA!r})")
    if data["schema"] != RECORD_SCHEMA:
        raise _Invalid(f"unsupported schema {data['schema']!r} (expected {RECORD_SCHEMA!r})")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise _Invalid(f"missing required key(s): {', '.join(missing)}")
    for key in ("run_id", "method", "scenario"):
        if not isinstance(data[key], str) or not data[key]:
            raise _Invalid(f"{key!r} must be a non-empty string")
    # bool is an int in Python; a seed of `true` is certainly a mistake.
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        raise _Invalid("'seed' must be an integer")
    if not isinstance(data["protocol"], dict):
        raise _Invalid("'protocol' must be an object")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise _Invalid("'tasks' must be a non-empty list of task names")


def _parse_recall(block: Any, name: str, parse_cell, strict: bool) -> dict[str, dict[int, np.ndarray]]:
    """``{direction: {"K": values}}`` with K turned into int and values validated (or, not
    strict, whatever parses)."""
    if not isinstance(block, dict) or not block:
        if not strict:
            return {}
        raise _Invalid(f"{name!r} must be a non-empty object {{direction: {{K: ...}}}}")
    parsed: dict[str, dict[int, np.ndarray]] = {}
    for direction, by_k in block.items():
        if not isinstance(by_k, dict) or not by_k:
            if not strict:
                continue
            raise _Invalid(f"{name}[{direction!r}] must be a non-empty object {{K: ...}}")
        parsed[direction] = {}
        for k_text, values in by_k.items():
            try:
                k = int(k_text)
            except (TypeError, ValueError):
                if not strict:
                    continue
                raise _Invalid(f"{name}[{direction!r}] has a non-integer K {k_text!r}") from None
            try:
                if k < 1:
                    raise _Invalid(f"{name}[{direction!r}] has K={k} < 1")
                parsed[direction][k] = parse_cell(values, f"{name}[{direction!r}][{k_text!r}]")
            except _Invalid:
                if strict:
                    raise
    return parsed


def _matrix(values: Any, T: int, where: str, strict: bool = True) -> np.ndarray:
    """A T x T recall matrix whose lower triangle (every seen task) is complete."""
    if not isinstance(values, list) or len(values) != T or not all(isinstance(r, list) and len(r) == T for r in values):
        raise _Invalid(f"{where} must be a {T} x {T} list of lists (one row and column per task)")
    matrix = np.array([[_cell(v, where, strict) for v in row] for row in values], dtype=float)
    if strict:
        # Every protocol evaluates at least the tasks seen so far, and every metric needs them:
        # a hole there means a broken run, better reported now than as a crash in a metric.
        for t in range(T):
            for j in range(t + 1):
                if math.isnan(matrix[t, j]):
                    raise _Invalid(f"{where} is missing cell (t={t}, j={j}) of the lower triangle")
    return matrix


def _vector(values: Any, T: int, where: str, strict: bool = True) -> np.ndarray:
    if not isinstance(values, list) or len(values) != T:
        raise _Invalid(f"{where} must be a list of {T} values (one per task)")
    return np.array([_cell(v, where, strict) for v in values], dtype=float)


def _cell(value: Any, where: str, strict: bool = True) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{where} holds {value!r}, expected a number or null")
    # Recall is stored in percent; a value outside 0..100 means a fraction was stored by
    # mistake somewhere else, or the file is garbage -- either way, not comparable.
    if strict and not 0.0 <= value <= 100.0:
        raise _Invalid(f"{where} holds {value!r}, outside the 0..100 percent range")
    return float(value)


def _parse_final_queries(block: Any) -> dict[str, QueryRanks]:
    """The decodable directions of ``final_session_queries``; a malformed direction is left out
    (the record stays usable, only without paired tests on it)."""
    if not isinstance(block, Mapping):
        return {}
    query_set = str(block.get("query_set"))
    out = {}
    for direction, entry in block.items():
        if direction in ("query_set", "encoding") or not isinstance(entry, Mapping):
            continue
        decoded = _decode_direction(entry, query_set)
        if decoded is not None:
            out[direction] = decoded
    return out


def _decode_direction(entry: Mapping, query_set: str) -> QueryRanks | None:
    text, counts = entry.get("ranks"), entry.get("counts")
    if (not isinstance(text, str) or not isinstance(counts, list)
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != len(text)):
        return None
    values = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) - ord("0")
    values[values == ord(RANK_BEYOND) - ord("0")] = RANK_CAP
    if values.min(initial=0) < 0 or values.max(initial=0) > RANK_CAP:
        return None
    ties = entry.get("ties")
    if ties is not None:
        if not isinstance(ties, list) or any(not isinstance(row, list) or len(row) != 3 for row in ties):
            return None
        try:
            ties = np.asarray(ties, dtype=np.int64).reshape(-1, 3)
        except (TypeError, ValueError):
            return None
        if len(np.unique(ties[:, 0])) != len(ties):
            return None
        if len(ties) and (ties[:, 0].min() < 0 or ties[:, 0].max() >= len(values) or ties[:, 1].min() < 0
                          or ties[:, 2].min() < 1):
            return None
    tasks = entry.get("tasks")
    return QueryRanks(query_set=query_set, tasks=tuple(tasks) if isinstance(tasks, list) else (),
                      counts=tuple(counts), ranks=values, ties=ties)


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _parse_costs(block: Any) -> Costs | None:
    if not isinstance(block, dict):
        return None
    fields = {}
    for field in dataclasses.fields(Costs):
        value = block.get(field.name)
        if field.name == "peak_memory_kind":
            fields[field.name] = value if isinstance(value, str) else None
        elif isinstance(value, list):
            fields[field.name] = tuple(value)
        else:
            fields[field.name] = _number(value)
    return Costs(**fields)


def _parse_access(block: Any) -> Access | None:
    if not isinstance(block, dict) or not block:
        return None
    replay = tuple(ReplayMemory(entry.get("plugin"), entry.get("mem_size"))
                   for entry in block.get("replay_memory") or [] if isinstance(entry, dict))
    return Access(task_labels_in_training=block.get("task_labels_in_training"),
                  task_identity_at_test=block.get("task_identity_at_test"),
                  current_task_training_data=block.get("current_task_training_data", True),
                  replay_memory=replay, plugins=tuple(block.get("plugins") or ()))


def _parse_truncation(block: Any) -> Truncation | None:
    if not isinstance(block, dict) or not block:
        return None
    return Truncation(context_length=block.get("context_length"), train=tuple(block.get("train") or ()),
                      test=tuple(block.get("test") or ()))


def query_set_digest(scenario) -> str:
    """Identifies the test queries (images and captions of every task, in order): two records
    can be paired query by query only when their digests are equal."""
    sha = hashlib.sha256()
    for name, test in zip(scenario.task_names, scenario.test):
        sha.update(f"task\0{name}\0".encode())
        for item in test:
            sha.update(f"{item.image_id}\0{len(item.captions)}\0".encode())
            for caption in item.captions:
                sha.update(caption.encode() + b"\0")
    return sha.hexdigest()
