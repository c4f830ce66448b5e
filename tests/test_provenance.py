"""Provenance, run identity (the result cache) and ``python -m benchmark show``.

A record must say where it came from (versions, git commit and dirty flag, host, device, data
checksums, code hashes); a finished run is identified by its config, code and data, so that a
rerun skips exactly what is still valid; ``show`` prints the protocol card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from benchmark import provenance
from benchmark.config import build_config
from benchmark.runner import plan_runs
from benchmark.scenarios import build_scenario
from helpers import run_main, write_image, write_table

# Avalanche's ReplayPlugin calls its own deprecated storage-policy API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated function update:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
BASE = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "4", "--no-tables"]
CUSTOM = ["--scenario", "custom", "--set", "scenario_options={train: train.csv, test: test.csv}"]


def write_custom(root: Path) -> Path:
    rows_train, rows_test = [], []
    for task, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for i in range(3):
            write_image(root / f"{task}{i}.jpg", colour)
            rows_train += [{"image": f"{task}{i}.jpg", "caption": f"a {task} square {i}", "task": task},
                           {"image": f"{task}{i}.jpg", "caption": f"all {task}, picture {i}", "task": task}]
        write_image(root / f"{task}_test.jpg", colour)
        rows_test.append({"image": f"{task}_test.jpg", "caption": f"a {task} test square", "task": task})
    write_table(root / "train.csv", rows_train)
    write_table(root / "test.csv", rows_test)
    return root


def run(out: Path, cache_dir: Path, root: Path, *extra: str, methods: str = "zeroshot") -> int:
    code, _, err = run_main(["run", "--methods", methods, *BASE, *CUSTOM, "--data-root", str(root), *extra,
                             "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0, err
    return code


def record_files(out: Path) -> list[Path]:
    return sorted((out / "runs").glob("*.json"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================ what a record carries


def test_record_carries_its_provenance(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    out = tmp_path / "out"
    run(out, cache_dir, root)
    (path,) = record_files(out)
    record = json.loads(path.read_text())
    prov = record["provenance"]
    for package in ("python", "torch", "open_clip_torch", "avalanche-lib", "numpy", "pillow"):
        assert prov["versions"].get(package)
    assert set(prov["git"]) == {"commit", "dirty"}
    assert prov["host"] and prov["device"] == "cpu" and prov["device_name"]
    files = {Path(f["path"]).name: f for f in prov["data_manifest"]["files"]}
    assert set(files) == {"train.csv", "test.csv"}
    for name, entry in files.items():
        assert entry["sha256"] == sha256(root / name) and entry["size"] == (root / name).stat().st_size
    code = prov["code"]
    assert len(code["harness_sha256"]) == 64 and len(code["method_sha256"]) == 64
    assert code["packages"]["torch"] == prov["versions"]["torch"]
    assert record["method_access"]["task_identity_at_test"] == "inferred"
    assert record["final_session_queries"]["t2i"]["counts"] == [1, 1]


def test_synthetic_data_is_identified_by_generator_version():
    scenario = build_scenario("synthetic", {"tasks": ["colours"], "train_images": 2, "test_images": 2})
    manifest = provenance.data_manifest(scenario)
    assert manifest["files"] == [] and manifest["generator_version"] == scenario.info["generator_version"]


# ============================================================================ identity and the cache


def test_rerun_skips_finished_runs_until_data_change(tmp_path, cache_dir, caplog):
    root = write_custom(tmp_path / "data")
    out = tmp_path / "out"
    run(out, cache_dir, root)
    (first,) = record_files(out)

    caplog.set_level(logging.INFO, logger="benchmark")
    os.utime(root / "test.csv", (time.time() + 60, time.time() + 60))  # touched, content unchanged
    run(out, cache_dir, root)
    assert record_files(out) == [first]
    assert any("skipping" in r.getMessage() and "finished already" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with open(root / "test.csv", "a", encoding="utf-8") as handle:  # the data changed: a new run
        handle.write("red_test.jpg,another red test caption,red\n")
    run(out, cache_dir, root)
    assert not any("skipping" in r.getMessage() for r in caplog.records)
    files = record_files(out)
    assert len(files) == 2 and first in files
    new = json.loads(next(p for p in files if p != first).read_text())
    assert new["config_hash"] != json.loads(first.read_text())["config_hash"]


def test_method_source_is_part_of_the_identity(tmp_path, monkeypatch):
    package = tmp_path / "mymethods"
    package.mkdir()
    shutil.copy(REPO / "examples" / "my_method.py", package / "prompt.py")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = build_config(None, {"methods": ["mymethods.prompt:TextPromptTuning"], "backbone": "clvl-tiny",
                                 "device": "cpu", "scenario_options": {"tasks": ["colours"], "train_images": 2,
                                                                       "test_images": 2}})
    scenario = build_scenario(config.scenario, config.scenario_options)

    def digest() -> str:
        (planned,) = plan_runs(config, scenario, "clvl-tiny")
        return planned.digest

    before = digest()
    assert digest() == before
    (package / "helpers.py").write_text("SCALE = 2\n")  # another file of the method's own package
    after_helper = digest()
    assert after_helper != before
    source = (package / "prompt.py").read_text(encoding="utf-8")
    changed = source.replace(".normal_(0, 0.02)", ".normal_(0, 0.03)")  # another initialisation
    assert changed != source
    (package / "prompt.py").write_text(changed, encoding="utf-8")
    assert digest() not in (before, after_helper)


def test_method_comments_and_docstrings_do_not_change_the_identity(tmp_path, monkeypatch):
    """The method's source counts by its code: a comment, a docstring or blank lines do not
    make finished runs stale; a changed default does."""
    package = tmp_path / "mymethods2"
    package.mkdir()
    shutil.copy(REPO / "examples" / "my_method.py", package / "prompt.py")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("mymethods2.prompt")
    before = provenance.method_digest(module.TextPromptTuning)
    source = (package / "prompt.py").read_text(encoding="utf-8")
    edited = source.replace('"""TextPromptTuning: one learnable', '"""TextPromptTuning (reworded): one learnable', 1)
    edited = edited.replace("    def encode_texts(",
                            "\n\n    # the prompt goes after the start token\n    def encode_texts(", 1)
    assert edited.count("\n") > source.count("\n") and "reworded" in edited
    (package / "prompt.py").write_text(edited + "\n# a comment at the end\n", encoding="utf-8")
    assert provenance.method_digest(module.TextPromptTuning) == before
    (package / "prompt.py").write_text(edited.replace("num_tokens: int = 4", "num_tokens: int = 5", 1),
                                       encoding="utf-8")
    assert provenance.method_digest(module.TextPromptTuning) != before


@pytest.fixture
def harness_copy(tmp_path, monkeypatch):
    """A copy of benchmark/ that harness_digest reads instead of the real one (never edited)."""
    copy = tmp_path / "benchmark"
    shutil.copytree(provenance.HARNESS_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "HARNESS_ROOT", copy)
    provenance.harness_digest.cache_clear()
    yield copy
    provenance.harness_digest.cache_clear()


def harness_digest() -> str:
    provenance.harness_digest.cache_clear()
    return provenance.harness_digest()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_comments_docstrings_and_layout_do_not_change_the_harness_hash(harness_copy):
    before = harness_digest()
    evaluation = harness_copy / "evaluation.py"
    with open(evaluation, "a", encoding="utf-8") as handle:
        handle.write("\n\n# a note about the protocol\n")
    edit(evaluation, '"""% of items routed to ``task``; None when the method does not route."""',
         '"""Percentage of the items routed to ``task``.\n\n    None when the method does not route.\n    """')
    edit(evaluation, "    return 100.0 * float((routed == task).float().mean())",
         "    return 100.0 * float(  # as a percentage\n        (routed == task).float().mean()\n    )\n\n")
    edit(harness_copy / "retrieval.py", "\n\ndef ", "\n\n\n\ndef ")
    config = harness_copy / "backbone" / "configs" / "clvl-tiny.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=7) + "\n\n")
    assert harness_digest() == before


def test_a_changed_formula_changes_the_harness_hash(harness_copy):
    before = harness_digest()
    evaluation = harness_copy / "evaluation.py"
    edit(evaluation, "return 100.0 * float((routed == task)", "return 10.0 * float((routed == task)")
    changed = harness_digest()
    assert changed != before
    edit(evaluation, "return 10.0 * float((routed == task)", "return 10.0 * float((routed != task)")
    assert harness_digest() not in (before, changed)
    config = harness_copy / "backbone" / "configs" / "clvl-tiny.json"
    value = json.loads(config.read_text())
    value["embed_dim"] += 1
    config.write_text(json.dumps(value))
    assert harness_digest() not in (before, changed)


def test_result_neutral_entries_work_in_subpackages(harness_copy, monkeypatch):
    """RESULT_NEUTRAL names paths under benchmark/: a file of a sub-package, or a whole one ("x/")."""
    monkeypatch.setattr(provenance, "RESULT_NEUTRAL", provenance.RESULT_NEUTRAL | {"data/", "scenarios/custom.py"})
    before = harness_digest()
    edit(harness_copy / "data" / "readers.py", "\ndef ", "\nSOMETHING = 1\n\n\ndef ")
    edit(harness_copy / "scenarios" / "custom.py", "\ndef ", "\nSOMETHING = 1\n\n\ndef ")
    assert harness_digest() == before
    edit(harness_copy / "scenarios" / "streams.py", "\ndef ", "\nSOMETHING = 1\n\n\ndef ")
    assert harness_digest() != before


def test_the_hash_names_its_scheme_and_python_version(monkeypatch):
    """ast.dump's format belongs to the Python version: another minor version is another hash."""
    assert provenance.SOURCE_HASH_SCHEME.endswith(f"python{sys.version_info.major}.{sys.version_info.minor}")
    before = harness_digest()
    monkeypatch.setattr(provenance, "SOURCE_HASH_SCHEME", "ast-dump-no-docstrings/1/python3.99")
    try:
        assert harness_digest() != before
    finally:
        monkeypatch.undo()
        provenance.harness_digest.cache_clear()


def test_local_backbone_weights_are_part_of_the_identity(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"first version")
    config = build_config(None, {"methods": ["zeroshot"], "device": "cpu",
                                 "scenario_options": {"tasks": ["colours"], "train_images": 2, "test_images": 2}})
    scenario = build_scenario(config.scenario, config.scenario_options)
    name = f"clvl-tiny:{weights}"
    (before,) = plan_runs(config, scenario, name)
    assert provenance.backbone_weights(name)["files"][0]["sha256"] == sha256(weights)
    weights.write_bytes(b"second version")  # same file name, other weights: another run
    (after,) = plan_runs(config, scenario, name)
    assert after.digest != before.digest
    assert provenance.backbone_weights("clvl-tiny") is None and provenance.backbone_weights("ViT-B-16:openai") is None


def test_only_result_relevant_harness_files_are_hashed():
    files = {p.relative_to(provenance.HARNESS_ROOT).as_posix() for p in provenance.harness_source_files()}
    assert {"runner.py", "strategy.py", "evaluation.py", "retrieval.py", "losses.py", "scenarios/streams.py",
            "data/synthetic.py", "backbone/configs/clvl-tiny.json", "record.py"} <= files  # record.py: the runner builds with it
    assert not {"stats.py", "cli.py", "__main__.py", "provenance.py"} & files
    reporting = {p.relative_to(provenance.HARNESS_ROOT).as_posix()
                 for p in (provenance.HARNESS_ROOT / "reporting").rglob("*.py")}
    assert {"reporting/__init__.py", "reporting/latex.py", "reporting/card.py"} <= reporting
    assert not reporting & files  # the whole package presents results only
    assert {"run/loop.py", "run/planning.py", "run/factory.py", "run/runtime.py", "run/state.py"} <= files
    assert not {"testing.py", "checkpoint.py", "rng.py", "plain.py", "run/progress.py"} & files
    from methods.finetune import Finetune

    sources = {p.name for p in provenance.method_source_files(Finetune)}
    assert {"finetune.py", "base.py", "routing.py"} <= sources and "zeroshot.py" not in sources


# ============================================================================ show


def test_show_prints_the_protocol_card(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, _, err = run_main(["run", "--methods", "finetune", *BASE, "--seeds", "0,1",
                             "--set", "scenario_options.train_images=4", "--set", "scenario_options.test_images=2",
                             "--set", "scenario_options.tasks=[colours,backdrops]",
                             "--set", "method_params.finetune.replay_memory=4", "--task-identity", "given",
                             "--cache-dir", str(cache_dir), "--output-dir", str(out)])
    assert code == 0, err
    path = next(p for p in record_files(out) if "seed0" in p.name)
    code, card, err = run_main(["show", str(path)])
    assert code == 0, err
    for expected in ("Scenario", "synthetic: 2 tasks", "1. colours", "2. backdrops", "4 / 12   2 / 6",
                     "gallery          union", "task identity    given", "tasks evaluated  seen",
                     "seeds            0 in this record; this configuration was run with seeds 0, 1",
                     "backbone         clvl-tiny", "replay_memory = 4",
                     "a replay memory of 4 image-caption pairs (ReplayPlugin)",
                     "at test time: the true task label of every query",
                     "synthetic generator, version", "git commit", "harness sha256", "final average"):
        assert expected in card, f"{expected!r} not in the card:\n{card}"


def test_the_card_keeps_its_old_import_path():
    from benchmark.reporting import card

    assert provenance.protocol_card is card.protocol_card
    with pytest.raises(AttributeError):
        provenance.no_such_name  # noqa: B018


def test_show_refuses_what_is_not_a_record(tmp_path):
    code, _, err = run_main(["show", str(tmp_path / "missing.json")])
    assert code == 2 and "does not exist" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "something else"}))
    code, _, err = run_main(["show", str(other)])
    assert code == 2 and "not a run record" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    code, _, err = run_main(["show", str(broken)])
    assert code == 2 and "not a readable run record" in err


PEAK_WINDOWS = """
import json, sys
import numpy as np
import torch
from benchmark import provenance

cpu = torch.device("cpu")
if not provenance.reset_peak_memory(cpu):
    print(json.dumps(None)); sys.exit()
before, kind = provenance.peak_memory_mb(cpu, window_reset=True)
buffer = np.ones(256 * 2 ** 20 // 8)  # 256 MB, touched so it is resident
first, _ = provenance.peak_memory_mb(cpu, window_reset=True)
del buffer
reset = provenance.reset_peak_memory(cpu)
second, _ = provenance.peak_memory_mb(cpu, window_reset=True)
print(json.dumps({"kind": kind, "before": before, "first": first, "reset": reset, "second": second}))
"""


def test_peak_memory_is_measured_per_run_on_linux():
    """A run's peak resident memory starts from the run, not from the process: a 256 MB buffer
    freed before the second window shows in the first window's peak and not in the second's.
    Measured in a fresh process: in the test process, memory that earlier tests' background
    threads (Ray's driver, loader threads) free during the window would hide the buffer."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PEAK_WINDOWS], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    windows = json.loads(done.stdout.strip().splitlines()[-1])
    if windows is None:
        pytest.skip("this system cannot reset the peak resident set size (Linux /proc/self/clear_refs)")
    assert windows["kind"] == "run_peak_rss"
    assert windows["first"] >= windows["before"] + 200
    assert windows["reset"]
    assert windows["second"] < windows["first"] - 200
