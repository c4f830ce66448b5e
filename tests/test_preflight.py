"""The pre-flight image check (benchmark.data.preflight): every bad file at once, before training."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.preflight import apply_policy, check_images
from benchmark.data.types import CaptionedImage
from benchmark.errors import DataError
from benchmark.scenarios.base import Scenario


def jpeg_bytes(seed: int = 0, size=(64, 48)) -> bytes:
    # Noise, so the JPEG has real entropy-coded data that a truncation cuts into.
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for i in range(4):
        files[f"good{i}"] = tmp_path / f"good{i}.jpg"
        files[f"good{i}"].write_bytes(jpeg_bytes(i))
    files["truncated"] = tmp_path / "truncated.jpg"
    files["truncated"].write_bytes(jpeg_bytes(9)[:600])
    files["empty"] = tmp_path / "empty.jpg"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "notes.jpg"
    files["text"].write_text("this is not an image\n")
    return files


def item(path: Path, n: int) -> CaptionedImage:
    return CaptionedImage(image=path, captions=(f"caption {n}",), image_id=f"img{n}")


def scenario_of(train: list[list[Path]], test: list[list[Path]]) -> Scenario:
    count = iter(range(10_000))
    return Scenario(name="mine", task_names=[f"t{i}" for i in range(len(train))],
                    train=[[item(p, next(count)) for p in task] for task in train],
                    test=[[item(p, next(count)) for p in task] for task in test], default_backbone="clvl-tiny")


def test_pillow_really_fails_on_each_bad_file(folder):
    """The fixture's bad files are bad for the decoder itself (so the check cannot pass vacuously)."""
    for name in ("truncated", "empty", "text"):
        with pytest.raises(OSError):
            with Image.open(folder[name]) as image:
                image.convert("RGB")
    with Image.open(folder["good0"]) as image:
        assert image.convert("RGB").size == (64, 48)


def test_every_bad_file_is_listed_at_once_with_where_it_is_used(folder):
    scenario = scenario_of(train=[[folder["good0"], folder["truncated"]], [folder["good1"], folder["empty"]]],
                           test=[[folder["good2"], folder["text"]], [folder["good3"], folder["truncated"]]])
    check = check_images(scenario, workers=2)
    assert check.files == 7 and check.decoded == 7
    bad = {b.path.name: b for b in check.bad}
    assert set(bad) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert bad["truncated.jpg"].uses == (("t0", "train"), ("t1", "test"))
    assert "truncated" in bad["truncated.jpg"].reason.lower()
    with pytest.raises(DataError) as raised:
        apply_policy(scenario, check, "stop")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("3 of 7 image files")
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        assert name in message
    assert "--bad-images skip" in message


def test_skip_drops_only_bad_items_and_counts_them(folder):
    scenario = scenario_of(train=[[folder["good0"], folder["truncated"], folder["good1"]], [folder["good2"]]],
                           test=[[folder["good3"]], [folder["good0"], folder["empty"]]])
    kept = apply_policy(scenario, check_images(scenario, workers=1), "skip")
    assert [[Path(i.image).name for i in task] for task in kept.train] == [["good0.jpg", "good1.jpg"], ["good2.jpg"]]
    assert [[Path(i.image).name for i in task] for task in kept.test] == [["good3.jpg"], ["good0.jpg"]]
    assert kept.info["bad_images"]["skipped_items"] == {"t0": {"train": 1, "test": 0}, "t1": {"train": 0, "test": 1}}
    assert sorted(Path(f).name for f in kept.info["bad_images"]["files"]) == ["empty.jpg", "truncated.jpg"]
    assert "bad_images" not in scenario.info  # the original scenario is untouched


def test_skip_that_empties_a_task_is_an_error(folder):
    scenario = scenario_of(train=[[folder["good0"]], [folder["text"]]], test=[[folder["good1"]], [folder["good2"]]])
    with pytest.raises(DataError, match="task 't1'.*no training images"):
        apply_policy(scenario, check_images(scenario), "skip")


def test_unknown_policy_is_refused(folder):
    scenario = scenario_of(train=[[folder["good0"]]], test=[[folder["good1"]]])
    with pytest.raises(DataError, match="stop, skip"):
        apply_policy(scenario, check_images(scenario), "ignore")


def test_cache_remembers_good_files_by_size_and_time(folder, tmp_path):
    cache = tmp_path / "cache" / "images.json"
    scenario = scenario_of(train=[[folder["good0"], folder["good1"], folder["truncated"]]], test=[[folder["good2"]]])
    first = check_images(scenario, cache_file=cache)
    assert (first.files, first.decoded, len(first.bad)) == (4, 4, 1)
    second = check_images(scenario, cache_file=cache)
    assert second.decoded == 1 and [b.path.name for b in second.bad] == ["truncated.jpg"]  # bad files are re-checked
    # Replacing a good file with a broken one (new size and time) is noticed.
    folder["good1"].write_bytes(b"\xff\xd8\xff garbage")
    os.utime(folder["good1"], ns=(1, 1))
    third = check_images(scenario, cache_file=cache)
    assert third.decoded == 2 and sorted(b.path.name for b in third.bad) == ["good1.jpg", "truncated.jpg"]


def test_a_corrupt_cache_is_ignored_not_fatal(folder, tmp_path, caplog):
    cache = tmp_path / "images.json"
    cache.write_text("{not json")
    scenario = scenario_of(train=[[folder["good0"]]], test=[[folder["good1"]]])
    assert check_images(scenario, cache_file=cache).decoded == 2
    assert "unreadable image-check cache" in caplog.text


def test_in_memory_images_are_not_files_to_check():
    images = [CaptionedImage(image=Image.new("RGB", (4, 4)), captions=("a",), image_id=str(i)) for i in range(2)]
    scenario = Scenario(name="mem", task_names=["t"], train=[images[:1]], test=[images[1:]], default_backbone="x")
    check = check_images(scenario)
    assert (check.files, check.decoded, check.bad) == (0, 0, [])
