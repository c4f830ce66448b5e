"""The command line (``python -m benchmark``), called in-process through ``benchmark.cli.main``.

Runs use the random-weight ``clvl-tiny`` backbone and a two-task synthetic stream with a handful
of images, so a whole run takes seconds. Fixture data roots come from ``test_scenarios``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from helpers import LPI_ORDER, run_main, write_coco_supercat, write_image, write_table

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "clvl-benchmark/run-record/v1"
TASKS = ["colours", "backdrops"]
TINY = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "8",
        "--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
        "--set", "scenario_options.captions_per_image=2", "--set", f"scenario_options.tasks=[{','.join(TASKS)}]"]


def records(out_dir: Path) -> dict[str, dict]:
    """method -> record, for every record under out_dir/runs."""
    found = {}
    for path in sorted((out_dir / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        found[record["method"]] = record
    return found


def record_path(out_dir: Path, method: str) -> Path:
    (path,) = (out_dir / "runs").glob(f"{method}__*.json")
    return path


def check_lower_triangle(matrix, T: int) -> None:
    assert len(matrix) == T and all(len(row) == T for row in matrix)
    for t in range(T):
        for j in range(T):
            if j > t:
                assert matrix[t][j] is None, f"R[{t}][{j}] above the diagonal should be null under tasks=seen"
            else:
                assert isinstance(matrix[t][j], float) and 0.0 <= matrix[t][j] <= 100.0


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, cache_dir):
    """One run of zeroshot + finetune (seed 0) with its tables; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("e2e") / "out"
    argv = ["run", "--methods", "zeroshot,finetune", *TINY, "--set", "method_params.finetune.lr=5e-4",
            "--cache-dir", str(cache_dir), "--output-dir", str(out)]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    return {"out": out, "argv": argv, "stdout": stdout, "stderr": stderr}


# ============================================================================ listing


def test_scenarios_lists_builtins_with_task_counts_and_needs(capsys):
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    expected = {"synthetic": "3", "flickr_coco": "2", "coco_supercat": "12", "custom": "any"}
    for name, tasks in expected.items():
        (index,) = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        assert re.search(rf"tasks:\s+{tasks}\b", lines[index]), lines[index]
        assert lines[index + 1].strip().startswith("needs:")
    needs = {name: lines[[i for i, l in enumerate(lines) if l.split()[:1] == [name]][0] + 1] for name in expected}
    assert "dataset_flickr30k.json" in needs["flickr_coco"]
    assert "instances" in needs["coco_supercat"] and "captions" in needs["coco_supercat"]
    assert "nothing" in needs["synthetic"]


def test_scenarios_describe_coco_supercat(tmp_path, capsys):
    root = write_coco_supercat(tmp_path / "data")
    assert main(["scenarios", "--describe", "coco_supercat", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("coco_supercat: 12 tasks")
    assert "'train': 1" in out and "'val': 2" in out  # dropped images without instances
    table = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in LPI_ORDER]
    assert [row[0] for row in table] == LPI_ORDER
    rows = {row[0]: [int(v) for v in row[1:]] for row in table}  # train images/captions, test images/captions
    assert rows["person"] == [2, 5, 1, 2]
    assert rows["kitchen"] == [1, 2, 2, 6]
    assert rows["animal"] == [1, 2, 1, 2]

    assert main(["scenarios", "--describe", "coco_supercat", "--data-root", str(root), "--set", "assign=largest"]) == 0
    rows = {r[0]: [int(v) for v in r[1:]] for r in (l.split() for l in capsys.readouterr().out.splitlines())
            if r and r[0] in LPI_ORDER}
    assert rows["animal"] == [2, 5, 1, 2] and rows["person"] == [1, 2, 1, 2] and rows["food"] == [1, 2, 2, 6]


def test_scenarios_describe_with_missing_data(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["scenarios", "--describe", "flickr_coco", "--data-root", str(empty)]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, "dataset_flickr30k.json", "dataset_coco.json", "datasets/README.md")
    assert captured.out == ""


def test_methods_lists_builtins(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    assert "zeroshot" in names and "finetune" in names
    zeroshot = next(line for line in lines if line.startswith("zeroshot"))
    assert "methods.zeroshot." in zeroshot and "task identity" in zeroshot


def test_run_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--methods", "--scenario", "--seeds", "--backbone", "--device", "--set", "--gallery",
                   "--task-identity", "--eval-tasks", "--data-root", "--output-dir", "--cache-dir", "--epochs",
                   "--batch-size", "--force", "--no-tables"):
        assert re.search(rf"^\s+{re.escape(option)}\b", text, re.MULTILINE), f"{option} is not documented"
    assert "per_task" in text and "given" in text and "KEY=VALUE" in text


def test_module_entry_point_and_exit_codes(tmp_path):
    """``python -m benchmark`` is the CLI: exit 0 for help, 2 for usage and user errors."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "benchmark", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("run", "table", "scenarios", "methods"):
        assert command in done.stdout

    done = subprocess.run([sys.executable, "-m", "benchmark", "frobnicate"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "benchmark", "table", str(empty)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, str(empty))


def help_texts(capsys) -> dict[str, str]:
    """--help of the main parser and of every subcommand, as main() prints them."""
    texts = {}
    for argv in (["--help"], *([command, "--help"] for command in ("run", "table", "show", "scenarios", "methods"))):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        texts[" ".join(argv)] = capsys.readouterr().out
    return texts


def test_prog_is_how_the_program_was_started(capsys):
    """The console script is clvl-benchmark (main() with no prog); `python -m benchmark` says so."""
    for argv, text in help_texts(capsys).items():
        assert text.startswith("usage: clvl-benchmark "), f"{argv}: {text[:80]!r}"
        assert "python -m benchmark" not in text, argv
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "benchmark", "run", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmark run ")
    assert "  python -m benchmark run --methods zeroshot,finetune" in done.stdout
    script = Path(sys.executable).with_name("clvl-benchmark")  # installed by `pip install -e .`
    if script.is_file():
        done = subprocess.run([str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: clvl-benchmark ")


def test_help_is_plain_text(capsys):
    """No reStructuredText markup (``code``, :func:`x`, `x`) in any --help."""
    for argv, text in help_texts(capsys).items():
        for markup in ("``", ":func:", ":class:", ":mod:", ":data:", "`"):
            assert markup not in text, f"{markup!r} in `{argv}`:\n{text}"
    from benchmark.cli import plain

    assert plain("see ``run --resume``, :func:`~benchmark.runner.plan_runs` and :class:`methods.base.Method`") == \
        "see run --resume, plan_runs and methods.base.Method"
    assert plain("a `default role` word") == "a default role word"


@pytest.fixture
def restore_logging():
    """main() sets logger levels and a filter on the root logger: put them back after the test."""
    root = logging.getLogger()
    names = ("benchmark", "methods", "open_clip")
    saved = root.level, list(root.filters), {name: logging.getLogger(name).level for name in names}
    yield
    root.setLevel(saved[0])
    root.filters[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_verbose_before_or_after_the_subcommand(restore_logging, capsys):
    from benchmark.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods", "-v"]).verbose is True
    assert parser.parse_args(["run", "--verbose", "--seeds", "1"]).verbose is True
    assert parser.parse_args(["methods"]).verbose is False
    assert main(["scenarios", "-v"]) == 0
    assert logging.getLogger("benchmark").getEffectiveLevel() == logging.DEBUG
    assert main(["scenarios"]) == 0
    assert logging.getLogger("benchmark").getEffectiveLevel() == logging.INFO


def test_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    try:
        expected = importlib.metadata.version("clvl-benchmark")
    except importlib.metadata.PackageNotFoundError:
        expected = None
    out = capsys.readouterr().out
    assert re.fullmatch(r"clvl-benchmark \S+\n", out), out
    if expected is not None:
        assert out == f"clvl-benchmark {expected}\n"


def test_open_clip_info_only_with_verbose(tmp_path, caplog, restore_logging, capsys):
    """open_clip logs on the root logger (``logging.info`` in open_clip/factory.py); the command
    line files those records under ``open_clip.*`` and shows their INFO only with -v, even where
    the root logger lets everything through."""
    from benchmark.backbone import load_backbone

    def open_clip_records(verbose: bool) -> list[logging.LogRecord]:
        assert main(["methods", *(["-v"] if verbose else [])]) == 0
        caplog.clear()
        load_backbone("clvl-tiny", cache_dir=tmp_path)
        return [r for r in caplog.records if f"{os.sep}open_clip{os.sep}" in r.pathname]

    caplog.set_level(logging.DEBUG)  # an application that logs everything on the root logger
    quiet = open_clip_records(verbose=False)
    assert quiet, "open_clip logged nothing: this test no longer checks anything"
    assert all(r.levelno >= logging.WARNING for r in quiet), [r.getMessage() for r in quiet]
    assert all(r.name.startswith("open_clip.") for r in quiet), [r.name for r in quiet]

    logging.getLogger().setLevel(logging.WARNING)  # the default: -v has to open the root logger to INFO
    verbose = open_clip_records(verbose=True)
    assert any(r.levelno == logging.INFO and "model config" in r.getMessage() for r in verbose)
    assert all(r.name.startswith("open_clip.") for r in verbose), [r.name for r in verbose]


def test_run_keeps_stderr_free_of_library_noise(tmp_path, cache_dir):
    """A real `python -m benchmark run`: no qpsolvers import warning (Avalanche imports qpsolvers,
    which warns that no QP solver is installed), and open_clip's messages under its own name."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-m", "benchmark", "run", "--methods", "zeroshot", *TINY, "--no-tables",
                           "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "QP solver" not in done.stderr and "qpsolvers" not in done.stderr, done.stderr
    assert not re.search(r"^\w+ root:", done.stderr, re.MULTILINE), done.stderr
    assert "Loaded built-in" not in done.stderr and "Parsing model identifier" not in done.stderr, done.stderr
    assert "WARNING open_clip.factory: No pretrained weights loaded" in done.stderr, done.stderr


# ============================================================================ end to end


def test_run_writes_one_record_per_method(e2e):
    out = e2e["out"]
    assert sorted(p.name.split("__")[0] for p in (out / "runs").glob("*.json")) == ["finetune", "zeroshot"]
    assert "2 run record(s)" in e2e["stdout"]
    found = records(out)
    T = len(TASKS)
    for method, record in found.items():
        assert record["schema"] == SCHEMA
        assert record["method"] == method and record["scenario"] == "synthetic" and record["seed"] == 0
        assert record["tasks"] == TASKS
        assert record["run_id"] == record_path(out, method).stem
        assert record["run_id"].endswith(record["config_hash"][:8])
        assert re.fullmatch(r"[0-9a-f]{64}", record["config_hash"])
        assert record["protocol"] == {"gallery": "union", "task_identity": "inferred", "tasks": "seen"}
        assert record["recall_initial"] is None
        assert set(record["recall"]) == {"i2t", "t2i"}
        for direction in ("i2t", "t2i"):
            assert set(record["recall"][direction]) == {"1", "5", "10"}
            for k in ("1", "5", "10"):
                check_lower_triangle(record["recall"][direction][k], T)
            # recall grows with K
            for t in range(T):
                for j in range(t + 1):
                    r1, r5, r10 = (record["recall"][direction][k][t][j] for k in ("1", "5", "10"))
                    assert r1 <= r5 <= r10
        assert [c["task"] for c in record["task_counts"]] == TASKS
        assert all(c["train_images"] == 8 and c["test_images"] == 4 and c["test_captions"] == 8
                   for c in record["task_counts"])

        versions = record["provenance"]["versions"]
        for package in ("python", "torch", "open_clip_torch", "avalanche-lib"):
            assert versions.get(package), f"provenance lacks the {package} version"
        costs = record["costs"]
        assert costs["wall_time_s"] > 0 and len(costs["train_time_s_per_task"]) == T
        assert costs["total_params"] > 0 and costs["total_params"] == costs["backbone_params"] + costs["added_params"]
        assert "peak_memory_mb" in costs

    assert found["zeroshot"]["costs"]["trainable_params"] == 0
    assert found["finetune"]["costs"]["trainable_params"] > 0
    assert found["zeroshot"]["config_hash"] != found["finetune"]["config_hash"]
    # zeroshot never trains: with a union gallery, adding task 1 can only make task 0 harder
    zs = found["zeroshot"]["recall"]["i2t"]["10"]
    assert zs[1][0] <= zs[0][0]


def test_record_holds_the_effective_config(e2e):
    from methods.finetune import FinetuneConfig
    from methods.zeroshot import ZeroShotConfig

    found = records(e2e["out"])
    finetune = found["finetune"]["config"]
    expected = dataclasses.asdict(FinetuneConfig())
    expected["lr"] = 5e-4  # "5e-4" from --set, coerced to float
    assert finetune["method_params"] == {"finetune": expected}
    assert isinstance(finetune["method_params"]["finetune"]["lr"], float)
    assert finetune["methods"] == ["finetune"] and finetune["seeds"] == [0]
    assert finetune["backbone"] == "clvl-tiny"
    assert finetune["training"]["epochs"] == 1 and finetune["training"]["batch_size"] == 8
    assert finetune["scenario_options"]["tasks"] == TASKS
    assert finetune["protocol"] == found["finetune"]["protocol"]
    assert found["zeroshot"]["config"]["method_params"] == {"zeroshot": dataclasses.asdict(ZeroShotConfig())}
    options = found["finetune"]["scenario_info"]["options"]
    assert options == {"tasks": TASKS, "train_images": 8, "test_images": 4, "captions_per_image": 2, "data_seed": 0}


def test_record_and_show_say_what_ran_when_the_backbone_clipped_a_setting(tmp_path, cache_dir):
    """lpi asks for depth 9 and 16 prompt tokens; clvl-tiny has 3 blocks and takes 15: both are recorded."""
    out = tmp_path / "out"
    code, _, err = run_main(["run", "--methods", "lpi", *TINY, "--set", "scenario_options.tasks=[colours]",
                             "--cache-dir", str(cache_dir), "--output-dir", str(out), "--no-tables"])
    assert code == 0, err
    assert "depth 9 used as 3" in err and "prompt_length 16 used as 15" in err
    record = records(out)["lpi"]
    assert record["config"]["method_params"]["lpi"]["depth"] == 9  # asked: the run's identity
    used = {k: (v["asked"], v["used"]) for k, v in record["method_adjusted"].items()}
    assert used == {"prompt_length": (16, 15), "depth": (9, 3)}
    (path,) = (out / "runs").glob("lpi__*.json")
    code, card, _ = run_main(["show", str(path)])
    assert code == 0
    assert re.search(r"depth = 9  -> ran with 3 \(the encoders' block count", card), card


def test_run_writes_tables_and_heatmaps(e2e):
    out = e2e["out"]
    for suffix in ("csv", "md", "tex"):
        (table,) = (out / "tables").rglob(f"results.{suffix}")
        text = table.read_text()
        assert "zeroshot" in text and "finetune" in text
        assert f"wrote {table}" in e2e["stdout"]
    heatmaps = sorted(p.name for p in (out / "figures").rglob("*.png"))
    assert any("zeroshot" in name for name in heatmaps) and any("finetune" in name for name in heatmaps)
    for png in (out / "figures").rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_existing_records_and_force_reruns(e2e, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(e2e["out"], out)
    before = {m: record_path(out, m).stat().st_mtime_ns for m in ("zeroshot", "finetune")}
    argv = [a if a != str(e2e["out"]) else str(out) for a in e2e["argv"]]

    caplog.set_level(logging.INFO, logger="benchmark")
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    assert {m: record_path(out, m).stat().st_mtime_ns for m in before} == before
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and all("--force" in message for message in skipped)
    assert "2 run record(s)" in stdout

    caplog.clear()
    index = argv.index("method_params.finetune.lr=5e-4")  # finetune's params cannot be given without finetune
    only_zeroshot = argv[:index - 1] + argv[index + 1:]
    only_zeroshot[only_zeroshot.index("zeroshot,finetune")] = "zeroshot"
    code, _, stderr = run_main(only_zeroshot + ["--force"])
    assert code == 0, stderr
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]
    assert record_path(out, "zeroshot").stat().st_mtime_ns != before["zeroshot"]
    assert record_path(out, "finetune").stat().st_mtime_ns == before["finetune"]  # not asked for
    assert len(list((out / "runs").glob("*.json"))) == 2  # same run id: replaced, not added
    # force says how to run, not what: it is no longer part of a record's config.
    assert "force" not in json.loads(record_path(out, "zeroshot").read_text())["config"]


def test_table_rebuilds_from_records_alone(e2e, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(e2e["out"] / "runs", results / "runs")
    assert main(["table", str(results)]) == 0
    stdout = capsys.readouterr().out
    for suffix in ("csv", "md", "tex"):
        (rebuilt,) = (results / "tables").rglob(f"results.{suffix}")
        (original,) = (e2e["out"] / "tables").rglob(f"results.{suffix}")
        assert rebuilt.read_text() == original.read_text()
        assert f"wrote {rebuilt}" in stdout
    assert len(list((results / "figures").rglob("*.png"))) == 2

    elsewhere = tmp_path / "elsewhere"
    assert main(["table", str(results), "--out", str(elsewhere)]) == 0
    assert list((elsewhere / "tables").rglob("results.csv"))


def test_eval_tasks_all_fills_the_matrix(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, _, stderr = run_main(["run", "--methods", "zeroshot", *TINY, "--eval-tasks", "all", "--no-tables",
                                "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0, stderr
    assert not (out / "tables").exists()  # --no-tables
    record = records(out)["zeroshot"]
    assert record["protocol"]["tasks"] == "all" and record["config"]["protocol"]["tasks"] == "all"
    T = len(TASKS)
    for direction in ("i2t", "t2i"):
        for k in ("1", "5", "10"):
            matrix = record["recall"][direction][k]
            initial = record["recall_initial"][direction][k]
            assert len(initial) == T and all(isinstance(v, float) for v in initial)
            assert all(isinstance(v, float) for row in matrix for v in row) and len(matrix) == T
            # a frozen model on a fixed (all-task) gallery scores the same in every session
            for row in matrix:
                assert row == pytest.approx(initial)


def test_per_task_gallery_with_given_task_identity(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, _, stderr = run_main(["run", "--methods", "zeroshot", *TINY, "--gallery", "per_task",
                                "--task-identity", "given", "--no-tables",
                                "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0, stderr
    record = records(out)["zeroshot"]
    assert record["protocol"] == {"gallery": "per_task", "task_identity": "given", "tasks": "seen"}
    assert record["config"]["protocol"] == record["protocol"]
    for direction in ("i2t", "t2i"):
        for k in ("1", "5", "10"):
            matrix = record["recall"][direction][k]
            check_lower_triangle(matrix, len(TASKS))
            # per-task galleries: a frozen model's score on task 0 cannot change when task 1 arrives
            assert matrix[1][0] == pytest.approx(matrix[0][0])


# ============================================================================ user errors


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    assert not list(out.glob("runs/*.json")), "a failed run left a record"
    assert not (out / "tables").exists() and not (out / "figures").exists(), "a failed run left tables"


def _bad_yaml(tmp_path: Path) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text("scenario: synthetic\nmethods: [zeroshot, finetune\ntraining: {epochs: 1}\n")
    return ["--config", str(path)]


def _yaml_with_force(tmp_path: Path) -> list[str]:
    path = tmp_path / "forced.yaml"
    path.write_text("scenario: synthetic\nmethods: [zeroshot]\nforce: true\n")
    return ["--config", str(path)]


def _empty_root(tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    return ["--data-root", str(tmp_path / "empty")]


def _corrupt_image(tmp_path: Path) -> list[str]:
    root = tmp_path / "data"
    write_image(root / "good.jpg")
    (root / "x.jpg").write_bytes(b"this is not a JPEG at all \x00\x01\x02" * 8)
    rows = [{"image": "good.jpg", "caption": "a good picture", "task": "t"},
            {"image": "x.jpg", "caption": "a broken picture", "task": "t"}]
    write_table(root / "train.csv", rows)
    write_table(root / "test.csv", rows)
    return ["--data-root", str(root), "--set", "scenario_options={train: train.csv, test: test.csv}"]


ERROR_CASES = {
    # name: (extra argv or a function of tmp_path giving it, fragments the error line must hold)
    "unknown scenario": (["--scenario", "nosuch", *TINY[:8]],
                         ["'nosuch'", "synthetic", "flickr_coco", "coco_supercat", "custom"]),
    "unknown method": (["--methods", "zeroshot,nosuch", *TINY], ["'nosuch'", "zeroshot", "finetune"]),
    "malformed yaml": (_bad_yaml, ["bad.yaml", "line 3", "column"]),
    "zero epochs": ([*TINY, "--epochs", "0"], ["training.epochs", "0"]),
    "batch of one": ([*TINY, "--batch-size", "1"], ["training.batch_size"]),
    "unknown config field": ([*TINY, "--set", "training.epoch=2"], ["'epoch'", "epochs"]),
    # force says how to run (RunControl), not what: the error points at the option.
    "force as a config field": ([*TINY, "--set", "force=true"], ["'force'", "not a config field", "--force"]),
    "force in the YAML": (_yaml_with_force, ["'force'", "not a config field", "--force"]),
    "unknown method parameter": (["--methods", "finetune", *TINY, "--set", "method_params.finetune.lrr=0.1"],
                                 ["'lrr'", "finetune", "'lr'"]),
    "bad method parameter value": (["--methods", "finetune", *TINY, "--set", "method_params.finetune.lr=fast"],
                                   ["method_params.finetune.lr"]),
    "missing data files": (lambda tmp: ["--scenario", "flickr_coco", *TINY[:8], *_empty_root(tmp)],
                           ["dataset_flickr30k.json", "dataset_coco.json", "datasets/README.md"]),
    "unreadable image": (lambda tmp: ["--methods", "zeroshot", "--scenario", "custom", *TINY[:8], *_corrupt_image(tmp)],
                         ["x.jpg"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_run_user_errors(case, tmp_path, cache_dir, capsys):
    extra, fragments = ERROR_CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    out = tmp_path / "out"
    code = main(["run", *extra, "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_error_line(captured.err, *fragments)
    assert_nothing_written(out)


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--seeds", "0,x"], "seeds must be integers"),
    (["run", "--gallery", "everything"], "invalid choice"),
    (["run", "--epochs", "two"], "invalid int"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, *(["--output-dir", str(tmp_path / "out")] if argv[0] == "run" else [])])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_table_on_an_empty_folder(tmp_path, capsys):
    empty = tmp_path / "results"
    empty.mkdir()
    assert main(["table", str(empty)]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, str(empty))
    assert captured.out == ""
    assert not (empty / "tables").exists() and not (empty / "figures").exists()

    assert main(["table", str(tmp_path / "missing")]) == 2
    assert_one_error_line(capsys.readouterr().err, "does not exist")


# ============================================================================ configs checked at plan time


def test_a_bad_value_for_a_later_method_fails_before_any_run(tmp_path, cache_dir, capsys):
    """zeroshot comes first and would be quick to run; l2p's top_k=99 (a pool of 10) must stop the
    grid when it is planned, so not even zeroshot's record is written."""
    out = tmp_path / "out"
    code = main(["run", "--methods", "zeroshot,l2p", *TINY, "--set", "method_params.l2p.top_k=99",
                 "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    line = assert_one_error_line(captured.err, "bad parameters for method 'l2p'", "top_k", "99")
    assert line == "error: bad parameters for method 'l2p': l2p: top_k must be between 1 and pool_size (10), got 99"
    assert_nothing_written(out)
    assert not list(out.glob("checkpoints/*")), "a run started training"


# ============================================================================ methods --describe


def test_methods_describe_prints_every_field_with_type_default_and_help(capsys):
    from methods.l2p import L2P, L2PConfig

    assert main(["methods", "--describe", "l2p"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"l2p: {L2P.summary}"
    assert lines[1].strip() == L2P.__doc__.strip().splitlines()[0]
    rows = {line.split()[0]: line for line in lines[2:] if line.startswith("  ") and not line.startswith("  class")}
    fields = dataclasses.fields(L2PConfig)
    assert list(rows) == [f.name for f in fields]
    for item in fields:
        columns = rows[item.name].split(None, 1)[1]
        default = ("null" if item.default is None else str(item.default).lower() if isinstance(item.default, bool)
                   else str(item.default))
        assert columns.startswith(str(item.type)), rows[item.name]
        assert f" {default} " in f" {columns} " and columns.endswith(item.metadata["help"])
    assert re.search(r"^  top_k\s+int\s+5\s+N: prompts chosen per image", "\n".join(lines), re.M)


def test_methods_describe_an_unknown_name_suggests_and_exits_2(capsys):
    assert main(["methods", "--describe", "l2q"]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, "unknown method 'l2q'", "did you mean 'l2p'?")
    assert captured.out == ""


EXAMPLE = "examples.my_method:TextPromptTuning"  # its class's `name` is "textprompt"


def test_set_fields_of_an_out_of_tree_method(tmp_path, cache_dir, monkeypatch):
    """`--methods pkg.mod:Class --set method_params.<its name>.field=...` trains with that value, and
    the record calls the method by its class's `name`, in `method` and in `method_params`."""
    monkeypatch.syspath_prepend(str(REPO))
    out = tmp_path / "out"
    code, _, stderr = run_main(["run", "--methods", EXAMPLE, *TINY, "--set", "method_params.textprompt.num_tokens=3",
                                "--no-tables", "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0, stderr
    record = records(out)["textprompt"]
    assert record["config"]["method_params"]["textprompt"]["num_tokens"] == 3
    assert list(record["config"]["method_params"]) == ["textprompt"]
    assert record["config"]["methods"] == [EXAMPLE]  # how it was selected, so the config can be rerun


def test_two_methods_of_one_name_exit_2(tmp_path, cache_dir, monkeypatch, capsys):
    (tmp_path / "clash_methods.py").write_text(
        "from examples.my_method import TextPromptTuning\n\n\nclass Other(TextPromptTuning):\n    pass\n")
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    code = main(["run", "--methods", f"{EXAMPLE},clash_methods:Other", *TINY, "--cache-dir", str(cache_dir),
                 "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_error_line(captured.err, "both named 'textprompt'", "clash_methods:Other")
    assert_nothing_written(out)
