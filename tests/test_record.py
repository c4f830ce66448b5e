"""benchmark.record: the run record's one owner.

``build`` is checked against a record written out by hand for a small fake run (key order
included, as the JSON must keep its layout); ``load`` against files damaged in the ways the
readers must survive; the rank codes against ranks decoded by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmark import record
from benchmark.config import RunConfig
from benchmark.io import atomic_write_json

TOP_LEVEL = ["schema", "run_id", "method", "scenario", "seed", "config", "config_hash", "protocol", "tasks",
             "task_counts", "scenario_info", "recall", "recall_initial", "routing_accuracy", "recall_tie_rule",
             "final_session_queries", "method_access", "method_adjusted", "captions_truncated", "costs", "resumed",
             "provenance", "created"]


@dataclasses.dataclass
class FakeParams:
    lr: float = 0.5


class FakeReplay:
    storage_policy = object()
    mem_size = 7


class FakeOther:
    pass


def fake_build(last_ranks=None, **overrides):
    """A two-task run built by record.build from stand-ins for the runner's objects."""
    run = SimpleNamespace(run_id="m__s__seed3__abcdef12", method_name="pkg:M", method_cls=SimpleNamespace(name="m"),
                          params=FakeParams(), seed=3, digest="abcdef1234")
    scenario = SimpleNamespace(name="s", task_names=("a", "b"), info={"options": {"n": 1}},
                               counts=lambda: [{"task": "a"}, {"task": "b"}])
    streams = SimpleNamespace(train_pairs=[SimpleNamespace(truncated_captions=1), SimpleNamespace(truncated_captions=0)],
                              galleries=[SimpleNamespace(truncated_captions=2, caption_tokens=torch.zeros(3, 32)),
                                         SimpleNamespace(truncated_captions=None, caption_tokens=torch.zeros(3, 32))])
    matrix = [[50.0, None], [40.0, 60.0]]
    arguments = dict(
        run=run, config=RunConfig(methods=["pkg:M"], seeds=[0, 3]), scenario=scenario, backbone="tiny",
        recall={d: {k: matrix for k in (1, 5, 10)} for d in ("i2t", "t2i")}, recall_initial=None, routing=None,
        last_ranks=last_ranks, query_set="digest" if last_ranks else None, plugins=[FakeReplay(), FakeOther()],
        task_identity="inferred", trains=True, streams=streams,
        parameter_counts={"trainable": 1, "total": 10, "backbone": 9, "added": 1, "per_task": None},
        forward_passes=1, wall_time_s=2.5, train_times=[1.0, 1.5], peak_memory=(100.0, "run_peak_rss"),
        earlier_peak_mb=150.0, resumed=[], machine={"device": "cpu"}, code={"harness_sha256": "h"},
        data_manifest={"files": []}, backbone_weights=None, deterministic_algorithms=False,
        created="2026-01-01T00:00:00+00:00")
    arguments.update(overrides)
    return record.build(**arguments)


def test_build_writes_the_documented_layout():
    built = fake_build()
    data = built.to_json()
    assert list(data) == TOP_LEVEL
    assert data["schema"] == "clvl-benchmark/run-record/v1" and data["method"] == "m" and data["seed"] == 3
    assert data["config_hash"] == "abcdef1234"
    # The effective config of this one run: its method, seed and backbone, no loggers.
    assert data["config"]["methods"] == ["pkg:M"] and data["config"]["seeds"] == [3]
    # method_params is keyed by the class name (one name per method), methods keeps the selector.
    assert data["config"]["method_params"] == {"m": {"lr": 0.5}} and data["config"]["backbone"] == "tiny"
    assert "loggers" not in data["config"]
    assert data["recall"]["t2i"] == {"1": [[50.0, None], [40.0, 60.0]], "5": [[50.0, None], [40.0, 60.0]],
                                     "10": [[50.0, None], [40.0, 60.0]]}
    assert data["recall_tie_rule"] == "expected" and data["final_session_queries"] is None
    assert data["method_access"] == {"task_labels_in_training": True, "task_identity_at_test": "inferred",
                                     "current_task_training_data": True,
                                     "replay_memory": [{"plugin": "FakeReplay", "mem_size": 7}],
                                     "plugins": ["FakeReplay", "FakeOther"]}
    assert data["captions_truncated"] == {"context_length": 32, "train": [1, 0], "test": [2, None]}
    assert data["costs"] == {"trainable_params": 1, "total_params": 10, "backbone_params": 9, "added_params": 1,
                             "params_per_task": None, "params_shared": None, "forward_passes_per_query": 1,
                             "wall_time_s": 2.5, "train_time_s_per_task": [1.0, 1.5],
                             "peak_memory_mb": 150.0, "peak_memory_kind": "run_peak_rss"}  # the earlier attempt's peak
    assert list(data["provenance"]) == ["device", "code", "data_manifest", "backbone_weights",
                                        "deterministic_algorithms"]
    # The typed view readers use agrees with the JSON.
    assert built.tasks == ("a", "b") and built.costs.peak_memory_mb == 150.0 and built.access.replay_memory[0].mem_size == 7
    assert math.isnan(built.recall["i2t"][1][0, 1]) and built.recall["i2t"][1][1, 1] == 60.0
    assert built.captions_truncated.total == 3


def test_final_session_queries_round_trip():
    # Task 0: ranks 0, 12 (10 or worse), 3 with a tie; task 1: rank 9 and a tie at rank 11 (beyond K=10: not kept).
    ranks = {d: {0: torch.tensor([[0, 0, 0], [12, 0, 0], [3, 2, 1]]), 1: torch.tensor([[9, 0, 0], [11, 4, 1]])}
             for d in ("i2t", "t2i")}
    data = fake_build(last_ranks=ranks).to_json()
    block = data["final_session_queries"]
    assert list(block) == ["query_set", "encoding", "i2t", "t2i"] and block["query_set"] == "digest"
    assert block["i2t"] == {"tasks": [0, 1], "counts": [3, 2], "ranks": "0x39x", "ties": [[2, 2, 1]]}
    decoded = record.RunRecord.from_json(data).final_queries["i2t"]
    assert [r.tolist() for r in decoded.per_task()] == [[0, 10, 3], [9, 10]]
    assert decoded.ties.tolist() == [[2, 2, 1]] and decoded.query_set == "digest"


def test_runner_and_stats_keep_the_old_names():
    from benchmark import runner, stats

    assert runner.encode_ranks is record.encode_ranks and runner.encode_ties is record.encode_ties
    assert runner.RECORD_SCHEMA == record.RECORD_SCHEMA and runner.RANK_BEYOND == stats.RANK_BEYOND == "x"


def test_load_round_trips_what_was_written(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", fake_build().to_json())
    loaded = record.load(path)
    assert loaded.path == path and loaded.to_json() == json.loads(path.read_text())
    assert loaded.protocol_label == "gallery=union, task_identity=inferred, tasks=seen"


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize(("content", "reason"), [
    ("{", "not valid JSON"),
    ({"name": "other tool"}, "not a run record (no 'schema' field"),
    ({"schema": "clvl-benchmark/run-record/v9"}, "unsupported schema"),
])
def test_strict_load_says_why_in_one_line(tmp_path, content, reason):
    path = write(tmp_path, "x.json", content)
    with pytest.raises(record.RecordError) as caught:
        record.load(path)
    assert caught.value.reason.startswith(reason) and str(caught.value) == f"{path}: {caught.value.reason}"
    assert "\n" not in str(caught.value)


def test_strict_load_checks_the_matrices(tmp_path):
    data = fake_build().to_json()
    data["recall"]["i2t"]["1"][1][0] = None  # a seen task left unevaluated
    with pytest.raises(record.RecordError, match=r"missing cell \(t=1, j=0\)"):
        record.load(write(tmp_path, "hole.json", data))
    data = fake_build().to_json()
    data["recall"]["t2i"]["5"][0][0] = 0.5e3
    with pytest.raises(record.RecordError, match="outside the 0..100 percent range"):
        record.load(write(tmp_path, "range.json", data))


def test_lenient_load_takes_any_record_of_this_harness(tmp_path):
    with pytest.raises(record.RecordError, match="does not exist"):
        record.load(tmp_path / "missing.json", strict=False)
    with pytest.raises(record.RecordError, match="is not a readable run record"):
        record.load(write(tmp_path, "broken.json", "{"), strict=False)
    with pytest.raises(record.RecordError, match="not a run record of this harness"):
        record.load(write(tmp_path, "other.json", {"name": "x"}), strict=False)
    future = {"schema": "clvl-benchmark/run-record/v2", "run_id": "r", "tasks": ["a"], "recall": {"i2t": {"1": [[7.0]]}}}
    loaded = record.load(write(tmp_path, "future.json", future), strict=False)
    assert loaded.run_id == "r" and loaded.recall["i2t"][1].tolist() == [[7.0]]
    assert loaded.costs is None and loaded.access is None and loaded.final_queries == {}


def test_malformed_query_ranks_leave_the_record_usable():
    data = fake_build().to_json()
    data["final_session_queries"] = {"query_set": "q", "i2t": {"tasks": [0], "counts": [3], "ranks": "0"},
                                     "t2i": {"tasks": [0], "counts": [2], "ranks": "1x"}}
    loaded = record.RunRecord.from_json(data)
    assert set(loaded.final_queries) == {"t2i"}
    assert loaded.final_queries["t2i"].ranks.tolist() == [1, 10]
    assert np.array_equal(loaded.final_queries["t2i"].bounds, [0, 2])
