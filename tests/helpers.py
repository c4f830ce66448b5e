"""Helpers shared by several test modules (test modules import from here, never from each other)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

from PIL import Image

from benchmark.cli import main


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured (for module-scoped fixtures, where capsys is unavailable)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# ---- command-line runs (tests of `run`, faults, provenance, tracking)

BASE = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "4", "--no-tables"]

SYNTHETIC = ["--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
             "--set", "scenario_options.captions_per_image=2", "--set", "scenario_options.tasks=[colours,backdrops]"]

def error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- fixture writers: images, caption tables, a COCO data root

LPI_ORDER = ["appliance", "sports", "outdoor", "electronic", "accessory", "indoor",
             "kitchen", "furniture", "vehicle", "food", "animal", "person"]



def write_image(path: Path, colour=(120, 30, 200), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), colour).save(path, format=fmt)
    return path



# Real COCO category ids, one category per supercategory.
COCO_CATEGORIES = [(1, "person", "person"), (2, "bicycle", "vehicle"), (10, "traffic light", "outdoor"),
                   (16, "bird", "animal"), (27, "backpack", "accessory"), (35, "skis", "sports"),
                   (44, "bottle", "kitchen"), (52, "banana", "food"), (62, "chair", "furniture"),
                   (72, "tv", "electronic"), (78, "microwave", "appliance"), (84, "book", "indoor")]



CATEGORY_OF = {supercat: cid for cid, _, supercat in COCO_CATEGORIES}



def _coco_split(root: Path, split: str, images: list[tuple[int, int, list[tuple[str, float]]]]) -> None:
    """images: (image id, number of captions, [(supercategory, area), ...] in file order)."""
    folder = f"{split}2014"
    coco_images, caption_anns, instance_anns = [], [], []
    for image_id, n_captions, _ in images:
        file_name = f"COCO_{folder}_{image_id:012d}.jpg"
        coco_images.append({"license": 3, "file_name": file_name,
                            "coco_url": f"http://images.cocodataset.org/{folder}/{file_name}",
                            "height": 5, "width": 6, "date_captured": "2013-11-14 16:28:13",
                            "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": image_id})
        for k in range(n_captions):
            caption_anns.append({"image_id": image_id, "id": 10 * image_id + k,
                                 "caption": f"Image {image_id} of {split}, caption {k}."})
        write_image(root / "coco" / folder / file_name)
    # Interleave instance annotations across images (as real files do); each image's own ones
    # keep their listed order.
    queues = [[(image_id, sc, area) for sc, area in anns] for image_id, _, anns in images]
    ann_id = 900000
    while any(queues):
        for queue in queues:
            if queue:
                image_id, supercat, area = queue.pop(0)
                ann_id += 1
                instance_anns.append({"segmentation": [[1.0, 1.0, 4.0, 1.0, 4.0, 4.0]], "area": area,
                                      "iscrowd": 0, "image_id": image_id, "bbox": [1.0, 1.0, 3.0, 3.0],
                                      "category_id": CATEGORY_OF[supercat], "id": ann_id})
    info = {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014}
    licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3, "name": "BY-NC-SA"}]
    annotations = root / "coco" / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    (annotations / f"captions_{folder}.json").write_text(json.dumps(
        {"info": info, "images": coco_images, "licenses": licenses, "annotations": caption_anns}))
    categories = [{"supercategory": sc, "id": cid, "name": name} for cid, name, sc in COCO_CATEGORIES]
    (annotations / f"instances_{folder}.json").write_text(json.dumps(
        {"info": info, "images": coco_images, "licenses": licenses, "annotations": instance_anns,
         "categories": categories}))



def write_coco_supercat(root: Path) -> Path:
    """A data root with coco/annotations/{captions,instances}_{train,val}2014.json + images.

    Every supercategory gets one train image (id 100 + i, 2 captions) and one val image
    (id 500 + i, 2 captions). On top:

    * train 200 (3 captions): a small person, then a large bird -> first: person, largest: animal;
    * train 201 (2 captions): bicycle and chair with equal areas -> vehicle under both rules;
    * train 202: captions but no instance -> dropped;
    * val 600 (4 captions): a small bottle, then a large banana -> first: kitchen, largest: food;
    * val 601, 602: no instances -> dropped.
    """
    supercats = [sc for _, _, sc in COCO_CATEGORIES]
    train = [(100 + i, 2, [(sc, 100.0)]) for i, sc in enumerate(supercats)]
    train += [(200, 3, [("person", 50.0), ("animal", 900.0)]), (201, 2, [("vehicle", 300.0), ("furniture", 300.0)]),
              (202, 2, [])]
    val = [(500 + i, 2, [(sc, 100.0)]) for i, sc in enumerate(supercats)]
    val += [(600, 4, [("kitchen", 5.0), ("food", 80.0)]), (601, 1, []), (602, 2, [])]
    _coco_split(root, "train", train)
    _coco_split(root, "val", val)
    return root



def write_table(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path

