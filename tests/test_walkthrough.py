"""datasets/README.md's walkthrough, followed step by step on images this test makes.

From "a folder of images and one caption CSV" to a table, with only what the walkthrough says:
its CSV layout, its YAML (read from the document itself), `scenarios --config`, `run --config`
and the files it promises. The one change: the tiny random-weight backbone instead of downloading
ViT-B/16 (the walkthrough's own note on --backbone), and one epoch.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from helpers import run_main


DOC = (Path(__file__).resolve().parents[1] / "datasets" / "README.md").read_text(encoding="utf-8")


def walkthrough() -> str:
    start = DOC.index("### Walkthrough")
    return DOC[start:DOC.index("\n#", start + 1)]


def test_walkthrough_from_a_caption_csv_to_a_table(tmp_path, monkeypatch):
    text = walkthrough()
    config_text = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    config_text = "\n".join(line[3:] if line.startswith("   ") else line for line in config_text.splitlines())
    config = yaml.safe_load(config_text)
    header = re.search(r"```csv\n(.*?)\n", text).group(1)
    assert header == "image,caption,task"

    # The folder the walkthrough starts from: images and one caption CSV, two tasks.
    folder = tmp_path / config["data_root"]
    rng = np.random.default_rng(0)
    rows = []
    for task, colour in (("birds", 0), ("cars", 2)):
        for i in range(10):
            pixels = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            pixels[..., colour] += 150
            name = f"images/{task}{i:02d}.jpg"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name, quality=90)
            rows += [[name, f"a photo of {task}, number {i}", task], [name, f"{task} picture {i}", task]]
    with open(folder / config["scenario_options"]["data"], "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header.split(","), *rows])
    yaml_file = tmp_path / "my_run.yaml"
    yaml_file.write_text(config_text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # "next to mydata/"

    code, out, err = run_main(["scenarios", "--config", str(yaml_file)])
    assert code == 0, err
    assert "mydata: 2 tasks" in out and "split" in out
    assert re.search(r"birds\s+8\s+16\s+2\s+4", out) and re.search(r"cars\s+8\s+16\s+2\s+4", out), out

    code, out, err = run_main(["run", "--config", str(yaml_file), "--backbone", "clvl-tiny", "--device", "cpu",
                               "--set", "training.epochs=1", "--set", "training.batch_size=8"])
    assert code == 0, err
    table = tmp_path / "results" / "tables" / "mydata" / "results.md"
    assert table.is_file()
    assert "zeroshot" in table.read_text() and "finetune" in table.read_text()
    records = sorted((tmp_path / "results" / "runs").glob("finetune__mydata__seed0__*.json"))
    assert len(records) == 1
    code, out, err = run_main(["show", str(records[0])])
    assert code == 0 and "split by the harness: test 0.2 per task, by image, seed 0" in out, out
