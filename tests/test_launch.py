"""``run --launcher ray`` (benchmark.launch): a grid's cells as Ray tasks end in the files the
local launcher writes.

The Ray tests use a real local cluster on loopback (``ray.init(local_mode=True)`` no longer
exists): 2 CPUs, no dashboard, no usage stats, no auth token, node and workers on 127.0.0.1, its
session folder in a temporary folder. The grid is 4 cells (zeroshot and a fine-tuning whose
process dies once, x seeds 0 and 1) on the tiny synthetic scenario; the methods come from
``tests/launch_support.py`` by ``module:Class``, so workers must import from the driver's path.
The reference is the same grid under ``--launcher local``, run after the Ray one (the marker file
the dying cell claimed then keeps the local run alive).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from benchmark.config import RunConfig, build_config
from benchmark.launch import cell as cells
from benchmark.launch import ray_grid
from benchmark.run.planning import PlannedRun, RunControl
from helpers import BASE, SYNTHETIC, error_line, run_main

ROOT = Path(__file__).resolve().parents[1]
# Ray's offline, loopback-only settings (the usage-stats switch, no auth token under ~/.ray, and
# the knob that keeps Linux from rewriting 127.0.0.1 to the host's address).
LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# What differs between two runs of the same cell by design: when and where it ran, how long it took.
VARYING = {"created", "provenance", "resumed", "costs"}
VARYING_COSTS = {"wall_time_s", "train_time_s_per_task", "peak_memory_mb"}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    saved = {name: os.environ.get(name) for name in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             _temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def grid_args(out: Path, cache_dir: Path, marker: Path, *extra: str) -> list[str]:
    return ["run", "--methods", "zeroshot,launch_support:DiesOnce", "--seeds", "0,1", *BASE, *SYNTHETIC,
            "--set", f"method_params.dies_once.marker={marker}", "--checkpoint-every", "1",
            "--cache-dir", str(cache_dir), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def grids(ray_cluster, tmp_path_factory, cache_dir):
    """The 4-cell grid under --launcher ray (one worker dies once), then under --launcher local."""
    root = tmp_path_factory.mktemp("grids")
    marker = root / "died-once"
    code, out, err = run_main(grid_args(root / "ray", cache_dir, marker, "--launcher", "ray"))
    assert code == 0, err
    assert marker.exists(), "no cell died: the retry was not exercised"
    code, _, err = run_main(grid_args(root / "local", cache_dir, marker))
    assert code == 0, err
    return root, marker, out


def records(folder: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((folder / "runs").glob("*.json"))}


def comparable(record: dict) -> dict:
    """A record without what varies between two runs of one cell (and its own output folder)."""
    kept = {key: value for key, value in record.items() if key not in VARYING}
    kept["config"] = {key: value for key, value in record["config"].items() if key != "output_dir"}
    kept["costs"] = {key: value for key, value in record["costs"].items() if key not in VARYING_COSTS}
    return kept


# ============================================================================ the Ray grid


def test_ray_records_equal_the_local_launchers(grids):
    root, _, _ = grids
    on_ray, local = records(root / "ray"), records(root / "local")
    assert len(local) == 4 and list(on_ray) == list(local)  # same run ids
    for name in local:
        assert comparable(on_ray[name]) == comparable(local[name]), name
        assert "launcher" not in on_ray[name]["config"]  # where it ran is not what it is
        assert on_ray[name]["config"]["output_dir"] == str(root / "ray")
    # Exactly one cell died and was retried; its retry resumed from its mid-task checkpoint.
    resumed = [name for name, record in on_ray.items() if record["resumed"]]
    assert len(resumed) == 1 and resumed[0].startswith("dies_once__"), resumed
    assert not any(record["resumed"] for record in local.values())
    # The record names the command the user ran, not Ray's worker.
    assert all(record["provenance"]["command"] == local[name]["provenance"]["command"]
               for name, record in on_ray.items())


def test_ray_grid_leaves_no_temp_files_checkpoints_or_error_records(grids):
    root, _, _ = grids
    out = root / "ray"
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not (out / "checkpoints").exists()
    assert not list((out / "runs").glob("*.error.json")) and not list((out / "runs").glob("*.config.yaml"))
    assert sorted(p.name for p in (out / "runs").glob("*.log")) == sorted(p.name for p in (root / "local" / "runs")
                                                                          .glob("*.log"))


def test_tables_from_ray_records_equal_the_local_ones(grids, tmp_path):
    root, _, _ = grids
    for name in ("ray", "local"):
        code, _, err = run_main(["table", str(root / name), "--out", str(tmp_path / name)])
        assert code == 0, err
    for table in ("results.csv", "final_per_task.csv", "significance.csv"):
        assert ((tmp_path / "ray" / "tables" / "synthetic" / table).read_text()
                == (tmp_path / "local" / "tables" / "synthetic" / table).read_text()), table


def test_a_rerun_submits_nothing(grids, cache_dir, monkeypatch):
    root, marker, _ = grids
    before = {path: path.stat().st_mtime_ns for path in (root / "ray" / "runs").glob("*.json")}

    def no_cluster(ray):
        raise AssertionError("a grid with every record present must not start or join Ray")

    monkeypatch.setattr(ray_grid, "connect", no_cluster)
    code, out, err = run_main(grid_args(root / "ray", cache_dir, marker, "--launcher", "ray"))
    assert code == 0, err
    assert "4 run record(s)" in out
    assert {path: path.stat().st_mtime_ns for path in (root / "ray" / "runs").glob("*.json")} == before


def test_a_failing_cell_leaves_an_error_record_and_the_grid_finishes(ray_cluster, tmp_path, cache_dir):
    out, fixed = tmp_path / "out", tmp_path / "fixed"
    args = ["run", "--methods", "zeroshot,launch_support:FailsUnlessFixed", *BASE, *SYNTHETIC,
            "--set", f"method_params.fails_unless_fixed.fixed={fixed}", "--cache-dir", str(cache_dir),
            "--output-dir", str(out)]
    code, _, err = run_main([*args, "--launcher", "ray"])
    assert code == 4, err
    (error_path,) = (out / "runs").glob("*.error.json")
    run_id = error_path.name[:-len(".error.json")]
    assert run_id.startswith("fails_unless_fixed__synthetic__seed0__")
    line = error_line(err, "1 of 2 run(s) failed", run_id, "broken on purpose until")
    assert "error.json" in line
    saved = json.loads(error_path.read_text())
    assert saved["schema"] == cells.ERROR_SCHEMA and saved["error_type"] == "RuntimeError"
    assert saved["run_id"] == run_id and saved["method"] == "fails_unless_fixed" and saved["seed"] == 0
    assert "RuntimeError: broken on purpose" in saved["traceback"]
    assert saved["log"] == str(out / "runs" / f"{run_id}.log")
    # The other cell finished, and readers of records skip the error record.
    (record_path,) = (out / "runs").glob("zeroshot__*.json")
    from benchmark.reporting.loading import load_records

    loaded = load_records(out)
    assert [r.path for r in loaded] == [record_path] and not loaded.warnings
    # Fixed: the same command (here with the local launcher) runs only that cell, which removes the error record.
    fixed.touch()
    code, _, err = run_main(args)
    assert code == 0, err
    assert not error_path.exists() and (out / "runs" / f"{run_id}.json").exists()


# ============================================================================ no Ray needed


def test_launcher_ray_without_ray_says_how_to_install_it(monkeypatch, tmp_path, cache_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code, _, err = run_main(["run", "--methods", "zeroshot", *BASE, *SYNTHETIC, "--cache-dir", str(cache_dir),
                             "--output-dir", str(tmp_path / "out"), "--launcher", "ray"])
    assert code == 2
    assert error_line(err) == ("error: `--launcher ray` needs Ray: pip install 'clvl-benchmark[ray]' "
                               "(or -e '.[ray]')")
    assert not (tmp_path / "out").exists()


def test_ray_is_imported_only_by_the_ray_launcher_and_only_when_it_runs():
    """Statically: ``import ray`` appears only inside functions of benchmark/launch/ray_grid.py,
    and that module is imported only inside functions (run_grid, for --launcher ray)."""
    import ast

    found = []
    for path in sorted((ROOT / "benchmark").rglob("*.py")) + sorted((ROOT / "methods").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [alias.name for alias in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(name == "ray" or name.startswith("ray.") or name.endswith("ray_grid") for name in names):
                found.append((path.relative_to(ROOT).as_posix(), id(node) in in_function))
    assert sorted(set(found)) == [("benchmark/launch/__init__.py", True), ("benchmark/launch/ray_grid.py", True)]


@pytest.mark.parametrize("setting, fragments", [
    ("launcher.gpus_per_cell=-1", ("launcher.gpus_per_cell must be a whole number >= 0 or null (auto)", "-1")),
    ("launcher.cpus_per_cell=0", ("launcher.cpus_per_cell must be a whole number >= 1", "got 0")),
    ("launcher.cpus_per_cell=1.5", ("launcher.cpus_per_cell must be int", "1.5")),
    ("launcher.gpu_per_cell=1", ("unknown config field launcher.'gpu_per_cell'", "did you mean launcher.'gpus_per_cell'")),
])
def test_bad_launcher_settings_are_one_line_errors(setting, fragments, tmp_path):
    code, _, err = run_main(["run", "--methods", "zeroshot", *BASE, "--set", setting,
                             "--output-dir", str(tmp_path / "out")])
    assert code == 2
    error_line(err, *fragments)


def test_the_launcher_section_is_not_part_of_a_runs_identity_or_record(tmp_path):
    from benchmark.run.loop import prepare

    grids = [prepare(build_config(None, {"methods": ["zeroshot"], "backbone": "clvl-tiny", "device": "cpu",
                                         "output_dir": str(tmp_path)}, extra), RunControl(check_images=False))
             for extra in ([], ["launcher.gpus_per_cell=2", "launcher.cpus_per_cell=3"])]
    assert [r.run_id for r in grids[0].planned] == [r.run_id for r in grids[1].planned]


def _spec(tmp_path: Path, **changes) -> tuple[cells.CellSpec, PlannedRun]:
    config = build_config(None, {"methods": ["finetune"], "output_dir": str(tmp_path / "out"), "device": "cpu",
                                 "backbone": "clvl-tiny"}, ["launcher.gpus_per_cell=2"])
    runs = tmp_path / "out" / "runs"
    run = PlannedRun("finetune", object, None, 0, "d" * 64, "finetune__synthetic__seed0__dddddddd",
                     runs / "finetune__synthetic__seed0__dddddddd.json",
                     tmp_path / "out" / "checkpoints" / "finetune__synthetic__seed0__dddddddd" / "checkpoint.pt")
    spec = cells.CellSpec(config=config, run_id=run.run_id, method="finetune", seed=0,
                          control=RunControl(**changes), gpus=2)
    return spec, run


def test_a_cell_decides_from_the_disk_so_a_retry_or_duplicate_is_harmless(tmp_path):
    spec, run = _spec(tmp_path)
    assert cells.cell_action(run, spec) == "start"
    run.checkpoint.parent.mkdir(parents=True)
    run.checkpoint.touch()  # an earlier attempt died after a checkpoint
    assert cells.cell_action(run, spec) == "resume"
    run.path.parent.mkdir(parents=True)
    run.path.touch()  # an earlier attempt finished
    assert cells.cell_action(run, spec) is None
    forced, _ = _spec(tmp_path, force=True)
    assert cells.cell_action(run, forced) == "resume"  # --force: a new record, from this grid's own checkpoint
    run.checkpoint.unlink()
    assert cells.cell_action(run, forced) == "start"


def test_a_cell_with_several_gpus_is_a_torchrun_of_this_run_only(tmp_path):
    spec, run = _spec(tmp_path, checkpoint_every=5, keep_checkpoints=True)
    path = cells.write_config_file(spec.config, run.run_id)
    assert path == tmp_path / "out" / "runs" / f"{run.run_id}.config.yaml"
    assert build_config(path) == spec.config  # the YAML reads back to the same effective config
    command = cells.torchrun_command(spec, "resume", path)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "benchmark", "run", "--config", str(path), "--only", run.run_id, "--ddp", "--no-tables",
                       "--checkpoint-every", "5", "--bad-images", "stop", "--resume", "--keep-checkpoints"]
    forced, _ = _spec(tmp_path, force=True, check_images=False)
    assert cells.torchrun_command(forced, "start", path)[-2:] == ["--force", "--no-image-check"]
    assert "--resume-anyway" in cells.torchrun_command(spec, "adopt", path)


def test_gpus_per_cell_defaults_to_one_where_the_cluster_has_gpus():
    config = RunConfig()
    assert ray_grid.cell_gpus(config, {"CPU": 8, "GPU": 4}) == 1
    assert ray_grid.cell_gpus(config, {"CPU": 8}) == 0
    assert ray_grid.cell_gpus(dataclasses.replace(config, device="cpu"), {"CPU": 8, "GPU": 4}) == 0
    config.launcher.gpus_per_cell = 2
    assert ray_grid.cell_gpus(config, {"CPU": 8}) == 2


def test_only_runs_the_named_runs_and_rejects_unknown_ids(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, _, err = run_main(["run", "--methods", "zeroshot", "--seeds", "0,1", *BASE, *SYNTHETIC,
                             "--cache-dir", str(cache_dir), "--output-dir", str(out), "--only", "zeroshot__nope"])
    line = error_line(err, "--only names run id(s) this configuration does not plan: zeroshot__nope")
    assert code == 2 and not list(out.glob("runs/*.json"))
    planned = line.split("it plans: ", 1)[1].split(", ")
    assert [run_id.split("__")[2] for run_id in planned] == ["seed0", "seed1"]
    code, _, err = run_main(["run", "--methods", "zeroshot", "--seeds", "0,1", *BASE, *SYNTHETIC,
                             "--cache-dir", str(cache_dir), "--output-dir", str(out), "--only", planned[1]])
    assert code == 0, err
    assert [p.name for p in (out / "runs").glob("*.json")] == [f"{planned[1]}.json"]


class FakeRay:
    """Stands for the ray module in the tests of how the driver joins or starts a cluster."""

    def __init__(self, initialized=False):
        self.initialized, self.calls = initialized, []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(kwargs)


def test_the_driver_joins_ray_address_or_starts_a_cluster_sized_to_the_machine(monkeypatch):
    import torch

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray = FakeRay()
    assert ray_grid.connect(ray) == "joined"  # disconnected from afterwards, never stopped
    assert ray.calls == [{"log_to_driver": False}]  # ray.init reads RAY_ADDRESS; no sizes for a cluster it joins
    already = FakeRay(initialized=True)
    assert ray_grid.connect(already) is None and already.calls == []  # the caller's connection, left open
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    ray = FakeRay()
    assert ray_grid.connect(ray) == "started"
    assert ray.calls == [{"num_cpus": 6, "num_gpus": 3, "include_dashboard": False, "log_to_driver": False}]
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_workers_get_the_drivers_extra_import_folders_and_the_harness_variables(monkeypatch, tmp_path):
    extra = tmp_path / "my_methods"
    extra.mkdir()
    monkeypatch.setattr(sys, "path", [str(extra), os.path.join(sys.prefix, "lib"), str(ROOT / "tests"), str(extra)])
    monkeypatch.setenv("CLVL_CACHE", "/shared/cache")
    monkeypatch.delenv("CLVL_DATA_ROOT", raising=False)
    env = ray_grid.worker_environment()["env_vars"]
    assert env["PYTHONPATH"] == os.pathsep.join([os.path.realpath(extra), os.path.realpath(ROOT / "tests")])
    assert env["CLVL_CACHE"] == "/shared/cache" and "CLVL_DATA_ROOT" not in env
    assert env["TQDM_DISABLE"] == "1"


def test_a_numbered_cuda_device_is_refused_under_ray(tmp_path):
    pytest.importorskip("ray")  # without it, the error is how to install it
    code, _, err = run_main(["run", "--methods", "zeroshot", *BASE, "--device", "cuda:1", "--launcher", "ray",
                             "--output-dir", str(tmp_path / "out")])
    assert code == 2
    error_line(err, "device 'cuda:1' picks a GPU by number", "use device auto or cuda")


@pytest.mark.parametrize("has_ddp", [False, True])
def test_several_gpus_per_cell_need_run_ddp(has_ddp, monkeypatch):
    import argparse

    from benchmark import cli

    def parser(prog=cli.PROG):
        top = argparse.ArgumentParser(prog=prog)
        run = top.add_subparsers(dest="command").add_parser("run")
        if has_ddp:
            run.add_argument("--ddp", action="store_true")
        return top

    monkeypatch.setattr(cli, "build_parser", parser)
    if has_ddp:
        ray_grid._check_ddp()  # nothing to refuse
    else:
        with pytest.raises(ray_grid.ConfigError, match=r"launcher.gpus_per_cell above 1 .* `run --ddp`"):
            ray_grid._check_ddp()
