"""benchmark.run: the factory every run builds through, the triage of planned runs, and the
module boundaries (the old benchmark.runner names, a strategy that does not import checkpointing)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark import runner
from benchmark.backbone import load_backbone
from benchmark.config import RunConfig, TrainingConfig
from benchmark.errors import ConfigError
from benchmark.run import RunControl, factory, planning
from benchmark.run.runtime import seed_everything
from benchmark.scenarios.streams import make_streams
from benchmark.testing import tiny_scenario, tiny_setup
from methods.base import TrainData
from methods.finetune import Finetune, FinetuneConfig

REPO = Path(__file__).resolve().parents[1]


def _quiet_tiny_backbone():
    logger = logging.getLogger("benchmark.backbone.resolve")  # "random weights" is the point here
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return load_backbone("clvl-tiny", device="cpu")
    finally:
        logger.setLevel(level)


# ============================================================================ the factory


def test_build_method_draws_random_numbers_in_the_runners_order():
    """Seed, load, wrap, seed again, build: the same weights as that sequence written out by hand,
    and a different seed gives different ones (so the comparison can fail)."""
    scenario = tiny_scenario(2)
    config = FinetuneConfig(trainable=["visual"])
    built = factory.build_method(Finetune, config, scenario, torch.device("cpu"), seed=5,
                                 load_backbone=_quiet_tiny_backbone)

    seed_everything(5)
    backbone = _quiet_tiny_backbone()
    make_streams(scenario, backbone)
    seed_everything(5)
    by_hand = Finetune(backbone, config, scenario.num_tasks)
    expected = by_hand.state_dict()
    state = built.method.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert built.backbone is built.method.backbone and built.scenario is scenario
    assert built.device == torch.device("cpu") and len(built.streams.galleries) == scenario.num_tasks

    other = factory.build_method(Finetune, config, scenario, torch.device("cpu"), seed=6,
                                 load_backbone=_quiet_tiny_backbone).method.state_dict()
    assert any(not torch.equal(other[k], expected[k]) for k in expected)


class _NeedsDeepBackbone(Finetune):
    """A method whose constructor refuses a setting only the backbone can judge."""

    name = "needs_deep_backbone"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        raise ValueError(f"needs_deep_backbone: {len(backbone.vision_blocks)} blocks are too few")


def test_a_rejected_method_config_is_a_config_error_only_for_the_runner():
    scenario = tiny_scenario(2)
    with pytest.raises(ValueError, match="blocks are too few") as raw:
        factory.build_method(_NeedsDeepBackbone, FinetuneConfig(), scenario, torch.device("cpu"), seed=0,
                             load_backbone=_quiet_tiny_backbone)
    assert not isinstance(raw.value, ConfigError)  # benchmark.testing sees what the method raised
    with pytest.raises(ConfigError, match=r"^method 'needs_deep_backbone': needs_deep_backbone: 3 blocks"):
        factory.build_method(_NeedsDeepBackbone, FinetuneConfig(), scenario, torch.device("cpu"), seed=0,
                             load_backbone=_quiet_tiny_backbone, config_errors=True)


class _Recording(Finetune):
    """Finetune that keeps what its hooks were given."""

    name = "recording_finetune"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, TrainData]] = []

    def before_training_exp(self, train_data):
        self.seen.append(("before", train_data))
        return super().before_training_exp(train_data)

    def after_training_exp(self, train_data):
        self.seen.append(("after", train_data))
        return super().after_training_exp(train_data)


def _item(dataset, index: int) -> list:
    with torch.random.fork_rng(devices=[]):  # training images are augmented at random: draw the same
        torch.manual_seed(index)
        return dataset[index]


def _same_train_data(a: TrainData, b: TrainData) -> bool:
    if (a.task_id, a.task_name, a.encode_batch_size, a.device, len(a.dataset)) != \
            (b.task_id, b.task_name, b.encode_batch_size, b.device, len(b.dataset)):
        return False
    return all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for i in range(len(a.dataset))
               for x, y in zip(_item(a.dataset, i), _item(b.dataset, i)))


def test_a_replay_hands_the_hooks_what_training_handed_them():
    """Resume and the state-dict check replay before_training_exp with train_data(task): it must
    be what the strategy gave the method while training (task, name, batch size, data)."""
    setup = tiny_setup(_Recording, FinetuneConfig(trainable=["visual"]))
    strategy = setup.make_strategy()
    for experience in setup.streams.train_stream:
        strategy.train(experience)
    seen = setup.method.seen
    assert [(hook, data.task_id) for hook, data in seen] == [("before", 0), ("after", 0), ("before", 1), ("after", 1)]
    for hook, data in seen:
        replayed = setup.train_data(data.task_id)
        assert _same_train_data(data, replayed), hook
        assert data.task_name == setup.scenario.task_names[data.task_id] and data.encode_batch_size == 8
    # The check tells the data of two tasks apart, not only their ids.
    other_task = dataclasses.replace(seen[0][1], dataset=setup.train_data(1).dataset)
    assert not _same_train_data(seen[0][1], other_task)


def test_build_strategy_takes_its_settings_from_the_training_config():
    setup = tiny_setup(Finetune)
    training = TrainingConfig(epochs=2, batch_size=4, eval_batch_size=16, num_workers=0)
    hook = object()
    strategy = factory.build_strategy(setup, training, plugins=[], step_hook=hook)
    assert (strategy.train_epochs, strategy.train_mb_size, strategy.eval_mb_size) == (2, 4, 16)
    assert strategy.method is setup.method and strategy.step_hook is hook
    assert list(strategy.task_names) == list(setup.scenario.task_names)


# ============================================================================ triage


def _planned(tmp_path: Path, record: bool, checkpoint: bool) -> planning.PlannedRun:
    run = planning.PlannedRun("finetune", Finetune, FinetuneConfig(), 0, "ab" * 32, "finetune__x__seed0__abababab",
                              tmp_path / "runs" / "r.json", tmp_path / "checkpoints" / "r" / "checkpoint.pt")
    for path, wanted in ((run.path, record), (run.checkpoint, checkpoint)):
        if wanted:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    return run


@pytest.mark.parametrize("record, checkpoint, control, expected", [
    (True, False, RunControl(), None),  # finished: skipped
    (True, False, RunControl(force=True), "start"),
    (False, True, RunControl(resume=True), "resume"),
    (False, True, RunControl(force=True), "start"),  # its checkpoint is discarded
    (False, False, RunControl(), "start"),
])
def test_triage_reads_force_from_run_control(tmp_path, record, checkpoint, control, expected):
    run = _planned(tmp_path, record, checkpoint)
    todo = planning.triage([run], control)
    assert todo.get(run.run_id) == expected
    if control.force and checkpoint:
        assert not run.checkpoint.exists()


def test_triage_stops_on_an_interrupted_run_without_resume_or_force(tmp_path):
    run = _planned(tmp_path, record=False, checkpoint=True)
    with pytest.raises(ConfigError, match="--resume.*--force"):
        planning.triage([run], RunControl())


def test_force_is_how_to_run_not_what():
    assert "force" not in {f.name for f in dataclasses.fields(RunConfig)}
    assert RunControl().force is False and RunControl(force=True).force is True


# ============================================================================ module boundaries


def test_the_strategy_does_not_import_checkpointing_or_the_runner():
    code = ("import sys, benchmark.strategy; "
            "print(sorted(m for m in sys.modules if m.startswith('benchmark')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    modules = json.loads(out.replace("'", '"'))
    assert "benchmark.strategy" in modules and "benchmark.rng" in modules
    assert not {m for m in modules if m == "benchmark.checkpoint" or m.startswith("benchmark.run")}


def test_benchmark_runner_keeps_its_names():
    from benchmark import record
    from benchmark.run import loop, runtime, signals

    assert runner.run_all is loop.run_all and runner.RunExecution is loop.RunExecution
    assert runner.RunControl is planning.RunControl and runner.plan_runs is planning.plan_runs
    assert runner.method_config is planning.method_config and runner.PlannedRun is planning.PlannedRun
    assert runner.seed_everything is runtime.seed_everything and runner.resolve_device is runtime.resolve_device
    assert runner.StopSignals is signals.StopSignals
    assert (runner.encode_ranks, runner.encode_ties, runner.RECORD_SCHEMA, runner.query_set_digest) == \
        (record.encode_ranks, record.encode_ties, record.RECORD_SCHEMA, record.query_set_digest)


def _identity_run(out: Path, digest: str, identity: dict) -> planning.PlannedRun:
    rid = planning.run_id("finetune", "synthetic", 0, digest)
    return planning.PlannedRun("finetune", Finetune, FinetuneConfig(), 0, digest, rid, out / "runs" / f"{rid}.json",
                               out / "checkpoints" / rid / "checkpoint.pt", identity)


def _leave_checkpoint(run: planning.PlannedRun, completed: int = 1) -> Path:
    from benchmark import checkpoint as ckpt

    return ckpt.save(run.checkpoint, {"run_id": run.run_id, "config_hash": run.digest, "identity": run.identity,
                                      "task_names": ["a", "b"], "completed_sessions": completed, "position": None})


def test_an_earlier_identity_is_only_a_change_of_data_or_code_of_an_unfinished_run(tmp_path):
    """--resume blocks (and --resume-anyway adopts) only a checkpoint of the same settings under other
    data or code; another sweep point's checkpoint, or a finished run's kept one, is none of its business."""
    base = {"method_params": {"lr": 0.1}, "training": {"epochs": 1}, "data": {"counts": [1]}, "code": "c1"}
    now = _identity_run(tmp_path, "a" * 64, {**base, "data": {"counts": [2]}})
    (tmp_path / "runs").mkdir()

    sweep = _leave_checkpoint(_identity_run(tmp_path, "b" * 64, {**base, "method_params": {"lr": 0.2}}))
    assert planning.triage([now], RunControl(resume=True)) == {now.run_id: "start"}

    finished = _identity_run(tmp_path, "c" * 64, base)
    _leave_checkpoint(finished)
    finished.path.write_text("{}")  # its record exists: the checkpoint was kept with --keep-checkpoints
    assert planning.triage([now], RunControl(resume=True)) == {now.run_id: "start"}

    trained_out = _leave_checkpoint(_identity_run(tmp_path, "d" * 64, base), completed=2)  # all tasks done
    assert planning.triage([now], RunControl(resume=True)) == {now.run_id: "start"}

    earlier = _leave_checkpoint(_identity_run(tmp_path, "e" * 64, base))
    with pytest.raises(ConfigError, match="changed the data"):
        planning.triage([now], RunControl(resume=True))
    assert planning.triage([now], RunControl(resume_anyway=True)) == {now.run_id: "adopt"}
    assert now.adopt_from == earlier
    assert sweep.exists() and trained_out.exists()


def test_resume_anyway_also_continues_a_runs_own_checkpoint(tmp_path):
    run = _identity_run(tmp_path, "f" * 64, {"data": {}})
    (tmp_path / "runs").mkdir()
    _leave_checkpoint(run)
    assert planning.triage([run], RunControl(resume_anyway=True)) == {run.run_id: "resume"}
