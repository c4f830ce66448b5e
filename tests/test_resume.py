"""Checkpoints and ``run --resume``: an interrupted run, continued, ends exactly where an
uninterrupted run with the same seed ends.

Runs go through the command line (``benchmark.cli.main`` in-process, ``python -m benchmark``
in a subprocess for SIGKILL) on the random-weight ``clvl-tiny`` backbone and a three-task
synthetic stream with a handful of images, two epochs of two steps per task, and fine-tuning
with an Avalanche replay memory (so the replay buffer has to survive the interruption too).
Interruptions: an exception right after a chosen checkpoint (a crash), a real SIGINT / SIGTERM
delivered during a training step, and SIGKILL of a subprocess at several points.

"Exactly" is checked on everything a run produces: the recall matrices, the per-query ranks of
the final session and every tensor of the final method state (``--keep-checkpoints``), bit for
bit, plus the RNG state the run ends with.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark import checkpoint as ckpt
from benchmark import rng
from benchmark.run import loop
from benchmark.cli import main
from benchmark.errors import CheckpointError
from helpers import run_main

# Avalanche's ReplayPlugin calls its own deprecated storage-policy API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated function update:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "2", "--batch-size", "8",
        "--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
        "--set", "scenario_options.captions_per_image=2",
        "--set", "scenario_options.tasks=[colours,backdrops,textures]", "--no-tables", "--keep-checkpoints"]
REPLAY = ["--methods", "finetune", "--set", "method_params.finetune.replay_memory=6"]


class Crash(Exception):
    """Stands for a crash right after a checkpoint was written."""


def cli(out: Path, cache_dir: Path, *extra: str, method: list[str] = REPLAY) -> tuple[int, str]:
    code, _, err = run_main(["run", *method, *TINY, *extra, "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    return code, err


def outcome(out: Path) -> tuple[dict, dict]:
    """The run's record and its final checkpoint (kept by --keep-checkpoints)."""
    (record_path,) = (out / "runs").glob("*.json")
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    return json.loads(record_path.read_text()), torch.load(checkpoint, weights_only=True)


def assert_same_run(expected: tuple[dict, dict], actual: tuple[dict, dict]) -> None:
    (record_a, state_a), (record_b, state_b) = expected, actual
    assert record_b["run_id"] == record_a["run_id"]
    assert record_b["recall"] == record_a["recall"]
    assert record_b["final_session_queries"] == record_a["final_session_queries"]
    assert record_b["routing_accuracy"] == record_a["routing_accuracy"]
    assert state_b["completed_sessions"] == state_a["completed_sessions"] == len(record_a["tasks"])
    weights_a, weights_b = state_a["method_state"], state_b["method_state"]
    assert list(weights_b) == list(weights_a)
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, f"not bit-identical after resuming: {different[:5]}"
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])
    assert state_b["trainable"] == state_a["trainable"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference")
    code, err = cli(out, cache_dir)
    assert code == 0, err
    return outcome(out)


@contextlib.contextmanager
def crash_after_checkpoint(number: int):
    """Raise :class:`Crash` right after the ``number``-th checkpoint is saved."""
    original = loop.RunExecution._save
    saved = {"count": 0}

    def save(self, strategy=None):
        original(self, strategy)
        saved["count"] += 1
        if saved["count"] == number:
            raise Crash

    loop.RunExecution._save = save
    try:
        yield saved
    finally:
        loop.RunExecution._save = original


def summary(out: Path) -> dict:
    (path,) = (out / "checkpoints").rglob(ckpt.SUMMARY_NAME)
    return json.loads(path.read_text())


# ============================================================================ crashes


@pytest.mark.parametrize("crash_at, where", [(2, "after task 2/3")])
def test_resume_after_a_task_reaches_the_same_results(crash_at, where, tmp_path, cache_dir, reference):
    out = tmp_path / "out"
    with crash_after_checkpoint(crash_at), pytest.raises(Crash):
        cli(out, cache_dir)
    assert summary(out)["where"].startswith(where)
    assert not list((out / "runs").glob("*.json"))

    code, err = cli(out, cache_dir, "--resume")
    assert code == 0, err
    resumed = outcome(out)
    assert_same_run(reference, resumed)
    assert [r["from"][:len(where)] for r in resumed[0]["resumed"]] == [where]


@pytest.mark.parametrize("crash_at, where", [(3, "in task 1/3 (colours), epoch 2, step 1"),
                                             (7, "in task 2/3 (backdrops), epoch 1, step 2")])
def test_resume_inside_a_task_reaches_the_same_results(crash_at, where, tmp_path, cache_dir, reference):
    """With --checkpoint-every 1 a checkpoint lands after every step; continuing from one replays
    the interrupted epoch's data order and skips the steps already done."""
    out = tmp_path / "out"
    with crash_after_checkpoint(crash_at), pytest.raises(Crash):
        cli(out, cache_dir, "--checkpoint-every", "1")
    assert summary(out)["where"] == where
    state = torch.load(next((out / "checkpoints").rglob(ckpt.FILE_NAME)), weights_only=True)
    assert state["optimizer"]["state"], "a checkpoint inside a task keeps the optimizer's moments"

    code, err = cli(out, cache_dir, "--resume")
    assert code == 0, err
    assert_same_run(reference, outcome(out))


def test_an_interrupted_run_is_not_restarted_without_resume(tmp_path, cache_dir, reference):
    out = tmp_path / "out"
    with crash_after_checkpoint(1), pytest.raises(Crash):
        cli(out, cache_dir)
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    before = checkpoint.stat().st_mtime_ns

    code, err = cli(out, cache_dir)
    assert code == 2
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert reference[0]["run_id"] in line and "--resume" in line and "--force" in line
    assert "after task 1/3" in line
    assert checkpoint.stat().st_mtime_ns == before

    code, err = cli(out, cache_dir, "--force")  # start over: the same result as never interrupted
    assert code == 0, err
    restarted = outcome(out)
    assert_same_run(reference, restarted)
    assert restarted[0]["resumed"] == []


def test_finished_checkpoints_are_removed_unless_kept(tmp_path, cache_dir):
    out = tmp_path / "out"
    args = [a for a in TINY if a != "--keep-checkpoints"]
    code = main(["run", "--methods", "zeroshot", *args, "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0
    assert len(list((out / "runs").glob("*.json"))) == 1
    assert not (out / "checkpoints").exists()


# ============================================================================ signals


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_exits(signal_number, exit_code, tmp_path, cache_dir, reference):
    """The signal arrives during a training step of task 2: the run finishes that step, saves a
    checkpoint there, exits with 128 + the signal number and says how to continue."""
    out = tmp_path / "out"
    original = loop.RunExecution._after_step
    steps = {"count": 0}

    def after_step(self, strategy):
        steps["count"] += 1
        if steps["count"] == 6:  # task 2, epoch 1, step 2
            os.kill(os.getpid(), signal_number)
        original(self, strategy)

    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    loop.RunExecution._after_step = after_step
    try:
        code, err = cli(out, cache_dir)
    finally:
        loop.RunExecution._after_step = original
    assert code == exit_code, err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"interrupted by {signal.Signals(signal_number).name}")
    assert "in task 2/3 (backdrops), epoch 1, step 2" in message and "--resume" in message
    assert not list((out / "runs").glob("*.json"))

    code, err = cli(out, cache_dir, "--resume")
    assert code == 0, err
    assert_same_run(reference, outcome(out))


def _progress(where: str) -> float:
    """How far a checkpoint summary says the run got: 1.0 after task 1, 1.5 inside task 2, ..."""
    words = where.split()
    if len(words) < 3 or words[0] not in ("after", "in"):
        return 0.0
    task = int(words[2].split("/")[0])
    return float(task) if words[0] == "after" else task - 0.5


def _kill_when(process: subprocess.Popen, out: Path, reached: float, timeout: float = 300.0) -> str:
    """SIGKILL ``process`` as soon as its checkpoint shows at least ``reached`` progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the point where it was to be killed"
        try:
            where = summary(out)["where"]
        except (ValueError, OSError):  # not there yet, or being replaced
            where = ""
        if _progress(where) >= reached:
            process.kill()
            return where
        time.sleep(0.005)
    raise AssertionError("timed out waiting for a checkpoint")


def test_sigkill_at_several_points_then_resume(tmp_path, cache_dir, reference):
    """The fault test: ``python -m benchmark run`` killed with SIGKILL (no chance to clean up)
    inside task 2, resumed and killed again once task 2 is done, then resumed to the end: the
    result equals the uninterrupted run's."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmark", "run", *REPLAY, *TINY, "--cache-dir", str(cache_dir),
               "--output-dir", str(out), "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed_at = []
    for reached, extra in ((1.5, []), (2.0, ["--resume"])):
        process = subprocess.Popen([*command, *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            killed_at.append(_kill_when(process, out, reached))
        finally:
            process.kill()
            process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        assert not list((out / "runs").glob("*.json")), "a killed run wrote a record"
        # Whatever the moment of the kill, the checkpoint on disk is complete and loadable.
        (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
        torch.load(checkpoint, weights_only=True)
    assert _progress(killed_at[0]) < 2.0 <= _progress(killed_at[1]) < 3.0, killed_at

    code, err = cli(out, cache_dir, "--resume")
    assert code == 0, err
    resumed = outcome(out)
    assert_same_run(reference, resumed)
    assert [r["from"] for r in resumed[0]["resumed"]] == killed_at
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.suffix == ".tmp"]
    assert all(p.name.startswith(".") for p in leftovers)  # a kill mid-write leaves only a hidden temp file


# ============================================================================ determinism


def test_same_config_and_seed_give_identical_results(tmp_path, cache_dir, reference):
    out = tmp_path / "again"
    code, err = cli(out, cache_dir)
    assert code == 0, err
    assert_same_run(reference, outcome(out))
    assert outcome(out)[0]["provenance"]["deterministic_algorithms"] is False  # CPU needs no special mode

    other = tmp_path / "seed1"
    code, err = cli(other, cache_dir, "--seeds", "1")
    assert code == 0, err
    record, state = outcome(other)
    assert record["config_hash"] != reference[0]["config_hash"]
    assert any(not torch.equal(state["method_state"][k], reference[1]["method_state"][k])
               for k in state["method_state"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_mode_on_cuda_is_reproducible_and_resumable(tmp_path, cache_dir):
    gpu = ["--device", "cuda", "--set", "training.deterministic=true"]

    def run(out, *extra):
        code, err = cli(out, cache_dir, *gpu, *extra)
        assert code == 0, err
        return outcome(out)

    first = run(tmp_path / "a")
    assert first[0]["provenance"]["deterministic_algorithms"] is True
    assert_same_run(first, run(tmp_path / "b"))
    with crash_after_checkpoint(6), pytest.raises(Crash):
        cli(tmp_path / "c", cache_dir, *gpu, "--checkpoint-every", "1")
    assert_same_run(first, run(tmp_path / "c", "--resume"))
    assert not torch.are_deterministic_algorithms_enabled()  # the mode ends with the run


# ============================================================================ what a checkpoint holds


def test_checkpoint_is_plain_data_and_refuses_another_config(tmp_path, cache_dir, reference):
    record, state = reference
    assert state["schema"] == ckpt.SCHEMA and state["config_hash"] == record["config_hash"]
    assert {"torch", "numpy", "random"} <= set(state["rng"])
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["rng"]["torch"].dtype == torch.uint8
    assert len(state["replay_rng"]) == 3  # one per task: replay's memory is rebuilt from them
    path = tmp_path / "c" / ckpt.FILE_NAME
    ckpt.save(path, {k: v for k, v in state.items() if k != "schema"})
    assert ckpt.load(path, config_hash=record["config_hash"])["completed_sessions"] == 3
    with pytest.raises(CheckpointError, match="different configuration"):
        ckpt.load(path, config_hash="0" * 64)
    with pytest.raises(CheckpointError, match="plain data"):
        ckpt.save(path, {"task_names": [], "completed_sessions": 0, "odd": object()})


def test_rng_states_round_trip():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    saved = rng.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)
    rng.restore_rng(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert (ckpt.capture_rng, ckpt.restore_rng) == (rng.capture_rng, rng.restore_rng)  # the old import path


def test_a_registered_generator_must_have_a_plain_state(monkeypatch):
    """A generator a user registered with Avalanche's RNGManager is saved as it is, so its state
    must be plain data; anything else fails when it is captured, naming the generator."""
    from avalanche.training.determinism.rng_manager import RNGManager

    box = {"state": {"counter": 7, "buffer": torch.arange(3)}}
    monkeypatch.setitem(RNGManager.random_generators, "custom",
                        {"save_state": lambda: box["state"], "load_state": lambda state: box.update(loaded=state)})
    saved = rng.capture_rng()
    assert saved["custom"]["counter"] == 7 and torch.equal(saved["custom"]["buffer"], torch.arange(3))
    rng.restore_rng({"custom": {"counter": 8}})
    assert box["loaded"] == {"counter": 8}
    box["state"] = {"counter": object()}
    with pytest.raises(CheckpointError, match=r"random generator 'custom'\['counter'\].*plain data"):
        rng.capture_rng()


def test_a_method_that_does_not_rebuild_its_parameters_gets_a_clear_error():
    saved = torch.nn.ModuleDict({"prompt_0": torch.nn.Linear(2, 2), "prompt_1": torch.nn.Linear(2, 2)})
    rebuilt = torch.nn.ModuleDict({"prompt_0": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"prompt_1\.weight.*before_training_exp"):
        ckpt.restore_module(rebuilt, saved.state_dict(), [], "method 'toy'")


# ============================================================================ every method


def _trainable_methods() -> list[str]:
    from methods import available_methods

    return sorted(name for name, cls in available_methods().items() if cls.trains and name != "finetune")


# Fewer prompt tokens than the paper's 25 keep the L2P case quick.
TINY_PARAMS = {"l2p": ["--set", "method_params.l2p.top_k=3"]}


@pytest.mark.parametrize("method", _trainable_methods())
def test_every_registered_method_resumes_exactly(method, tmp_path, cache_dir):
    """Each shipped method, interrupted inside its second task and resumed, matches its own
    uninterrupted run (two tasks of one epoch, to keep it quick)."""
    two_tasks = ["--methods", method, *TINY_PARAMS.get(method, [])]
    quick = ["--set", "scenario_options.tasks=[colours,backdrops]", "--epochs", "1"]  # after TINY: these win
    code, err = cli(tmp_path / "a", cache_dir, *quick, method=two_tasks)
    assert code == 0, err
    with crash_after_checkpoint(4), pytest.raises(Crash):  # task 2, step 1 (2 steps + 1 boundary before it)
        cli(tmp_path / "b", cache_dir, *quick, "--checkpoint-every", "1", method=two_tasks)
    assert summary(tmp_path / "b")["where"] == "in task 2/2 (backdrops), epoch 1, step 1"
    code, err = cli(tmp_path / "b", cache_dir, *quick, "--resume", method=two_tasks)
    assert code == 0, err
    assert_same_run(outcome(tmp_path / "a"), outcome(tmp_path / "b"))
