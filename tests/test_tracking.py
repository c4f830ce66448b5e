"""Experiment tracking (``--logger``), the per-run ``run.log`` and the evaluation progress.

Every check reads what the loggers wrote back with a reader of its own (TensorBoard's
``EventAccumulator``, pandas, W&B's offline run folder) and compares it with the run record,
which the runner writes by another code path. Runs use the tiny synthetic stream of
``test_faults`` (clvl-tiny backbone, 8 training images, 2 tasks, 1 epoch, batch 4).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.run import loop as runner  # the module whose globals the patches below replace
from benchmark.cli import main
from benchmark.evaluation import DIRECTIONS, KS
from helpers import BASE, SYNTHETIC, error_line, run_main

TASKS = ["colours", "backdrops"]


def run(out: Path, cache_dir: Path, *extra: str, methods: str = "finetune,sprompts") -> tuple[int, str, str]:
    return run_main(["run", "--methods", methods, *BASE, *SYNTHETIC, *extra, "--cache-dir", str(cache_dir),
                     "--output-dir", str(out)])


def the_records(out: Path) -> dict[str, dict]:
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")))}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_points(record: dict) -> dict[str, list[tuple[int, float]]]:
    """The record's recall matrices and routing accuracy as (session, value) series per logged name."""
    names = record["tasks"]
    points: dict[str, list[tuple[int, float]]] = {}
    for d in DIRECTIONS:
        for k in KS:
            for t, row in enumerate(record["recall"][d][str(k)]):
                for j, value in enumerate(row):
                    if value is not None:
                        points.setdefault(f"recall/{d}/R@{k}/task_{names[j]}", []).append((t, value))
    for modality, matrix in (record["routing_accuracy"] or {}).items():
        for t, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value is not None:
                    points.setdefault(f"routing/{modality}/task_{names[j]}", []).append((t, value))
    return points


def training_steps(record: dict) -> int:
    """Steps of the whole run: every training pair (caption) once per epoch, in batches (a last batch
    of a single pair is dropped: it has no negatives)."""
    batch, epochs = record["config"]["training"]["batch_size"], record["config"]["training"]["epochs"]
    pairs = [task["train_captions"] for task in record["task_counts"]]
    return epochs * sum(n // batch + (n % batch > 1) for n in pairs)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("tracked") / "out"
    code, stdout, stderr = run(out, cache_dir, "--logger", "tensorboard,csv")
    assert code == 0, stderr
    return out, the_records(out)


def test_tensorboard_recall_and_routing_equal_the_record(tracked):
    out, records = tracked
    assert set(records) == {"finetune", "sprompts"}
    for record in records.values():
        scalars = tensorboard_scalars(out / "logs" / record["run_id"] / "tensorboard")
        expected = expected_points(record)
        assert any(name.startswith("routing/") for name in expected) == (record["method"] == "sprompts")
        logged = {name: series for name, series in scalars.items() if not name.startswith("train/")}
        assert set(logged) == set(expected)
        for name, series in expected.items():
            assert [step for step, _ in logged[name]] == [step for step, _ in series], name
            for (_, got), (_, want) in zip(logged[name], series):
                assert got == pytest.approx(want, abs=1e-4), name  # event files store float32


def test_tensorboard_has_one_loss_and_lr_point_per_training_step(tracked):
    out, records = tracked
    for record in records.values():
        scalars = tensorboard_scalars(out / "logs" / record["run_id"] / "tensorboard")
        total = training_steps(record)
        assert total > len(TASKS)
        for name in ("train/loss", "train/lr"):
            assert [step for step, _ in scalars[name]] == list(range(total)), name
        assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
        lr = record["config"]["method_params"][record["method"]]["lr"]
        assert scalars["train/lr"][0][1] == pytest.approx(lr, rel=1e-6)  # the first step runs at the base rate


def test_csv_holds_the_same_values_exactly(tracked):
    out, records = tracked
    for record in records.values():
        frame = pd.read_csv(out / "logs" / record["run_id"] / "metrics.csv")
        assert list(frame.columns) == ["metric", "step", "value"]
        for name, series in expected_points(record).items():
            rows = frame[frame.metric == name]
            assert rows.step.tolist() == [step for step, _ in series], name
            assert rows.value.to_numpy() == pytest.approx([v for _, v in series], abs=1e-6), name
        loss = frame[frame.metric == "train/loss"]
        assert loss.step.tolist() == list(range(training_steps(record)))


def test_each_run_writes_a_run_log_beside_its_record(tracked):
    out, records = tracked
    for record in records.values():
        text = (out / "runs" / f"{record['run_id']}.log").read_text()
        assert record["run_id"] in text and "finished" in text
        for task in TASKS:
            assert task in text
        assert f"after {TASKS[-1]}: R@1" in text  # the per-session summary line reached the file


def test_loggers_do_not_change_the_run_identity_or_its_record(tracked, tmp_path, cache_dir, caplog):
    out, records = tracked
    caplog.set_level("INFO", logger="benchmark")
    code, _, stderr = run(out, cache_dir, methods="finetune")  # same run, no logger: found in the cache
    assert code == 0, stderr
    assert f"skipping {records['finetune']['run_id']}: finished already" in caplog.text
    assert the_records(out)["finetune"]["created"] == records["finetune"]["created"]
    plain = tmp_path / "plain"
    code, _, stderr = run(plain, cache_dir, methods="finetune")
    assert code == 0, stderr
    other = the_records(plain)["finetune"]
    assert other["run_id"] == records["finetune"]["run_id"]
    assert other["config_hash"] == records["finetune"]["config_hash"]
    assert other["recall"] == records["finetune"]["recall"]
    assert "loggers" not in other["config"] and "loggers" not in records["finetune"]["config"]
    assert not (plain / "logs").exists()


@pytest.mark.parametrize("value, fragment", [("nonsense", "unknown logger 'nonsense'"),
                                             ("tensorbord", "did you mean 'tensorboard'")])
def test_unknown_logger_is_a_one_line_error(value, fragment, tmp_path, cache_dir):
    code, _, stderr = run(tmp_path / "out", cache_dir, "--logger", value, methods="finetune")
    assert code == 2
    error_line(stderr, fragment)
    assert not (tmp_path / "out" / "runs").exists()  # before anything was written


def test_a_missing_wandb_package_is_a_one_line_error(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` fails, find_spec says None
    code, _, stderr = run(tmp_path / "out", cache_dir, "--logger", "wandb", methods="finetune")
    assert code == 2
    error_line(stderr, "logger 'wandb' needs the wandb package")
    assert not list((tmp_path / "out").rglob("*.json"))


def test_yaml_loggers_are_validated(tmp_path):
    from benchmark.config import build_config
    from benchmark.errors import ConfigError

    assert build_config(None, None, ["loggers=csv,tensorboard,csv"]).loggers == ["csv", "tensorboard"]
    (tmp_path / "run.yaml").write_text("loggers: [tensorboard, wandb]\n")
    assert build_config(tmp_path / "run.yaml").loggers == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="loggers must be a list"):
        build_config(None, None, ["loggers={a: 1}"])


def test_a_resumed_run_logs_every_step_once_and_appends_to_its_run_log(tmp_path, cache_dir, monkeypatch):
    """Killed two steps into the second task (its last checkpoint: after the first task), then
    resumed: the steps trained again are not drawn twice, and the logs still equal the record."""
    out = tmp_path / "out"
    original = runner.RunExecution._after_step
    first_task_steps = []

    def killed(self, strategy):
        original(self, strategy)
        if strategy.clock.train_exp_counter == 1 and strategy.clock.train_exp_iterations == 2:
            first_task_steps.append(strategy.clock.train_iterations - 2)
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runner.RunExecution, "_after_step", killed)
        code, _, stderr = run(out, cache_dir, "--logger", "tensorboard,csv", methods="finetune")
    assert code == 130, stderr
    (log_file,) = (out / "runs").glob("*.log")
    before = log_file.read_text()
    assert "stopped by KeyboardInterrupt" in before
    code, _, stderr = run(out, cache_dir, "--logger", "tensorboard,csv", "--resume", methods="finetune")
    assert code == 0, stderr
    record = the_records(out)["finetune"]
    total = training_steps(record)
    assert 0 < first_task_steps[0] < total - 2  # some steps were logged, lost and trained again

    scalars = tensorboard_scalars(out / "logs" / record["run_id"] / "tensorboard")
    frame = pd.read_csv(out / "logs" / record["run_id"] / "metrics.csv")
    for name in ("train/loss", "train/lr"):
        assert [step for step, _ in scalars[name]] == list(range(total)), name
        assert frame[frame.metric == name].step.tolist() == list(range(total)), name
    for name, series in expected_points(record).items():
        assert [(s, pytest.approx(v, abs=1e-4)) for s, v in series] == scalars[name], name
        rows = frame[frame.metric == name]
        assert list(zip(rows.step, rows.value)) == [(s, pytest.approx(v, abs=1e-6)) for s, v in series], name

    after = log_file.read_text()
    assert after.startswith(before)  # appended, not rewritten
    assert "continuing from a checkpoint" in after[len(before):] and after.rstrip().endswith("finished")


def test_wandb_offline_run_gets_the_same_values(tmp_path, cache_dir, monkeypatch):
    """W&B in offline mode (no network): a run folder per run, and what reaches ``Run.log`` (spied
    on, then passed on to W&B) regroups into the record's matrices."""
    wandb = pytest.importorskip("wandb", reason="the wandb package is not installed")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config")),
                        ("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))):
        monkeypatch.setenv(name, value)
    from wandb.sdk.wandb_run import Run

    calls = []
    real_log = Run.log

    def spy(self, data, step=None, **kwargs):
        calls.append((dict(data), step))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(Run, "log", spy)
    out = tmp_path / "out"
    code, _, stderr = run(out, cache_dir, "--logger", "wandb", methods="sprompts")
    assert code == 0, stderr
    record = the_records(out)["sprompts"]
    (folder,) = (out / "logs" / record["run_id"] / "wandb").glob("offline-run-*")
    assert [p.stat().st_size > 0 for p in folder.glob("run-*.wandb")] == [True]

    steps = [step for _, step in calls]
    assert steps == sorted(steps)  # W&B drops values logged at a step lower than the last one
    merged: dict[int, dict] = {}
    for data, step in calls:
        merged.setdefault(step, {}).update(data)
    logged: dict[str, list[tuple[int, float]]] = {}
    for values in merged.values():
        if "session" in values:
            for name, value in values.items():
                if name != "session":
                    logged.setdefault(name, []).append((values["session"], value))
    expected = expected_points(record)
    assert any(name.startswith("routing/") for name in expected)
    assert set(logged) == set(expected)
    for name, series in expected.items():
        assert [s for s, _ in logged[name]] == [s for s, _ in series], name
        assert [v for _, v in logged[name]] == pytest.approx([v for _, v in series], abs=1e-6), name
    train = [values for values in merged.values() if "train/step" in values]
    assert [values["train/step"] for values in train] == list(range(training_steps(record)))
    assert all("train/loss" in values and "train/lr" in values for values in train)


def test_evaluation_reports_progress_without_changing_results(tmp_path, cache_dir, monkeypatch):
    """Each evaluation feeds its own progress bar: every test image and caption is counted once,
    and the results are those of an evaluation without a progress callback."""
    from benchmark import evaluation

    real = runner.evaluate_session
    seen = []

    def watched(method, galleries, session, protocol, **kwargs):
        assert kwargs.get("progress") is not None
        counted = []
        with_bar = real(method, galleries, session, protocol, **{**kwargs, "progress": counted.append})
        without = real(method, galleries, session, protocol, **{**kwargs, "progress": None})
        assert with_bar.recall == without.recall and with_bar.routing == without.routing
        expected = sum(len(galleries[j]) + len(galleries[j].caption_tokens)
                       for j in evaluation.evaluated_tasks(session, len(galleries), protocol))
        seen.append((session, sum(counted), expected))
        kwargs["progress"](sum(counted))  # keep the runner's own bar going
        return with_bar

    monkeypatch.setattr(runner, "evaluate_session", watched)
    code, _, stderr = run(tmp_path / "out", cache_dir, methods="sprompts")
    assert code == 0, stderr
    assert [s for s, _, _ in seen] == [0, 1]
    assert all(counted == expected > 0 for _, counted, expected in seen)
    assert seen[1][2] > seen[0][2]  # the union gallery grows with the tasks


def test_log_lines_are_printed_through_the_progress_bars(tmp_path, cache_dir, monkeypatch):
    """While a run shows progress bars, a console log handler writes with ``tqdm.write`` (which
    clears and redraws the bars) instead of printing into them."""
    written = []
    real_write = runner.tqdm.write

    def write(text, file=None, end="\n", nolock=False):
        written.append(text)
        return real_write(text, file=file, end=end, nolock=nolock)

    monkeypatch.setattr(runner.tqdm, "write", write)
    err = io.StringIO()
    root = logging.getLogger()
    with contextlib.redirect_stderr(err):
        console = logging.StreamHandler(sys.stderr)  # what logging.basicConfig installs
        root.addHandler(console)
        try:
            code = main(["run", "--methods", "finetune", *BASE, *SYNTHETIC, "--cache-dir", str(cache_dir),
                         "--output-dir", str(tmp_path / "out")])
        finally:
            root.removeHandler(console)
    assert code == 0, err.getvalue()
    assert any(f"after {TASKS[-1]}: R@1" in text for text in written), written
    assert f"after {TASKS[-1]}: R@1" in err.getvalue()  # still on the console
