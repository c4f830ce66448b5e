"""Tests for benchmark.data.readers.

Every fixture is written in the exact shape of the real file it stands for, extra fields
included, so a reader that leans on an incidental field (or chokes on one) fails here. None of
the image files exist: readers must not look at them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from benchmark.data.readers import (
    COCO_SUPERCATEGORIES,
    COCO_SUPERCATEGORIES_LPI_ORDER,
    CocoReadResult,
    missing_images,
    read_albef,
    read_caption_table,
    read_coco,
    read_karpathy,
)
from benchmark.data.types import CaptionedImage
from benchmark.errors import BenchmarkError, ConfigError, DataError


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Karpathy split JSON
# --------------------------------------------------------------------------------------------


def _sentence(raw: str, imgid: int, sentid: int) -> dict:
    return {"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def _karpathy_flickr() -> dict:
    return {
        "images": [
            {"sentids": [0, 1], "imgid": 0, "split": "train", "filename": "1000092795.jpg",
             "sentences": [_sentence("Two young guys with shaggy hair.", 0, 0),
                           _sentence("Two friends enjoy time outside.", 0, 1)]},
            {"sentids": [2, 3, 4], "imgid": 1, "split": "test", "filename": "1007129816.jpg",
             "sentences": [_sentence("  The man with pierced ears is wearing glasses. ", 1, 2),
                           _sentence("A man with glasses is wearing a beer can crocheted hat.", 1, 3),
                           _sentence("A man in an orange hat starring at something.", 1, 4)]},
            {"sentids": [5], "imgid": 2, "split": "val", "filename": "1009434119.jpg",
             "sentences": [_sentence("A black and white dog is running.", 2, 5)]},
            {"sentids": [6, 7], "imgid": 3, "split": "test", "filename": "101362133.jpg",
             "sentences": [_sentence("A young female student performing a downward kick.", 3, 6),
                           _sentence("A girl in white does karate.", 3, 7)]},
        ],
        "dataset": "flickr30k",
    }


def _karpathy_coco() -> dict:
    return {
        "images": [
            {"filepath": "val2014", "sentids": [10, 11], "filename": "COCO_val2014_000000391895.jpg",
             "imgid": 0, "split": "test", "cocoid": 391895,
             "sentences": [_sentence("A man with a red helmet on a small moped on a dirt road. ", 0, 10),
                           _sentence("Man riding a motor bike on a dirt road on the countryside.", 0, 11)]},
            {"filepath": "train2014", "sentids": [12], "filename": "COCO_train2014_000000057870.jpg",
             "imgid": 1, "split": "train", "cocoid": 57870,
             "sentences": [_sentence("A restaurant has modern wooden tables and chairs.", 1, 12)]},
            {"filepath": "val2014", "sentids": [13], "filename": "COCO_val2014_000000522418.jpg",
             "imgid": 2, "split": "val", "cocoid": 522418,
             "sentences": [_sentence("A woman wearing a net on her head cutting a cake.", 2, 13)]},
            {"filepath": "val2014", "sentids": [14, 15], "filename": "COCO_val2014_000000184613.jpg",
             "imgid": 3, "split": "restval", "cocoid": 184613,
             "sentences": [_sentence("A child holding a flowered umbrella and petting a yak.", 3, 14),
                           _sentence("A young man holding an umbrella next to a herd of cattle.", 3, 15)]},
        ],
        "dataset": "coco",
    }


def test_karpathy_flickr_test_split(tmp_path):
    path = _write_json(tmp_path / "dataset_flickr30k.json", _karpathy_flickr())
    root = tmp_path / "flickr30k-images"

    items = read_karpathy(path, root)

    assert items == [
        CaptionedImage(
            root / "1007129816.jpg",
            ("The man with pierced ears is wearing glasses.",
             "A man with glasses is wearing a beer can crocheted hat.",
             "A man in an orange hat starring at something."),
            "1007129816.jpg",
            None,
        ),
        CaptionedImage(
            root / "101362133.jpg",
            ("A young female student performing a downward kick.", "A girl in white does karate."),
            "101362133.jpg",
            None,
        ),
    ]
    assert all(isinstance(item.image, Path) and item.image.is_absolute() for item in items)


def test_karpathy_coco_train_restval_uses_filepath_and_cocoid(tmp_path):
    path = _write_json(tmp_path / "dataset_coco.json", _karpathy_coco())

    items = read_karpathy(path, tmp_path / "coco", splits=("train", "restval"))

    assert [item.image for item in items] == [
        tmp_path / "coco" / "train2014" / "COCO_train2014_000000057870.jpg",
        tmp_path / "coco" / "val2014" / "COCO_val2014_000000184613.jpg",
    ]
    assert [item.image_id for item in items] == ["57870", "184613"]
    assert items[1].captions == (
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
    )


def test_karpathy_single_split_string_and_relative_root(tmp_path, monkeypatch):
    path = _write_json(tmp_path / "dataset_coco.json", _karpathy_coco())
    monkeypatch.chdir(tmp_path)

    items = read_karpathy(path, "coco", splits="test")

    assert [item.image for item in items] == [tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg"]
    assert items[0].captions[0] == "A man with a red helmet on a small moped on a dirt road."


def test_karpathy_standard_split_missing_from_file_is_not_an_error(tmp_path):
    # Flickr has no "restval"; asking for the usual COCO training splits must still work.
    path = _write_json(tmp_path / "dataset_flickr30k.json", _karpathy_flickr())
    items = read_karpathy(path, tmp_path, splits=("train", "restval"))
    assert [item.image_id for item in items] == ["1000092795.jpg"]


def test_karpathy_misspelled_split(tmp_path):
    path = _write_json(tmp_path / "dataset_coco.json", _karpathy_coco())
    with pytest.raises(ConfigError, match="'tset'"):
        read_karpathy(path, tmp_path, splits=("tset",))


def test_karpathy_no_images_in_split(tmp_path):
    data = _karpathy_flickr()
    data["images"] = [image for image in data["images"] if image["split"] != "test"]
    path = _write_json(tmp_path / "dataset_flickr30k.json", data)
    with pytest.raises(DataError, match=r"no images in split\(s\) \['test'\]") as info:
        read_karpathy(path, tmp_path)
    assert str(path) in str(info.value)
    assert "['train', 'val']" in str(info.value)


def test_karpathy_missing_file(tmp_path):
    path = tmp_path / "flickr30k" / "dataset_flickr30k.json"
    with pytest.raises(DataError) as info:
        read_karpathy(path, tmp_path)
    assert str(path) in str(info.value)
    assert "see datasets/README.md for the expected layout" in str(info.value)


def test_karpathy_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        read_karpathy(tmp_path, tmp_path)


def test_karpathy_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "test" "sentences": []}\n]}\n')
    with pytest.raises(DataError, match=r"line 3, column 20") as info:
        read_karpathy(path, tmp_path)
    assert str(path) in str(info.value)


def test_karpathy_missing_raw_names_key_and_entry(tmp_path):
    data = _karpathy_flickr()
    del data["images"][3]["sentences"][1]["raw"]
    path = _write_json(tmp_path / "dataset_flickr30k.json", data)
    with pytest.raises(DataError) as info:
        read_karpathy(path, tmp_path)
    message = str(info.value)
    assert str(path) in message and "'raw'" in message
    assert "images[3] (101362133.jpg) sentences[1]" in message


def test_karpathy_missing_images_key(tmp_path):
    path = _write_json(tmp_path / "dataset_coco.json", {"dataset": "coco"})
    with pytest.raises(DataError, match="'images'"):
        read_karpathy(path, tmp_path)


def test_karpathy_empty_caption(tmp_path):
    data = _karpathy_flickr()
    data["images"][1]["sentences"][2]["raw"] = "   "
    path = _write_json(tmp_path / "dataset_flickr30k.json", data)
    with pytest.raises(DataError, match=r"images\[1\] \(1007129816.jpg\) sentences\[2\] has an empty caption"):
        read_karpathy(path, tmp_path)


def test_karpathy_empty_caption_in_unselected_split_is_ignored(tmp_path):
    data = _karpathy_flickr()
    data["images"][0]["sentences"][0]["raw"] = ""  # a train image
    path = _write_json(tmp_path / "dataset_flickr30k.json", data)
    assert len(read_karpathy(path, tmp_path, splits="test")) == 2


# --------------------------------------------------------------------------------------------
# COCO captions + instances
# --------------------------------------------------------------------------------------------

_INFO = {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "version": "1.0",
         "year": 2014, "contributor": "COCO Consortium", "date_created": "2017/09/01"}
_LICENSES = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
              "name": "Attribution-NonCommercial-ShareAlike License"}]


def _coco_image(image_id: int, file_name: str) -> dict:
    return {"license": 1, "file_name": file_name,
            "coco_url": f"http://images.cocodataset.org/val2014/{file_name}",
            "height": 480, "width": 640, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "http://farm3.staticflickr.com/x.jpg", "id": image_id}


def _instance(ann_id: int, image_id: int, category_id: int, area: float) -> dict:
    return {"segmentation": [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0]], "area": area, "iscrowd": 0,
            "image_id": image_id, "bbox": [10.0, 10.0, 10.0, 10.0], "category_id": category_id, "id": ann_id}


def _coco_files(tmp_path: Path, instances: list[dict] | None = None) -> tuple[Path, Path]:
    images = [
        _coco_image(391895, "COCO_val2014_000000391895.jpg"),
        _coco_image(522418, "COCO_val2014_000000522418.jpg"),
        _coco_image(184613, "COCO_val2014_000000184613.jpg"),  # no instances: dropped
        _coco_image(318219, "COCO_val2014_000000318219.jpg"),
    ]
    captions = {
        "info": _INFO, "licenses": _LICENSES, "images": images,
        "annotations": [
            {"image_id": 522418, "id": 1, "caption": "A woman wearing a net on her head cutting a cake. "},
            {"image_id": 391895, "id": 2, "caption": "A man with a red helmet on a small moped."},
            {"image_id": 184613, "id": 3, "caption": "A child holding a flowered umbrella."},
            {"image_id": 318219, "id": 4, "caption": "A young boy standing in front of a computer keyboard."},
            {"image_id": 391895, "id": 5, "caption": "Man riding a motor bike on a dirt road."},
            {"image_id": 522418, "id": 6, "caption": "A woman cutting a large white sheet cake."},
        ],
    }
    categories = [
        {"supercategory": "person", "id": 1, "name": "person"},
        {"supercategory": "vehicle", "id": 4, "name": "motorcycle"},
        {"supercategory": "kitchen", "id": 49, "name": "knife"},
        {"supercategory": "food", "id": 61, "name": "cake"},
        {"supercategory": "electronic", "id": 76, "name": "keyboard"},
    ]
    if instances is None:
        instances = [
            # 391895: first is a person, the largest is the motorcycle.
            _instance(101, 391895, 1, 1200.5),
            _instance(102, 522418, 61, 9000.0),
            _instance(103, 391895, 4, 50000.25),
            # 522418: the knife ties the cake's area; the earlier (cake) must win.
            _instance(104, 522418, 49, 9000.0),
            _instance(105, 318219, 76, 300.0),
            _instance(106, 391895, 1, 80.0),
            # an image that is not in the caption file: ignored
            _instance(107, 999999, 1, 10.0),
        ]
    instances_json = {"info": _INFO, "licenses": _LICENSES, "images": images,
                      "annotations": instances, "categories": categories}
    annotations = tmp_path / "coco" / "annotations"
    return (_write_json(annotations / "captions_val2014.json", captions),
            _write_json(annotations / "instances_val2014.json", instances_json))


def test_coco_first_assignment(tmp_path):
    captions, instances = _coco_files(tmp_path)
    root = tmp_path / "coco"

    result = read_coco(captions, instances, root, "val2014", assign="first")

    assert isinstance(result, CocoReadResult)
    assert result.dropped_no_instances == 1
    assert result.dropped_no_captions == 0
    assert result.images == [
        CaptionedImage(root / "val2014" / "COCO_val2014_000000391895.jpg",
                       ("A man with a red helmet on a small moped.", "Man riding a motor bike on a dirt road."),
                       "391895", "person"),
        CaptionedImage(root / "val2014" / "COCO_val2014_000000522418.jpg",
                       ("A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake."),
                       "522418", "food"),
        CaptionedImage(root / "val2014" / "COCO_val2014_000000318219.jpg",
                       ("A young boy standing in front of a computer keyboard.",),
                       "318219", "electronic"),
    ]


def test_coco_largest_assignment_and_tie(tmp_path):
    captions, instances = _coco_files(tmp_path)

    result = read_coco(captions, instances, tmp_path / "coco", "val2014", assign="largest")

    assert [(item.image_id, item.task) for item in result.images] == [
        ("391895", "vehicle"),
        ("522418", "food"),  # tie with the knife (kitchen): the earlier annotation wins
        ("318219", "electronic"),
    ]
    assert result.dropped_no_instances == 1


def test_coco_default_is_first(tmp_path):
    captions, instances = _coco_files(tmp_path)
    result = read_coco(captions, instances, tmp_path / "coco", "val2014")
    assert result.images[0].task == "person"


def test_coco_unknown_assign(tmp_path):
    captions, instances = _coco_files(tmp_path)
    with pytest.raises(ConfigError, match="'random'"):
        read_coco(captions, instances, tmp_path / "coco", "val2014", assign="random")


def test_coco_missing_instances_file(tmp_path):
    captions, instances = _coco_files(tmp_path)
    instances.unlink()
    with pytest.raises(DataError) as info:
        read_coco(captions, instances, tmp_path / "coco", "val2014")
    assert str(instances) in str(info.value)
    assert "datasets/README.md" in str(info.value)


def test_coco_unknown_category(tmp_path):
    captions, instances = _coco_files(tmp_path, instances=[_instance(1, 391895, 77, 5.0)])
    with pytest.raises(DataError, match=r"annotations\[0\] has category_id 77") as info:
        read_coco(captions, instances, tmp_path / "coco", "val2014")
    assert str(instances) in str(info.value)


def test_coco_missing_supercategory_key(tmp_path):
    captions, instances = _coco_files(tmp_path)
    data = json.loads(instances.read_text())
    del data["categories"][2]["supercategory"]
    _write_json(instances, data)
    with pytest.raises(DataError, match=r"categories\[2\] has no 'supercategory' key") as info:
        read_coco(captions, instances, tmp_path / "coco", "val2014")
    assert str(instances) in str(info.value)


def test_coco_missing_area_only_matters_for_largest(tmp_path):
    instance = _instance(1, 391895, 4, 5.0)
    del instance["area"]
    captions, instances = _coco_files(tmp_path, instances=[instance])
    assert read_coco(captions, instances, tmp_path, "val2014", assign="first").images[0].task == "vehicle"
    with pytest.raises(DataError, match=r"annotations\[0\] has no 'area' key"):
        read_coco(captions, instances, tmp_path, "val2014", assign="largest")


def test_coco_caption_for_unknown_image(tmp_path):
    captions, instances = _coco_files(tmp_path)
    data = json.loads(captions.read_text())
    data["annotations"].append({"image_id": 42, "id": 7, "caption": "A dog."})
    _write_json(captions, data)
    with pytest.raises(DataError, match=r"annotations\[6\] refers to image_id 42") as info:
        read_coco(captions, instances, tmp_path, "val2014")
    assert str(captions) in str(info.value)


def test_coco_empty_caption(tmp_path):
    captions, instances = _coco_files(tmp_path)
    data = json.loads(captions.read_text())
    data["annotations"][3]["caption"] = " \n"
    _write_json(captions, data)
    with pytest.raises(DataError, match=r"annotations\[3\] \(image 318219\) has an empty caption"):
        read_coco(captions, instances, tmp_path, "val2014")


def test_coco_image_without_captions_is_counted(tmp_path):
    captions, instances = _coco_files(tmp_path)
    data = json.loads(captions.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 318219]
    _write_json(captions, data)
    result = read_coco(captions, instances, tmp_path, "val2014")
    assert [item.image_id for item in result.images] == ["391895", "522418"]
    assert (result.dropped_no_instances, result.dropped_no_captions) == (1, 1)


def test_coco_no_image_survives(tmp_path):
    captions, instances = _coco_files(tmp_path, instances=[_instance(1, 999999, 1, 5.0)])
    with pytest.raises(DataError, match="4 without instances") as info:
        read_coco(captions, instances, tmp_path, "val2014")
    assert "same COCO split" in str(info.value)


def test_coco_supercategory_constants():
    assert len(set(COCO_SUPERCATEGORIES)) == 12
    assert set(COCO_SUPERCATEGORIES_LPI_ORDER) == set(COCO_SUPERCATEGORIES)
    assert COCO_SUPERCATEGORIES[:3] == ("person", "vehicle", "outdoor")
    assert COCO_SUPERCATEGORIES_LPI_ORDER[0] == "appliance"
    assert COCO_SUPERCATEGORIES_LPI_ORDER[-1] == "person"


# --------------------------------------------------------------------------------------------
# ALBEF / BLIP per-caption JSON
# --------------------------------------------------------------------------------------------


def test_albef_train_layout_groups_captions(tmp_path):
    path = _write_json(tmp_path / "coco_karpathy_train.json", [
        {"caption": "A woman wearing a net on her head cutting a cake. ",
         "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
        {"caption": "a child holding a flowered umbrella and petting a yak",
         "image": "val2014/COCO_val2014_000000184613.jpg", "image_id": "coco_184613"},
        {"caption": "A woman cutting a large white sheet cake.",
         "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
    ])
    root = tmp_path / "coco"

    items = read_albef(path, root)

    assert items == [
        CaptionedImage(root / "val2014" / "COCO_val2014_000000522418.jpg",
                       ("A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake."),
                       "coco_522418", None),
        CaptionedImage(root / "val2014" / "COCO_val2014_000000184613.jpg",
                       ("a child holding a flowered umbrella and petting a yak",),
                       "coco_184613", None),
    ]


def test_albef_test_layout_uses_path_as_id(tmp_path):
    path = _write_json(tmp_path / "flickr30k_test.json", [
        {"image": "flickr30k-images/1007129816.jpg",
         "caption": ["The man with pierced ears is wearing glasses.", "A man in an orange hat."]},
        {"image": "flickr30k-images/101362133.jpg", "caption": ["A girl in white does karate."]},
    ])

    items = read_albef(path, tmp_path / "flickr30k")

    assert [item.image_id for item in items] == ["flickr30k-images/1007129816.jpg", "flickr30k-images/101362133.jpg"]
    assert items[0].image == tmp_path / "flickr30k" / "flickr30k-images" / "1007129816.jpg"
    assert items[0].captions == ("The man with pierced ears is wearing glasses.", "A man in an orange hat.")


def test_albef_category_becomes_task(tmp_path):
    path = _write_json(tmp_path / "lpi_train.json", [
        {"image": "train2014/a.jpg", "caption": "cap a1", "image_id": 1, "category": 3},
        {"image": "train2014/b.jpg", "caption": "cap b1", "image_id": 2, "category": "food"},
        {"image": "train2014/a.jpg", "caption": "cap a2", "image_id": 1, "category": 3},
    ])
    items = read_albef(path, tmp_path)
    assert [(item.image_id, item.task, item.captions) for item in items] == [
        ("1", "3", ("cap a1", "cap a2")),
        ("2", "food", ("cap b1",)),
    ]


def test_albef_conflicting_category(tmp_path):
    path = _write_json(tmp_path / "lpi_train.json", [
        {"image": "train2014/a.jpg", "caption": "cap a1", "category": 3},
        {"image": "train2014/a.jpg", "caption": "cap a2", "category": 5},
    ])
    with pytest.raises(DataError, match=r"train2014/a.jpg is given two different tasks, '3' and '5'"):
        read_albef(path, tmp_path)


def test_albef_missing_caption_key(tmp_path):
    path = _write_json(tmp_path / "coco_karpathy_test.json", [
        {"image": "val2014/a.jpg", "caption": ["x"]},
        {"image": "val2014/b.jpg", "captions": ["y"]},
    ])
    with pytest.raises(DataError, match=r"entry 1 \(val2014/b.jpg\) has no 'caption' key") as info:
        read_albef(path, tmp_path)
    assert str(path) in str(info.value)


def test_albef_empty_caption_in_list(tmp_path):
    path = _write_json(tmp_path / "coco_karpathy_test.json", [{"image": "val2014/a.jpg", "caption": ["x", ""]}])
    with pytest.raises(DataError, match=r"entry 0 \(val2014/a.jpg\) has an empty caption"):
        read_albef(path, tmp_path)


def test_albef_not_a_list(tmp_path):
    path = _write_json(tmp_path / "coco_karpathy_test.json", {"images": []})
    with pytest.raises(DataError, match="expected a JSON list"):
        read_albef(path, tmp_path)


def test_albef_empty_file(tmp_path):
    path = _write_json(tmp_path / "coco_karpathy_test.json", [])
    with pytest.raises(DataError, match="no entries"):
        read_albef(path, tmp_path)


def test_albef_duplicate_image_id_for_different_images(tmp_path):
    path = _write_json(tmp_path / "train.json", [
        {"image": "a.jpg", "caption": "x", "image_id": "coco_1"},
        {"image": "b.jpg", "caption": "y", "image_id": "coco_1"},
    ])
    with pytest.raises(DataError, match="reuses image id 'coco_1'"):
        read_albef(path, tmp_path)


# --------------------------------------------------------------------------------------------
# Custom CSV / JSONL tables
# --------------------------------------------------------------------------------------------


def test_csv_table_groups_rows_and_resolves_against_table_folder(tmp_path):
    table = tmp_path / "my_data" / "captions.csv"
    table.parent.mkdir()
    elsewhere = tmp_path / "elsewhere" / "c.png"
    table.write_text(
        "image,caption,task,source\n"
        'imgs/a.jpg,"A dog, running on grass.",animals,web\n'
        "imgs/b.jpg, A red car. ,vehicles,web\n"
        "./imgs/a.jpg,The dog has a stick.,animals,web\n"
        f"{elsewhere},An absolute path.,,web\n",
        encoding="utf-8",
    )

    items = read_caption_table(table)

    assert items == [
        CaptionedImage(tmp_path / "my_data" / "imgs" / "a.jpg",
                       ("A dog, running on grass.", "The dog has a stick."), "imgs/a.jpg", "animals"),
        CaptionedImage(tmp_path / "my_data" / "imgs" / "b.jpg", ("A red car.",), "imgs/b.jpg", "vehicles"),
        CaptionedImage(elsewhere, ("An absolute path.",), str(elsewhere), None),
    ]


def test_csv_with_byte_order_mark_and_no_task_column(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("\ufeffimage,caption\r\na.jpg,First.\r\n", encoding="utf-8")
    items = read_caption_table(table, image_root=tmp_path / "root")
    assert items == [CaptionedImage(tmp_path / "root" / "a.jpg", ("First.",), "a.jpg", None)]


def test_jsonl_table_with_image_root(tmp_path):
    table = tmp_path / "captions.jsonl"
    table.write_text(
        json.dumps({"image": "x/1.jpg", "caption": "one", "task": 2}) + "\n"
        "\n"
        + json.dumps({"image": "x/2.jpg", "caption": "two", "task": 0, "extra": [1]}) + "\n"
        + json.dumps({"image": "x/1.jpg", "caption": " one again "}) + "\n",
        encoding="utf-8",
    )

    items = read_caption_table(table, image_root=tmp_path / "images")

    assert items == [
        CaptionedImage(tmp_path / "images" / "x" / "1.jpg", ("one", "one again"), "x/1.jpg", "2"),
        CaptionedImage(tmp_path / "images" / "x" / "2.jpg", ("two",), "x/2.jpg", "0"),
    ]


def test_table_conflicting_tasks(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption,task\na.jpg,one,cats\nb.jpg,two,dogs\na.jpg,three,dogs\n")
    with pytest.raises(DataError) as info:
        read_caption_table(table)
    message = str(info.value)
    assert "a.jpg" in message and "'cats'" in message and "'dogs'" in message
    assert str(table) in message


def test_csv_missing_column(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,text\na.jpg,one\n")
    with pytest.raises(DataError, match="no 'caption' column") as info:
        read_caption_table(table)
    assert str(table) in str(info.value)


def test_csv_empty_caption_names_line(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text('image,caption\na.jpg,one\nb.jpg,"  "\n')
    with pytest.raises(DataError, match="line 3 has an empty caption"):
        read_caption_table(table)


def test_csv_row_with_an_extra_cell_is_refused_not_shifted(tmp_path):
    """An unquoted comma in a caption makes one cell too many; the row must not be read on."""
    table = tmp_path / "captions.csv"
    table.write_text("image,caption,task\na.jpg,a dog,animals\nb.jpg,a red, shiny car,vehicles\n")
    with pytest.raises(DataError, match=r"line 3 has 4 cells but the header has 3 columns .*double quotes"):
        read_caption_table(table)
    table.write_text('image,caption,task\na.jpg,a dog,animals\nb.jpg,"a red, shiny car",vehicles\n')
    assert [i.captions for i in read_caption_table(table)] == [("a dog",), ("a red, shiny car",)]


def test_csv_row_with_a_missing_cell_is_refused(tmp_path):
    """A short row would otherwise leave ``task`` unset without a word."""
    table = tmp_path / "captions.csv"
    table.write_text("image,caption,task\na.jpg,a dog,animals\nb.jpg,a car\n")
    with pytest.raises(DataError, match="line 3 has 2 cells but the header has 3 columns"):
        read_caption_table(table)


def test_csv_missing_image_value(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n,one\n")
    with pytest.raises(DataError, match="line 2 has no 'image' value"):
        read_caption_table(table)


def test_jsonl_missing_key_names_line(tmp_path):
    table = tmp_path / "captions.jsonl"
    table.write_text('{"image": "a.jpg", "caption": "one"}\n{"image": "b.jpg", "text": "two"}\n')
    with pytest.raises(DataError, match="line 2 has no 'caption' key") as info:
        read_caption_table(table)
    assert str(table) in str(info.value)


def test_jsonl_malformed_line(tmp_path):
    table = tmp_path / "captions.jsonl"
    table.write_text('{"image": "a.jpg", "caption": "one"}\n{"image": "b.jpg", caption: "two"}\n')
    with pytest.raises(DataError, match="line 2, column 20: malformed JSON"):
        read_caption_table(table)


def test_table_unsupported_suffix(tmp_path):
    table = tmp_path / "captions.tsv"
    table.write_text("image\tcaption\n")
    with pytest.raises(DataError, match=r"'\.tsv'.*use \.csv or \.jsonl"):
        read_caption_table(table)


def test_table_without_rows(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption,task\n")
    with pytest.raises(DataError, match="has no rows"):
        read_caption_table(table)
    table.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        read_caption_table(table)


def test_table_missing_file(tmp_path):
    table = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found; see datasets/README.md") as info:
        read_caption_table(table)
    assert str(table) in str(info.value)


def test_table_not_utf8(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_bytes("image,caption\na.jpg,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_caption_table(table)


# --------------------------------------------------------------------------------------------
# missing_images and the error contract
# --------------------------------------------------------------------------------------------


def test_missing_images_reports_only_missing_paths_up_to_limit(tmp_path):
    present = tmp_path / "present.jpg"
    present.write_bytes(b"not really a jpeg")
    items = [
        CaptionedImage(present, ("a",), "0"),
        CaptionedImage(Image.new("RGB", (2, 2)), ("b",), "1"),
        *(CaptionedImage(tmp_path / f"gone{i}.jpg", ("c",), f"g{i}") for i in range(4)),
    ]

    assert missing_images(items, limit=3) == [tmp_path / "gone0.jpg", tmp_path / "gone1.jpg", tmp_path / "gone2.jpg"]
    assert missing_images(items) == [tmp_path / f"gone{i}.jpg" for i in range(4)]
    assert missing_images(items[:2]) == []


def test_reader_errors_are_one_line_benchmark_errors(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text("{\n\n  oops")
    with pytest.raises(BenchmarkError) as info:
        read_karpathy(path, tmp_path)
    assert "\n" not in str(info.value)
    assert os.fspath(path) in str(info.value)
