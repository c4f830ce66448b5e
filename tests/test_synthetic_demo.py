"""The offline default, end to end, with its real recipe: the harness pretrains the tiny
backbone, then zeroshot and finetune run on `synthetic` exactly as the README's first command.

This is the one slow test (about a minute on 2 cores): it checks the claims the scenario exists
for, with tolerant bounds, from the run records alone.
"""

import json

import numpy as np
import pytest
import torch

from benchmark.cli import main
from benchmark.metrics import backward_transfer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("demo")
    code = main(["run", "--methods", "zeroshot,finetune", "--scenario", "synthetic",
                 "--cache-dir", str(out / "cache"), "--output-dir", str(out / "results")])
    assert code == 0
    records = {}
    for path in (out / "results" / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        records[record["method"]] = record
    return out, records


def _r1(record, direction):
    return np.array([[np.nan if v is None else v for v in row] for row in record["recall"][direction]["1"]])


def test_demo_writes_records_tables_and_figures(demo):
    out, records = demo
    assert set(records) == {"zeroshot", "finetune"}
    assert records["finetune"]["config"]["backbone"] == "clvl-tiny:synthetic"
    for name in ("results.csv", "results.md", "results.tex"):
        assert (out / "results" / "tables" / "synthetic" / name).stat().st_size > 0
    assert sorted(p.name for p in (out / "results" / "figures").glob("*.png")) == [
        "heatmap_synthetic_finetune.png", "heatmap_synthetic_zeroshot.png"]
    assert any((out / "cache" / "synthetic").glob("clvl-tiny-*.pt")), "the pretrained backbone is cached"


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_zeroshot_is_far_above_chance(demo, direction):
    _, records = demo
    zs = _r1(records["zeroshot"], direction)
    counts = records["zeroshot"]["task_counts"]
    # Chance R@1 in the final union gallery is 100/images in both directions (image->text: an
    # image's c captions among c*images captions, all images having c captions).
    chance = 100 / sum(c["test_images"] for c in counts)
    assert np.nanmean(np.diag(zs)) > 3 * chance


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_finetuning_beats_zeroshot_on_the_task_just_trained(demo, direction):
    _, records = demo
    zs, ft = _r1(records["zeroshot"], direction), _r1(records["finetune"], direction)
    gains = np.diag(ft) - np.diag(zs)
    assert (gains > 5).all(), gains
    assert gains.mean() > 20, gains


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_sequential_finetuning_forgets(demo, direction):
    _, records = demo
    assert backward_transfer(_r1(records["finetune"], direction)) < -20
    # ... far more than the zero-shot model "forgets" through the growing union gallery.
    assert backward_transfer(_r1(records["finetune"], direction)) < backward_transfer(
        _r1(records["zeroshot"], direction)) - 20
