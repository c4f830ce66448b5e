"""Bad input and failures, tried on purpose: each gets a clear error (or a documented, counted
skip), a non-zero exit when fatal, and no lost or half-written results.

Runs use the random-weight ``clvl-tiny`` backbone on a two-task ``custom`` scenario written here
(tiny JPEGs and CSV tables) or on a two-task synthetic stream, one epoch, a few steps.

=================================  ==============================================================
fault                              expected
=================================  ==============================================================
bad images (corrupt, truncated,    exit 2 before anything trains, every bad file named at once
empty, text named .jpg)            (the pre-flight check); ``--bad-images skip`` leaves their
                                   items out and counts them in the record
corrupt image met mid-run          exit 2, the file named; the checkpoint of the finished task is
(``--no-image-check``)             kept, and after the file is fixed ``--resume`` finishes the run
truncated image                    exit 2, the file named
--resume after the data changed    exit 2, the earlier checkpoint and what changed named;
                                   ``--resume-anyway`` continues from it, the record notes it
image path that does not exist     exit 2 before anything runs, the file named
empty caption                      exit 2, file and line named
caption longer than the context    truncated like CLIP does, counted in the log and the record
malformed JSON (JSONL, Karpathy)   exit 2, file, line and column named
malformed YAML                     exit 2, file, line and column named
a task without data                exit 2, the task named
results folder not writable        exit 2 before training, the folder named
full disk (failing write)          exit 2; the previous record / checkpoint intact, no temp file;
                                   ``--resume`` continues without losing finished work
NaN in the loss                    exit 3, task and step named; last checkpoint kept
NaN in the test features           exit 3, method, task and modality named; last checkpoint kept
corrupt / foreign record           ``table`` warns, skips it and writes the tables (exit 0)
corrupt or foreign checkpoint      exit 2 on ``--resume``, says how to start over; never unpickled
=================================  ==============================================================
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmark import checkpoint as ckpt
from benchmark.run import loop
from methods.finetune import Finetune, FinetuneConfig
from helpers import BASE, SYNTHETIC, error_line, run_main, write_image, write_table

CUSTOM = ["--scenario", "custom", "--set", "scenario_options={train: train.csv, test: test.csv}"]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_custom(root: Path, caption=None) -> Path:
    """Two tasks (red, blue): 4 training images x 2 captions and 2 test images each."""
    train, test = [], []
    for task, colour in COLOURS.items():
        for i in range(4):
            write_image(root / f"{task}{i}.jpg", colour)
            train += [{"image": f"{task}{i}.jpg", "caption": f"a {task} square, number {i}", "task": task},
                      {"image": f"{task}{i}.jpg", "caption": f"picture {i}: all {task}", "task": task}]
        for i in range(2):
            write_image(root / f"{task}_test{i}.jpg", colour)
            test.append({"image": f"{task}_test{i}.jpg", "caption": f"a {task} test square {i}", "task": task})
    if caption is not None:
        train[-1]["caption"] = caption
    write_table(root / "train.csv", train)
    write_table(root / "test.csv", test)
    return root


def run(out: Path, cache_dir: Path, *extra: str, methods: str = "finetune") -> tuple[int, str]:
    code, _, err = run_main(["run", "--methods", methods, *BASE, *extra, "--cache-dir", str(cache_dir),
                             "--output-dir", str(out)])
    return code, err


def records(out: Path) -> list[Path]:
    return sorted((out / "runs").glob("*.json")) if (out / "runs").exists() else []


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.suffix == ".tmp"]


# ============================================================================ images


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named_and_the_finished_task_is_kept(workers, tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    (root / "blue2.jpg").write_bytes(b"not a JPEG at all\x00\x01" * 20)  # a training image of task 2
    out = tmp_path / "out"
    # Without the pre-flight check the bad file is met when task 2's data loader decodes it.
    same = [*CUSTOM, "--data-root", str(root), "--set", f"training.num_workers={workers}", "--no-image-check"]
    code, err = run(out, cache_dir, *same)
    assert code == 2
    line = error_line(err, "blue2.jpg", "cannot decode")
    assert "checkpoint is kept" in line and "--resume" in line
    assert not records(out)
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    assert torch.load(checkpoint, weights_only=True)["completed_sessions"] == 1

    write_image(root / "blue2.jpg", COLOURS["blue"])  # fixed: same annotation files, same run
    code, err = run(out, cache_dir, *same, "--resume")
    assert code == 0, err
    (record,) = records(out)
    assert json.loads(record.read_text())["resumed"][0]["from"].startswith("after task 1/2 (red)")


def test_resume_after_deleting_a_row_says_what_happened_and_resume_anyway_continues(tmp_path, cache_dir):
    """The fix for a bad image is often to delete its row: the data identity changes, so --resume
    finds no checkpoint of its own; it must say so (not start over silently) and offer --resume-anyway."""
    root = write_custom(tmp_path / "data")
    (root / "blue2.jpg").write_bytes(b"not a JPEG at all\x00\x01" * 20)  # met mid-run, in task 2
    out = tmp_path / "out"
    same = [*CUSTOM, "--data-root", str(root), "--no-image-check"]
    code, err = run(out, cache_dir, *same)
    assert code == 2
    (earlier,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)

    rows = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(r for r in rows if not r.startswith("blue2.jpg")) + "\n")
    code, err = run(out, cache_dir, *same, "--resume")
    assert code == 2
    line = error_line(err, "--resume found no checkpoint", str(earlier), "--resume-anyway", "--force")
    assert "changed the data (blue: 4/2 -> 3/2 images train/test)" in line
    assert "after task 1/2 (red)" in line
    assert not records(out) and earlier.exists()  # nothing started, nothing lost

    code, err = run(out, cache_dir, *same, "--resume-anyway")
    assert code == 0, err
    (record,) = records(out)
    data = json.loads(record.read_text())
    (resumed,) = data["resumed"]
    assert resumed["from"].startswith("after task 1/2 (red)")
    assert resumed["anyway"]["checkpoint_of"] == earlier.parent.name
    assert resumed["anyway"]["changed"].startswith("the data (blue: 4/2 -> 3/2")
    assert [c["train_images"] for c in data["task_counts"]] == [4, 3]
    assert not earlier.exists() and not list(out.rglob(ckpt.FILE_NAME))  # superseded once the record is written
    code, card, _ = run_main(["show", str(record)])
    assert code == 0 and f"of {earlier.parent.name} (--resume-anyway; changed the data (blue: 4/2 -> 3/2" in card


def _break_three_images(root: Path) -> None:
    (root / "blue2.jpg").write_bytes(b"not a JPEG at all\x00\x01" * 20)  # task 2, train
    (root / "red_test0.jpg").write_bytes(b"")  # task 1, test: zero bytes
    noise = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(root / "red1.jpg", format="JPEG")
    data = (root / "red1.jpg").read_bytes()
    (root / "red1.jpg").write_bytes(data[: len(data) // 2])  # task 1, train: a download cut short


def test_bad_images_are_all_named_before_anything_trains(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    _break_three_images(root)
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *CUSTOM, "--data-root", str(root))
    assert code == 2
    line = error_line(err, "3 of 12 image files", "blue2.jpg", "red_test0.jpg", "red1.jpg", "--bad-images skip")
    assert "red/train" in line and "red/test" in line and "blue/train" in line
    assert not records(out) and not list(out.rglob(ckpt.FILE_NAME))  # nothing trained, nothing half-written


def test_bad_images_skip_leaves_their_items_out_and_says_so(tmp_path, cache_dir, caplog):
    root = write_custom(tmp_path / "data")
    _break_three_images(root)
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *CUSTOM, "--data-root", str(root), "--bad-images", "skip", methods="zeroshot")
    assert code == 0, err
    (record,) = records(out)
    data = json.loads(record.read_text())
    assert data["scenario_info"]["bad_images"]["skipped_items"] == {"red": {"train": 1, "test": 1},
                                                                     "blue": {"train": 1, "test": 0}}
    assert [c["train_images"] for c in data["task_counts"]] == [3, 3]
    assert [c["test_images"] for c in data["task_counts"]] == [1, 2]
    assert "skipping 3 item(s) whose image does not decode" in caplog.text
    code, card, _ = run_main(["show", str(record)])
    assert code == 0 and "left out: 3 item(s) whose image does not decode (3 file(s))" in card


def test_truncated_image_is_named(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    noise = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(root / "red_test1.jpg", format="JPEG")
    data = (root / "red_test1.jpg").read_bytes()
    (root / "red_test1.jpg").write_bytes(data[: len(data) // 2])  # a download cut short
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *CUSTOM, "--data-root", str(root), methods="zeroshot")
    assert code == 2
    error_line(err, "red_test1.jpg", "truncated")
    assert not records(out)


def test_missing_image_fails_before_anything_runs(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    (root / "red1.jpg").unlink()
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *CUSTOM, "--data-root", str(root))
    assert code == 2
    error_line(err, "red1.jpg", "missing")
    assert not out.exists()


# ============================================================================ captions


def test_empty_caption_is_an_error_naming_file_and_line(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data", caption="   ")
    code, err = run(tmp_path / "out", cache_dir, *CUSTOM, "--data-root", str(root))
    assert code == 2
    error_line(err, "train.csv", "line 17", "empty caption")


def test_caption_longer_than_the_context_is_truncated_and_counted(tmp_path, cache_dir, caplog):
    long = "a very long caption " + " ".join(f"word{i}" for i in range(60))  # far beyond 32 tokens
    root = write_custom(tmp_path / "data", caption=long)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        code, err = run(out, cache_dir, *CUSTOM, "--data-root", str(root))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warnings and "1 of 8 training captions" in warnings[0] and "32 tokens" in warnings[0]
    (record,) = records(out)
    assert json.loads(record.read_text())["captions_truncated"] == {"context_length": 32, "train": [0, 1],
                                                                    "test": [0, 0]}


# ============================================================================ files and config


def test_malformed_jsonl_names_file_line_and_column(tmp_path, cache_dir):
    root = tmp_path / "data"
    write_image(root / "a.jpg")
    (root / "train.jsonl").write_text('{"image": "a.jpg", "caption": "fine", "task": "t"}\n'
                                      '{"image": "a.jpg", "caption": "broken\n', encoding="utf-8")
    write_table(root / "test.jsonl", [{"image": "a.jpg", "caption": "x", "task": "t"}])
    code, err = run(tmp_path / "out", cache_dir, "--scenario", "custom", "--data-root", str(root),
                    "--set", "scenario_options={train: train.jsonl, test: test.jsonl}")
    assert code == 2
    error_line(err, "train.jsonl", "line 2", "column", "malformed JSON")


def test_malformed_karpathy_json_names_line_and_column(tmp_path, cache_dir):
    root = tmp_path / "data"
    (root / "flickr30k" / "flickr30k-images").mkdir(parents=True)
    (root / "flickr30k" / "dataset_flickr30k.json").write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    (root / "coco").mkdir()
    (root / "coco" / "dataset_coco.json").write_text('{"images": []}')
    code, err = run(tmp_path / "out", cache_dir, "--scenario", "flickr_coco", "--data-root", str(root))
    assert code == 2
    error_line(err, "dataset_flickr30k.json", "malformed JSON at line 2, column")


def test_malformed_yaml_names_line_and_column(tmp_path, cache_dir):
    config = tmp_path / "run.yaml"
    config.write_text("methods: [finetune\ntraining: {epochs: 1}\n", encoding="utf-8")
    code, err = run(tmp_path / "out", cache_dir, "--config", str(config))
    assert code == 2
    error_line(err, "run.yaml", "line 2", "column")


def test_a_task_without_data_is_named(tmp_path, cache_dir):
    root = write_custom(tmp_path / "data")
    code, err = run(tmp_path / "out", cache_dir, "--scenario", "custom", "--data-root", str(root),
                    "--set", "scenario_options={train: train.csv, test: test.csv, task_order: [red, green]}")
    assert code == 2
    error_line(err, "task 'green'", "no training images")


# ============================================================================ output


def test_results_folder_that_cannot_be_written_fails_before_training(tmp_path, cache_dir, caplog):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    with caplog.at_level(logging.INFO, logger="benchmark"):
        code, err = run(blocker / "sub", cache_dir, *SYNTHETIC)
    assert code == 2
    error_line(err, "not writable", str(blocker / "sub"))
    assert not any("after colours" in r.getMessage() for r in caplog.records), "trained before failing"

    if os.geteuid() != 0:  # root writes through permission bits; the case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = run(locked, cache_dir, *SYNTHETIC)
        assert code == 2
        error_line(err, "not writable")


def _failing_writes(monkeypatch, module, name: str, when):
    """Make ``module.name`` (an atomic writer) fail with ENOSPC when ``when(path)`` holds."""
    original = getattr(module, name)

    def writer(path, *args, **kwargs):
        if when(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, writer)


def test_full_disk_when_writing_the_record(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *SYNTHETIC, methods="zeroshot")
    assert code == 0, err
    (finished,) = records(out)
    before = finished.read_bytes()

    with monkeypatch.context() as patch:
        _failing_writes(patch, loop, "atomic_write_json", lambda path: path.parent.name == "runs")
        code, err = run(out, cache_dir, *SYNTHETIC)
    assert code == 2
    error_line(err, "No space left on device", "final checkpoint is kept", "--resume")
    assert records(out) == [finished] and finished.read_bytes() == before  # the other run's record untouched
    assert no_temp_files(out)

    code, err = run(out, cache_dir, *SYNTHETIC, "--resume")  # space freed: write it, no training again
    assert code == 0, err
    record = json.loads(next(p for p in records(out) if p.name.startswith("finetune")).read_text())
    assert record["resumed"][0]["from"].startswith("after task 2/2")


def test_full_disk_when_saving_a_checkpoint_keeps_the_previous_one(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "out"
    saves = {"count": 0}

    def second_save_fails(path):
        if path.name == ckpt.FILE_NAME:
            saves["count"] += 1
            return saves["count"] == 2
        return False

    with monkeypatch.context() as patch:
        _failing_writes(patch, ckpt, "atomic_write_with", second_save_fails)
        code, err = run(out, cache_dir, *SYNTHETIC)
    assert code == 2
    line = error_line(err, "No space left on device", "previous checkpoint (after task 1/2", "--resume")
    assert line.count("checkpoint is kept") + line.count("is intact") == 1, line  # said once, not twice
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    assert torch.load(checkpoint, weights_only=True)["completed_sessions"] == 1
    assert no_temp_files(out) and not records(out)

    code, err = run(out, cache_dir, *SYNTHETIC, "--resume")
    assert code == 0, err
    assert len(records(out)) == 1


def test_full_disk_when_writing_tables_keeps_the_records(tmp_path, cache_dir, monkeypatch):
    from benchmark import reporting

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _failing_writes(patch, reporting, "atomic_write_text", lambda path: True)
        code, _, err = run_main(["run", "--methods", "zeroshot", *BASE[:-1], *SYNTHETIC, "--cache-dir",
                                 str(cache_dir), "--output-dir", str(out)])
    assert code == 2
    error_line(err, "could not write the tables", "records are complete", "clvl-benchmark table")
    assert len(records(out)) == 1 and no_temp_files(out)


# ============================================================================ training


@dataclass
class NanConfig(FinetuneConfig):
    """Fine-tuning whose loss turns NaN in the second task (a diverging run)."""


class NanOnSecondTask(Finetune):
    name = "nan-on-second-task"
    Config = NanConfig

    def extra_loss(self):
        task = self._task if hasattr(self, "_task") else 0
        return torch.tensor(float("nan")) if task == 1 else None

    def before_training_exp(self, data):
        self._task = data.task_id


def test_nan_loss_stops_with_exit_3_and_keeps_the_checkpoint(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *SYNTHETIC, methods="test_faults:NanOnSecondTask")
    assert code == 3
    error_line(err, "nan", "'backdrops'", "epoch 1, step 1", "lower the learning rate", "checkpoint is kept")
    assert not records(out)
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    assert torch.load(checkpoint, weights_only=True)["completed_sessions"] == 1


@dataclass
class NanFeaturesConfig(FinetuneConfig):
    """Fine-tuning whose test image features turn NaN after the second task."""


class NanFeaturesOnSecondTask(Finetune):
    name = "nan-features"
    Config = NanFeaturesConfig

    def before_training_exp(self, data):
        self._task = data.task_id

    def encode_images(self, images, task_ids=None):
        features = super().encode_images(images, task_ids)
        broken = not self.training and getattr(self, "_task", 0) == 1
        return torch.full_like(features, float("nan")) if broken else features


def test_nan_test_features_stop_with_exit_3_instead_of_scoring_100(tmp_path, cache_dir):
    # Before the fix NaN features were ranked: every comparison with NaN is false, so each true
    # match had nothing above it and recall came out 100 %.
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *SYNTHETIC, methods="test_faults:NanFeaturesOnSecondTask")
    assert code == 3
    error_line(err, "'nan-features'", "image test items of task 'colours'", "after session 2",
               "checkpoint is kept")
    assert not records(out)
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    assert torch.load(checkpoint, weights_only=True)["completed_sessions"] == 1


# ============================================================================ reading results back


def test_table_skips_corrupt_and_foreign_files(tmp_path, cache_dir, caplog):
    out = tmp_path / "out"
    code, err = run(out, cache_dir, *SYNTHETIC, methods="zeroshot")
    assert code == 0, err
    (good,) = records(out)
    runs = out / "runs"
    (runs / "half-written.json").write_text(good.read_text()[:200])
    (runs / "foreign.json").write_text(json.dumps({"tool": "something else"}))
    (runs / f".{good.name}.abc123.tmp").write_text("{")  # what a kill during a write leaves
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        code, stdout, err = run_main(["table", str(out)])
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("half-written.json", "foreign.json"):
        assert sum(name in w and w.startswith("skipped") for w in warnings) == 1, warnings
    assert not any(".tmp" in w for w in warnings)
    assert (out / "tables" / "synthetic" / "results.md").is_file()


class _NotTensors:
    pass


@pytest.mark.parametrize("damage", ["truncated", "foreign pickle"])
def test_a_damaged_or_foreign_checkpoint_is_refused_clearly(damage, tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "out"
    original = loop.RunExecution._save

    def crash_after_first(self, strategy=None):
        original(self, strategy)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(loop.RunExecution, "_save", crash_after_first)
        code, err = run(out, cache_dir, *SYNTHETIC)
    assert code == 130
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:  # a pickle that would run code on load: weights_only refuses it
        torch.save({"schema": ckpt.SCHEMA, "payload": _NotTensors()}, checkpoint)
    code, err = run(out, cache_dir, *SYNTHETIC, "--resume")
    assert code == 2
    line = error_line(err, str(checkpoint), "delete")
    if damage == "truncated":
        assert "cannot be read" in line
    else:
        assert "never unpickled" in line
    assert "\x1b[" not in line  # no terminal colour codes in the one-line error
    shutil.rmtree(checkpoint.parent)  # what the message says to do
    code, err = run(out, cache_dir, *SYNTHETIC, "--resume")
    assert code == 0, err
