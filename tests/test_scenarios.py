"""Scenarios: the synthetic stream, the real-data builders over fake data roots laid out exactly
like the real downloads, the custom scenario, and their Avalanche streams.

The ``write_*`` helpers build tiny data roots in the real on-disk formats (extra fields
included); ``tests/test_cli.py`` reuses them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import synthetic as gen
from benchmark.errors import ConfigError, DataError, RegistryError
from benchmark.scenarios import available_scenarios, build_scenario, get_scenario_builder
from helpers import COCO_CATEGORIES, LPI_ORDER, _coco_split, write_coco_supercat, write_image, write_table

SMALL = {"train_images": 6, "test_images": 5, "tasks": ["colours", "backdrops"]}

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ fixture writers


def _karpathy_entry(filename, split, captions, imgid, sentid, filepath=None, cocoid=None):
    entry = {"sentids": list(range(sentid, sentid + len(captions))), "imgid": imgid,
             "sentences": [{"tokens": c.lower().rstrip(".").split(), "raw": c, "imgid": imgid, "sentid": sentid + i}
                           for i, c in enumerate(captions)],
             "split": split, "filename": filename}
    if filepath is not None:
        entry = {"filepath": filepath, **entry, "cocoid": cocoid}
    return entry


# Flickr30K: 3 train, 1 val, 2 test images; COCO: 2 train, 2 restval, 1 val, 2 test.
FLICKR_SPLITS = [("1000092795.jpg", "train"), ("10002456.jpg", "train"), ("1000268201.jpg", "val"),
                 ("1000344755.jpg", "test"), ("1000366164.jpg", "train"), ("1000523639.jpg", "test")]
COCO_KARPATHY = [("train2014", 57870, "train"), ("val2014", 391895, "test"), ("val2014", 522418, "restval"),
                 ("train2014", 384029, "train"), ("val2014", 184613, "val"), ("val2014", 318219, "restval"),
                 ("val2014", 554625, "test")]


def write_flickr_coco(root: Path, images: bool = True) -> Path:
    """A data root with flickr30k/ and coco/ in the Karpathy layout (dataset_*.json + images)."""
    flickr = root / "flickr30k"
    flickr.mkdir(parents=True, exist_ok=True)
    entries, sentid = [], 0
    for imgid, (filename, split) in enumerate(FLICKR_SPLITS):
        captions = [f"Flickr picture {imgid} shows scene {k}." for k in range(5)]
        entries.append(_karpathy_entry(filename, split, captions, imgid, sentid))
        sentid += 5
        if images:
            write_image(flickr / "flickr30k-images" / filename)
    (flickr / "flickr30k-images").mkdir(exist_ok=True)
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))

    coco = root / "coco"
    coco.mkdir(parents=True, exist_ok=True)
    entries, sentid = [], 0
    for imgid, (folder, cocoid, split) in enumerate(COCO_KARPATHY):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        captions = [f"A coco photo {cocoid} number {k}." for k in range(5 + imgid % 2)]
        entries.append(_karpathy_entry(filename, split, captions, imgid, sentid, folder, cocoid))
        sentid += len(captions)
        if images:
            write_image(coco / folder / filename)
    (coco / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


# ============================================================================ registry


def test_registry_lists_the_builtin_scenarios():
    builders = available_scenarios()
    assert {"synthetic", "flickr_coco", "coco_supercat", "custom"} <= set(builders)
    assert builders["flickr_coco"].num_tasks == 2
    assert builders["coco_supercat"].num_tasks == 12
    assert builders["custom"].num_tasks is None
    assert builders["synthetic"].num_tasks >= 3


def test_unknown_scenario_suggests_and_lists():
    with pytest.raises(RegistryError) as info:
        get_scenario_builder("synthetc")
    message = str(info.value)
    assert "'synthetc'" in message and "did you mean 'synthetic'" in message
    for name in ("coco_supercat", "custom", "flickr_coco", "synthetic"):
        assert name in message


def test_unknown_scenario_option_is_named():
    with pytest.raises(ConfigError) as info:
        build_scenario("synthetic", {"train_image": 3})
    assert "'train_image'" in str(info.value) and "did you mean 'train_images'" in str(info.value)


# A published scenario: a module with a ScenarioBuilder, named by an entry point.
PUBLISHED_SCENARIO = '''
from dataclasses import dataclass

from benchmark.data.types import CaptionedImage
from benchmark.scenarios import Scenario
from benchmark.scenarios.base import ScenarioBuilder
from PIL import Image


@dataclass
class Options:
    tasks: int = 2

    def __post_init__(self):
        if self.tasks < 1:
            raise ValueError("tasks must be >= 1")


def build(options, data_root):
    def images(task):
        return [CaptionedImage(image=Image.new("RGB", (8, 8)), captions=[f"task {task}"], image_id=f"{task}")]

    names = [f"t{i}" for i in range(options.tasks)]
    return Scenario("published", names, [images(i) for i in range(options.tasks)],
                    [images(i) for i in range(options.tasks)], default_backbone="clvl-tiny")


BUILDER = ScenarioBuilder(name="published", build=build, options=Options, summary="a test scenario",
                          needs="nothing", num_tasks=None)
'''


@pytest.fixture
def published_scenario(tmp_path, monkeypatch):
    """The module above on sys.path, published under benchmark.scenarios as ``published``."""
    import importlib.metadata

    from benchmark.scenarios import base

    (tmp_path / "published_scenario_for_tests.py").write_text(PUBLISHED_SCENARIO)
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [importlib.metadata.EntryPoint("published", "published_scenario_for_tests:BUILDER",
                                            base.ENTRY_POINT_GROUP)]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: points if kw.get("group") == base.ENTRY_POINT_GROUP else real(**kw))
    yield
    import sys

    sys.modules.pop("published_scenario_for_tests", None)


def test_an_installed_package_can_publish_a_scenario(published_scenario):
    assert "published" in available_scenarios() and "synthetic" in available_scenarios()
    scenario = build_scenario("published", {"tasks": 3})
    assert scenario.task_names == ["t0", "t1", "t2"] and scenario.info["options"] == {"tasks": 3}
    with pytest.raises(ConfigError, match="bad options for scenario 'published': tasks must be >= 1"):
        build_scenario("published", {"tasks": 0})
    with pytest.raises(RegistryError, match="did you mean 'published'"):
        get_scenario_builder("publishd")


def test_register_scenario_adds_a_builder_and_refuses_a_taken_name(monkeypatch):
    import dataclasses

    from benchmark import register_scenario
    from benchmark.scenarios import base

    monkeypatch.setattr(base, "SCENARIOS", base.SCENARIOS.copy())
    synthetic = get_scenario_builder("synthetic")
    mine = dataclasses.replace(synthetic, name="mine", summary="a copy of synthetic")
    assert register_scenario(mine) is mine and get_scenario_builder("mine") is mine
    with pytest.raises(ValueError, match="scenario name 'synthetic' is already taken"):
        register_scenario(dataclasses.replace(synthetic, summary="another"))
    with pytest.raises(TypeError, match="ScenarioBuilder"):
        register_scenario("not a builder")


# ============================================================================ synthetic


def _pixels(scenario):
    return [np.asarray(item.image) for split in scenario.train + scenario.test for item in split]


def _captions(scenario):
    return [item.captions for split in scenario.train + scenario.test for item in split]


def test_synthetic_is_a_pure_function_of_data_seed():
    a = build_scenario("synthetic", SMALL)
    b = build_scenario("synthetic", SMALL)
    assert _captions(a) == _captions(b)
    assert [i.image_id for s in a.train + a.test for i in s] == [i.image_id for s in b.train + b.test for i in s]
    for x, y in zip(_pixels(a), _pixels(b), strict=True):
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8
        assert np.array_equal(x, y)

    c = build_scenario("synthetic", {**SMALL, "data_seed": 1})
    assert _captions(c) != _captions(a)
    assert any(not np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(c)))


def test_synthetic_defaults():
    scenario = build_scenario("synthetic", {"train_images": 3, "test_images": 4})  # default tasks
    assert scenario.num_tasks >= 3
    assert len(set(scenario.task_names)) == scenario.num_tasks
    assert scenario.default_backbone == "clvl-tiny:synthetic"
    assert scenario.info["options"]["tasks"] == scenario.task_names
    assert scenario.info["options"]["data_seed"] == 0
    for name, train, test in zip(scenario.task_names, scenario.train, scenario.test):
        assert len(train) == 3 and len(test) == 4
        for item in test:
            assert len(item.captions) >= 2
            assert len(set(item.captions)) == len(item.captions)  # paraphrases, not copies
            assert item.task == name
    counts = scenario.counts()
    assert [c["task"] for c in counts] == scenario.task_names
    assert all(c["test_captions"] == sum(len(i.captions) for i in t) for c, t in zip(counts, scenario.test))


def _template_pattern(template: str) -> re.Pattern:
    """A regex that reads the attribute words back out of one caption template."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = ""
    for index, part in enumerate(parts):
        if index % 2 == 0:
            regex += re.escape(part)
        else:  # the same placeholder twice must hold the same word (a backreference)
            regex += f"(?P={part})" if f"(?P<{part}>" in regex else (
                f"(?P<{part}>{'|'.join(map(re.escape, gen.POSITION_PHRASES.values()))})" if part == "where"
                else f"(?P<{part}>[^ ,]+)")
    return re.compile(regex)


def _described(spec: gen.TaskSpec, caption: str) -> dict[str, str]:
    for template in spec.templates:
        match = _template_pattern(template).fullmatch(caption)
        if match:
            return match.groupdict()
    raise AssertionError(f"caption {caption!r} fits none of the {spec.name} templates")


@pytest.mark.parametrize("task", list(gen.TASK_ORDER))
def test_synthetic_test_images_have_distinct_described_attributes(task):
    spec = gen.TASKS[task]
    # all four paraphrases per image, so every image names its attributes in the same fields
    scenario = build_scenario("synthetic", {"tasks": [task], "train_images": 2, "test_images": 20,
                                            "captions_per_image": len(spec.templates)})
    combos = []
    for item in scenario.test[0]:
        assert len(item.captions) == len(spec.templates)
        named: dict[str, str] = {}
        for text in item.captions:
            for key, word in _described(spec, text).items():
                assert named.setdefault(key, word) == word, f"{item.image_id}: paraphrases disagree: {item.captions}"
        combos.append(tuple(sorted(named.items())))
    assert len(combos) == 20
    assert len(set(combos)) == 20, "two test images share their described attributes"


def test_synthetic_option_validation():
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        build_scenario("synthetic", {"tasks": ["colours", "weather"]})
    with pytest.raises(ConfigError, match="repeat"):
        build_scenario("synthetic", {"tasks": ["colours", "colours"]})
    with pytest.raises(ConfigError, match="captions_per_image"):
        build_scenario("synthetic", {"captions_per_image": 9})
    with pytest.raises(ConfigError, match="positive"):
        build_scenario("synthetic", {"train_images": 0})
    with pytest.raises(ConfigError, match="train_images"):
        build_scenario("synthetic", {"train_images": "lots"})
    # there are only so many distinct combinations of described attributes
    with pytest.raises(ConfigError, match="distinct test combinations"):
        build_scenario("synthetic", {"tasks": ["backdrops"], "train_images": 2, "test_images": 10_000})


# ============================================================================ streams


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from benchmark.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("clvl-tiny", cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


def test_make_streams_is_an_avalanche_benchmark(tiny_backbone):
    from avalanche.benchmarks.scenarios.dataset_scenario import CLExperience

    from benchmark.scenarios.streams import make_streams

    scenario = build_scenario("synthetic", {"train_images": 3, "test_images": 4, "captions_per_image": 2,
                                            "tasks": ["colours", "backdrops", "textures"]})
    streams = make_streams(scenario, tiny_backbone)
    ctx = tiny_backbone.context_length
    H, W = tiny_backbone.image_size
    train_exps, test_exps = list(streams.train_stream), list(streams.test_stream)
    assert len(train_exps) == len(test_exps) == scenario.num_tasks == 3
    assert streams.scenario is scenario and len(streams.galleries) == 3

    for index, (train_exp, test_exp) in enumerate(zip(train_exps, test_exps)):
        assert isinstance(train_exp, CLExperience)
        assert train_exp.current_experience == index
        assert train_exp.task_label == index and test_exp.task_label == index
        assert len(train_exp.dataset) == 3 * 2  # one item per (image, caption) pair
        assert len(test_exp.dataset) == 4  # one item per test image
        for position in range(len(train_exp.dataset)):
            image, tokens, pair, task = train_exp.dataset[position]
            assert isinstance(image, torch.Tensor) and image.shape == (3, H, W) and image.is_floating_point()
            assert isinstance(tokens, torch.Tensor) and tokens.shape == (ctx,) and tokens.dtype == torch.long
            assert isinstance(pair, torch.Tensor) and int(pair) == position
            assert isinstance(task, (int, torch.Tensor)) and int(task) == index
        image, image_index, task = test_exp.dataset[3]
        assert isinstance(image, torch.Tensor) and image.shape == (3, H, W)
        assert isinstance(image_index, torch.Tensor) and int(image_index) == 3
        assert isinstance(task, (int, torch.Tensor)) and int(task) == index

        # the training tokens are the tokenised captions, pair by pair
        captions = [c for item in scenario.train[index] for c in item.captions]
        expected = tiny_backbone.tokenizer(captions).long()
        got = torch.stack([train_exp.dataset[p][1] for p in range(len(captions))])
        assert torch.equal(got, expected)


def test_galleries_match_the_test_captions(tiny_backbone):
    from benchmark.scenarios.streams import make_streams

    scenario = build_scenario("synthetic", {"train_images": 2, "test_images": 5, "captions_per_image": 3,
                                            "tasks": ["textures", "colours"]})
    streams = make_streams(scenario, tiny_backbone)
    for test, gallery in zip(scenario.test, streams.galleries):
        captions = [c for item in test for c in item.captions]
        owners = [i for i, item in enumerate(test) for _ in item.captions]
        assert len(gallery) == len(test) == 5
        assert gallery.caption_tokens.shape == (len(captions), tiny_backbone.context_length)
        assert torch.equal(gallery.caption_tokens, tiny_backbone.tokenizer(captions).long())
        assert gallery.caption_image.tolist() == owners
        # the gallery's i-th image is the i-th test image, through the eval transform
        image, index = gallery[2]
        assert torch.equal(image, tiny_backbone.preprocess_eval(test[2].image.convert("RGB")))
        assert int(index) == 2


# ============================================================================ flickr_coco


def test_flickr_coco_reads_karpathy_splits(tmp_path):
    root = write_flickr_coco(tmp_path / "data")
    scenario = build_scenario("flickr_coco", {}, root)
    assert scenario.task_names == ["flickr30k", "mscoco"]
    assert scenario.default_backbone == "ViT-B-16:openai"
    counts = {c["task"]: c for c in scenario.counts()}
    assert counts["flickr30k"]["train_images"] == 3 and counts["flickr30k"]["test_images"] == 2
    assert counts["flickr30k"]["train_captions"] == 15 and counts["flickr30k"]["test_captions"] == 10
    # COCO trains on train + restval (2 + 2), never on val; tests on test
    assert counts["mscoco"]["train_images"] == 4 and counts["mscoco"]["test_images"] == 2

    flickr_train, coco_train = scenario.train
    flickr_test, coco_test = scenario.test
    base = root.resolve()
    assert [i.image for i in flickr_train] == [base / "flickr30k" / "flickr30k-images" / f
                                               for f in ("1000092795.jpg", "10002456.jpg", "1000366164.jpg")]
    assert [i.image for i in flickr_test] == [base / "flickr30k" / "flickr30k-images" / f
                                              for f in ("1000344755.jpg", "1000523639.jpg")]
    assert [i.image for i in coco_train] == [
        base / "coco" / "train2014" / "COCO_train2014_000000057870.jpg",
        base / "coco" / "val2014" / "COCO_val2014_000000522418.jpg",
        base / "coco" / "train2014" / "COCO_train2014_000000384029.jpg",
        base / "coco" / "val2014" / "COCO_val2014_000000318219.jpg"]
    assert [i.image_id for i in coco_test] == ["391895", "554625"]
    assert coco_test[0].captions == tuple(f"A coco photo 391895 number {k}." for k in range(6))
    assert counts["mscoco"]["test_captions"] == 6 + 5
    assert all(Path(i.image).is_file() for split in scenario.train + scenario.test for i in split)
    assert str(root.resolve() / "flickr30k" / "dataset_flickr30k.json") in scenario.info["sources"]


def test_flickr_coco_options(tmp_path):
    root = write_flickr_coco(tmp_path / "data")
    capped = build_scenario("flickr_coco", {"max_train_images": 1}, root)
    assert [len(t) for t in capped.train] == [1, 1] and [len(t) for t in capped.test] == [2, 2]
    train_only = build_scenario("flickr_coco", {"coco_train_splits": ["train"]}, root)
    assert len(train_only.train[1]) == 2


def test_flickr_coco_missing_files_name_them(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        build_scenario("flickr_coco", {}, empty)
    message = str(info.value)
    assert "dataset_flickr30k.json" in message and "dataset_coco.json" in message
    assert "flickr30k-images" in message
    assert "datasets/README.md" in message
    assert "\n" not in message

    # only the COCO file missing: only it is named
    root = write_flickr_coco(tmp_path / "half")
    (root / "coco" / "dataset_coco.json").unlink()
    with pytest.raises(DataError) as info:
        build_scenario("flickr_coco", {}, root)
    assert "dataset_coco.json" in str(info.value) and "dataset_flickr30k.json" not in str(info.value)


def test_flickr_coco_missing_image_is_named(tmp_path):
    root = write_flickr_coco(tmp_path / "data")
    victim = root / "coco" / "val2014" / "COCO_val2014_000000554625.jpg"
    victim.unlink()
    with pytest.raises(DataError) as info:
        build_scenario("flickr_coco", {}, root)
    assert "COCO_val2014_000000554625.jpg" in str(info.value)
    assert "datasets/README.md" in str(info.value)


def test_data_root_from_environment(tmp_path, monkeypatch):
    root = write_flickr_coco(tmp_path / "envdata")
    monkeypatch.setenv("CLVL_DATA_ROOT", str(root))
    scenario = build_scenario("flickr_coco", {"max_train_images": 1})
    assert Path(scenario.train[0][0].image).is_relative_to(root.resolve())


# ============================================================================ coco_supercat


def _per_task(scenario, split):
    items = scenario.train if split == "train" else scenario.test
    return {name: len(task) for name, task in zip(scenario.task_names, items)}


def test_coco_supercat_first_rule(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    scenario = build_scenario("coco_supercat", {}, root)
    assert scenario.task_names == LPI_ORDER
    assert scenario.info["assign_rule"] == "first"
    assert scenario.info["dropped_images_without_instances"] == {"train": 1, "val": 2}

    train, test = _per_task(scenario, "train"), _per_task(scenario, "test")
    assert train == {**{t: 1 for t in LPI_ORDER}, "person": 2, "vehicle": 2}
    assert test == {**{t: 1 for t in LPI_ORDER}, "kitchen": 2}
    counts = {c["task"]: c for c in scenario.counts()}
    assert counts["person"]["train_captions"] == 2 + 3
    assert counts["kitchen"]["test_captions"] == 2 + 4
    assert counts["animal"]["train_captions"] == 2

    person = scenario.train[LPI_ORDER.index("person")]
    assert [i.image_id for i in person] == ["100", "200"]
    assert person[1].image == root.resolve() / "coco" / "train2014" / "COCO_train2014_000000000200.jpg"
    assert person[1].captions == tuple(f"Image 200 of train, caption {k}." for k in range(3))
    kitchen = scenario.test[LPI_ORDER.index("kitchen")]
    assert kitchen[1].image == root.resolve() / "coco" / "val2014" / "COCO_val2014_000000000600.jpg"
    every_id = {i.image_id for split in scenario.train + scenario.test for i in split}
    assert not every_id & {"202", "601", "602"}  # images without instances are gone
    for name, task in zip(scenario.task_names, scenario.train + scenario.test):
        assert all(i.task == name for i in task)


def test_coco_supercat_largest_rule(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    scenario = build_scenario("coco_supercat", {"assign": "largest"}, root)
    assert scenario.task_names == LPI_ORDER
    assert scenario.info["assign_rule"] == "largest"
    train, test = _per_task(scenario, "train"), _per_task(scenario, "test")
    # image 200 moves to animal; 201's tie stays with the earlier instance (vehicle)
    assert train == {**{t: 1 for t in LPI_ORDER}, "animal": 2, "vehicle": 2}
    assert test == {**{t: 1 for t in LPI_ORDER}, "food": 2}
    assert scenario.info["dropped_images_without_instances"] == {"train": 1, "val": 2}


def test_coco_supercat_task_order_and_caps(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    scenario = build_scenario("coco_supercat", {"task_order": ["kitchen", "person"], "test_images_per_task": 1,
                                                "max_train_images": 1}, root)
    assert scenario.task_names == ["kitchen", "person"]
    assert [len(t) for t in scenario.train] == [1, 1] and [len(t) for t in scenario.test] == [1, 1]
    assert scenario.test[0][0].image_id == "506"  # the lowest image id of the task
    with pytest.raises(ConfigError, match="task_order"):
        build_scenario("coco_supercat", {"task_order": ["kitchen", "spaceship"]}, root)
    with pytest.raises(ConfigError, match="assign"):
        build_scenario("coco_supercat", {"assign": "biggest"}, root)


def test_coco_supercat_empty_task_is_an_error(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    # drop the only train image of "sports" from the captions file
    captions = root / "coco" / "annotations" / "captions_train2014.json"
    data = json.loads(captions.read_text())
    sports_id = 100 + [sc for _, _, sc in COCO_CATEGORIES].index("sports")
    data["images"] = [i for i in data["images"] if i["id"] != sports_id]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != sports_id]
    captions.write_text(json.dumps(data))
    with pytest.raises(DataError, match="'sports'"):
        build_scenario("coco_supercat", {}, root)


def test_coco_supercat_missing_files(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    (root / "coco" / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DataError) as info:
        build_scenario("coco_supercat", {}, root)
    assert "instances_val2014.json" in str(info.value) and "datasets/README.md" in str(info.value)
    assert "captions_val2014.json" not in str(info.value)

    (root / "coco" / "annotations" / "instances_val2014.json").write_text("{}")
    (root / "coco" / "train2014" / "COCO_train2014_000000000100.jpg").unlink()
    with pytest.raises(DataError):
        build_scenario("coco_supercat", {}, root)


def test_coco_supercat_missing_image(tmp_path):
    root = write_coco_supercat(tmp_path / "data")
    (root / "coco" / "val2014" / "COCO_val2014_000000000600.jpg").unlink()
    with pytest.raises(DataError, match="COCO_val2014_000000000600.jpg"):
        build_scenario("coco_supercat", {}, root)


# ============================================================================ custom


def _rows(image, captions, task=None):
    return [{"image": image, "caption": c, **({"task": task} if task is not None else {})} for c in captions]


def test_custom_one_file_pair_per_task(tmp_path):
    root = tmp_path / "data"
    mine = root / "mine"
    for name in ("b1", "b2", "b3", "c1", "c2"):
        write_image(mine / "img" / f"{name}.jpg")
    write_table(mine / "birds_train.csv", _rows("img/b1.jpg", ["a bird", "a small bird, singing"])
                + _rows("img/b2.jpg", ["two birds"]))
    write_table(mine / "birds_test.jsonl", _rows("img/b3.jpg", ["a heron", "a grey heron"]))
    write_table(mine / "cars_train.jsonl", _rows("img/c1.jpg", ["a red car"]))
    write_table(mine / "cars_test.csv", _rows("img/c2.jpg", ["a blue car", "a parked car", "a car"]))
    options = {"name": "garden", "backbone": "clvl-tiny",
               "tasks": [{"name": "birds", "train": "mine/birds_train.csv", "test": "mine/birds_test.jsonl"},
                         {"name": "cars", "train": "mine/cars_train.jsonl", "test": "mine/cars_test.csv"}]}
    scenario = build_scenario("custom", options, root)
    assert scenario.name == "garden" and scenario.default_backbone == "clvl-tiny"
    assert scenario.task_names == ["birds", "cars"]
    assert scenario.counts() == [
        {"task": "birds", "train_images": 2, "train_captions": 3, "test_images": 1, "test_captions": 2},
        {"task": "cars", "train_images": 1, "train_captions": 1, "test_images": 1, "test_captions": 3}]
    base = root.resolve() / "mine" / "img"
    assert [i.image for i in scenario.train[0]] == [base / "b1.jpg", base / "b2.jpg"]
    assert scenario.train[0][0].captions == ("a bird", "a small bird, singing")
    assert scenario.test[1][0].image == base / "c2.jpg"
    assert str(root.resolve() / "mine" / "cars_test.csv") in scenario.info["sources"]


def test_custom_one_file_pair_with_task_column(tmp_path):
    root = tmp_path / "data"
    pics = root / "pics"
    for name in ("a", "b", "c", "d", "e", "f"):
        write_image(pics / f"{name}.png", fmt="PNG")
    write_table(root / "tables" / "train.jsonl", _rows("a.png", ["cap a1", "cap a2"], "boats")
                + _rows("b.png", ["cap b"], "planes") + _rows("c.png", ["cap c"], "boats"))
    write_table(root / "tables" / "test.csv", _rows("d.png", ["cap d"], "planes") + _rows("e.png", ["cap e"], "boats")
                + _rows("f.png", ["cap f1", "cap f2"], "planes"))
    options = {"train": "tables/train.jsonl", "test": "tables/test.csv", "image_root": "pics"}

    default_order = build_scenario("custom", options, root)
    assert default_order.task_names == ["boats", "planes"]  # first appearance in train
    assert default_order.name == "custom"

    scenario = build_scenario("custom", {**options, "task_order": ["planes", "boats"]}, root)
    assert scenario.task_names == ["planes", "boats"]
    assert [[i.image.name for i in t] for t in scenario.train] == [["b.png"], ["a.png", "c.png"]]
    assert [[i.image.name for i in t] for t in scenario.test] == [["d.png", "f.png"], ["e.png"]]
    assert scenario.test[0][1].captions == ("cap f1", "cap f2")
    assert scenario.test[0][0].image == root.resolve() / "pics" / "d.png"

    subset = build_scenario("custom", {**options, "task_order": ["planes"]}, root)
    assert subset.task_names == ["planes"] and subset.counts()[0]["train_images"] == 1


def test_custom_absolute_paths(tmp_path):
    image = write_image(tmp_path / "elsewhere" / "x.jpg")
    other = write_image(tmp_path / "elsewhere" / "y.jpg")
    table = write_table(tmp_path / "t" / "train.csv", _rows(str(image), ["an absolute path"], "only"))
    tests = write_table(tmp_path / "t" / "test.csv", _rows(str(other), ["another"], "only"))
    scenario = build_scenario("custom", {"train": str(table), "test": str(tests)}, tmp_path / "unrelated-root")
    assert scenario.train[0][0].image == image and scenario.test[0][0].image == other


def _one_table(root: Path, per_task: dict[str, int], captions: int = 2) -> Path:
    rows = []
    for task, n in per_task.items():
        for i in range(n):
            write_image(root / "img" / f"{task}{i}.jpg")
            rows += _rows(f"img/{task}{i}.jpg", [f"{task} {i} caption {c}" for c in range(captions)], task)
    return write_table(root / "all.csv", rows)


def test_custom_split_is_per_task_by_image_seeded_and_recorded(tmp_path):
    root = tmp_path / "data"
    _one_table(root, {"dogs": 10, "cats": 7})
    options = {"data": "all.csv", "split": {"test": 0.3, "seed": 4}}
    scenario = build_scenario("custom", options, root)
    assert scenario.task_names == ["dogs", "cats"]
    # round(0.3 * 10) = 3, round(0.3 * 7) = round(2.1) = 2 test images per task
    assert [len(t) for t in scenario.test] == [3, 2] and [len(t) for t in scenario.train] == [7, 5]
    for name, train, test in zip(scenario.task_names, scenario.train, scenario.test):
        train_ids, test_ids = {i.image_id for i in train}, {i.image_id for i in test}
        assert not train_ids & test_ids  # no image on both sides
        assert len(train_ids | test_ids) == {"dogs": 10, "cats": 7}[name]
        assert all(len(i.captions) == 2 for i in train + test)  # captions travel with their image
    assert scenario.info["split"] == {"test": 0.3, "seed": 4, "unit": "image",
                                      "images": {"dogs": {"train": 7, "test": 3}, "cats": {"train": 5, "test": 2}}}
    # The same seed gives the same split; the permutation is numpy's default_rng([seed, task index]).
    again = build_scenario("custom", options, root)
    assert [[i.image_id for i in t] for t in again.test] == [[i.image_id for i in t] for t in scenario.test]
    import numpy as np
    expected = sorted(np.random.default_rng([4, 0]).permutation(10)[:3].tolist())
    assert [i.image_id for i in scenario.test[0]] == [f"img/dogs{k}.jpg" for k in expected]
    other = build_scenario("custom", {**options, "split": {"test": 0.3, "seed": 5}}, root)
    assert [[i.image_id for i in t] for t in other.test] != [[i.image_id for i in t] for t in scenario.test]


def test_custom_split_by_count_from_one_file_per_task(tmp_path):
    root = tmp_path / "data"
    _one_table(root, {"a": 5})
    write_table(root / "b.csv", _rows("img/a0.jpg", ["reused image, other task"]) + _rows("img/a1.jpg", ["x"])
                + _rows("img/a2.jpg", ["y"]))
    scenario = build_scenario("custom", {"tasks": [{"name": "A", "data": "all.csv"}, {"name": "B", "data": "b.csv"}],
                                         "split": {"test": 2}}, root)
    assert [len(t) for t in scenario.test] == [2, 2] and [len(t) for t in scenario.train] == [3, 1]
    with pytest.raises(DataError, match="task 'B' has 3 image.*leaves no training image"):
        build_scenario("custom", {"tasks": [{"name": "A", "data": "all.csv"}, {"name": "B", "data": "b.csv"}],
                                  "split": {"test": 3}}, root)


def test_custom_same_file_as_train_and_test_is_refused(tmp_path):
    root = tmp_path / "data"
    _one_table(root, {"dogs": 3})
    with pytest.raises(DataError, match="train and test are the same file .*`data` with `split"):
        build_scenario("custom", {"train": "all.csv", "test": "./all.csv"}, root)
    with pytest.raises(DataError, match="task 'dogs': train and test are the same file"):
        build_scenario("custom", {"tasks": [{"name": "dogs", "train": "all.csv", "test": "all.csv"}]}, root)


def test_custom_overlap_between_files_is_warned_and_recorded(tmp_path, caplog):
    root = tmp_path / "data"
    _one_table(root, {"dogs": 3})
    write_table(root / "test.csv", _rows("img/dogs0.jpg", ["again"], "dogs") + _rows("img/dogs2.jpg", ["x"], "dogs"))
    with caplog.at_level("WARNING"):
        scenario = build_scenario("custom", {"train": "all.csv", "test": "test.csv"}, root)
    assert scenario.info["train_test_overlap"] == {"dogs": 2}
    assert "2 test image(s) are also training images" in caplog.text


def test_custom_task_order_subset_is_warned_and_recorded(tmp_path, caplog):
    root = tmp_path / "data"
    _one_table(root, {"dogs": 4, "cats": 3, "owls": 5})
    with caplog.at_level("WARNING"):
        scenario = build_scenario("custom", {"data": "all.csv", "split": {"test": 1}, "task_order": ["cats"]}, root)
    assert scenario.task_names == ["cats"]
    assert scenario.info["dropped_tasks"] == {"dogs": {"images": 4}, "owls": {"images": 5}}
    assert "leaves out task(s) dogs, owls; their 9 image(s) are not used" in caplog.text


def test_custom_table_beside_the_current_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_table(tmp_path, {"dogs": 3})
    with pytest.raises(DataError, match=r"resolved against the data root .* all.csv exists relative to the current "
                                        r"folder.*--data-root \."):
        build_scenario("custom", {"data": "all.csv", "split": {"test": 1}}, tmp_path / "data")


def test_custom_row_without_task_is_an_error(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        write_image(root / f"{name}.jpg")
    write_table(root / "train.csv", _rows("a.jpg", ["cap a"], "t1") + _rows("b.jpg", ["cap b"], ""))
    write_table(root / "test.csv", _rows("a.jpg", ["cap a"], "t1"))
    with pytest.raises(DataError) as info:
        build_scenario("custom", {"train": "train.csv", "test": "test.csv"}, root)
    assert "b.jpg" in str(info.value) and "task" in str(info.value)


def test_custom_empty_task_is_an_error(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_image(root / f"{name}.jpg")
    write_table(root / "train.csv", _rows("a.jpg", ["cap a"], "t1") + _rows("b.jpg", ["cap b"], "t2"))
    write_table(root / "test.csv", _rows("c.jpg", ["cap c"], "t1"))
    # t2 has training images but no test image
    with pytest.raises(DataError, match="'t2'.*no test images"):
        build_scenario("custom", {"train": "train.csv", "test": "test.csv"}, root)
    # a task in task_order that no row names
    with pytest.raises(DataError, match="'t3'"):
        build_scenario("custom", {"train": "train.csv", "test": "test.csv", "task_order": ["t1", "t3"]}, root)


def test_custom_missing_files_and_images(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError) as info:
        build_scenario("custom", {"train": "train.csv", "test": "test.csv"}, root)
    assert "train.csv" in str(info.value) and "test.csv" in str(info.value)
    assert "datasets/README.md" in str(info.value)

    write_table(root / "train.csv", _rows("ghost.jpg", ["cap"], "t1"))
    write_table(root / "test.csv", _rows("ghost.jpg", ["cap"], "t1"))
    with pytest.raises(DataError, match="ghost.jpg"):
        build_scenario("custom", {"train": "train.csv", "test": "test.csv"}, root)


@pytest.mark.parametrize("options, fragment", [
    ({}, "exactly one of"),
    ({"train": "a.csv"}, "both"),
    ({"train": "a.csv", "test": "b.csv", "tasks": [{"name": "x", "train": "a.csv", "test": "b.csv"}]}, "exactly one of"),
    ({"data": "a.csv", "train": "b.csv", "test": "c.csv"}, "exactly one of"),
    ({"tasks": [{"name": "x", "train": "a.csv"}]}, "tasks\\[0\\]"),
    ({"tasks": [{"name": "x", "data": "a.csv"}, {"name": "y", "train": "a.csv", "test": "b.csv"}],
      "split": {"test": 1}}, "not a mix"),
    ({"data": "a.csv"}, "split: {test: 0.2"),
    ({"train": "a.csv", "test": "b.csv", "split": {"test": 0.2}}, "`data` files only"),
    ({"data": "a.csv", "split": {"test": 1.5}}, "split.test must be"),
    ({"data": "a.csv", "split": {"test": 0}}, "split.test must be"),
    ({"data": "a.csv", "split": {"test": True}}, "split.test must be"),
    ({"data": "a.csv", "split": {"test": 0.2, "seed": -1}}, "split.seed"),
    ({"data": "a.csv", "split": {"fraction": 0.2}}, "split must be a mapping"),
])
def test_custom_option_validation(tmp_path, options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_scenario("custom", options, tmp_path)


# ============================================================================ scenario method defaults
def test_synthetic_learning_rates_apply_unless_the_user_sets_one(tmp_path):
    from benchmark.config import build_config
    from benchmark.runner import plan_runs
    from benchmark.scenarios.synthetic import SYNTHETIC_METHOD_DEFAULTS
    from methods import get_method

    options = {"tasks": ["colours"], "train_images": 2, "test_images": 2}
    config = build_config(None, {"methods": ["l2p", "sprompts", "lpi"], "backbone": "clvl-tiny", "device": "cpu",
                                 "scenario_options": options, "method_params": {"lpi": {"lr": 0.7}}})
    scenario = build_scenario(config.scenario, config.scenario_options)
    lr = {run.method_cls.name: run.params.lr for run in plan_runs(config, scenario, "clvl-tiny")}
    assert lr["l2p"] == SYNTHETIC_METHOD_DEFAULTS["l2p"]["lr"] == 0.04  # the scenario's value (0.01 at batch 64)
    assert lr["sprompts"] == get_method("sprompts").Config().lr  # none given: the paper's
    assert lr["lpi"] == 0.7  # the user's value wins


def test_synthetic_learning_rates_match_the_documented_sweep():
    """docs/methods/README.md gives the sweep that chose each rate; its 'chosen' column and the
    code must agree (the paper value where the scenario sets none)."""
    from benchmark.scenarios.synthetic import SYNTHETIC_METHOD_DEFAULTS
    from methods import get_method

    text = (REPO / "docs" / "methods" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| ([\d.e-]+) \| [^|]+ \| ([\d.e-]+) \|$", text, flags=re.M)
    assert len(rows) >= 7, rows
    for method, paper, chosen in rows:
        code_default = get_method(method).Config().lr
        assert float(paper) == code_default, method
        expected = SYNTHETIC_METHOD_DEFAULTS.get(method, {}).get("lr", code_default)
        assert float(chosen) == expected, f"{method}: docs say {chosen}, the scenario uses {expected}"


# ---------------------------------------------------------------- coco_supercat, split=karpathy

# Karpathy split of the images write_coco_supercat makes, plus val2014 image 603 (a person):
# train = train2014 100..111, 200, 201, 202 (no instance); restval = 600 (kitchen first, food
# largest), 602 (no instance); val = 603 (unused); test = 500..511, 601 (no instance).
KARPATHY_SUPERCAT = ([("train2014", i, "train") for i in [*range(100, 112), 200, 201, 202]]
                     + [("val2014", 600, "restval"), ("val2014", 602, "restval"), ("val2014", 603, "val")]
                     + [("val2014", i, "test") for i in [*range(500, 512), 601]])


def write_coco_supercat_karpathy(root: Path) -> Path:
    """write_coco_supercat's data root plus coco/dataset_coco.json (5 captions per image, worded
    unlike the COCO caption files, so a test can tell where captions came from)."""
    write_coco_supercat(root)
    supercats = [sc for _, _, sc in COCO_CATEGORIES]
    val = [(500 + i, 2, [(sc, 100.0)]) for i, sc in enumerate(supercats)]
    val += [(600, 4, [("kitchen", 5.0), ("food", 80.0)]), (601, 1, []), (602, 2, []), (603, 2, [("person", 10.0)])]
    _coco_split(root, "val", val)
    entries, sentid = [], 0
    for imgid, (folder, cocoid, split) in enumerate(KARPATHY_SUPERCAT):
        captions = [f"Karpathy caption {k} of {cocoid}." for k in range(5)]
        entries.append(_karpathy_entry(f"COCO_{folder}_{cocoid:012d}.jpg", split, captions, imgid, sentid,
                                       folder, cocoid))
        sentid += 5
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


def test_coco_supercat_karpathy_split_first_rule(tmp_path):
    root = write_coco_supercat_karpathy(tmp_path / "data")
    scenario = build_scenario("coco_supercat", {"split": "karpathy"}, root)
    assert scenario.task_names == LPI_ORDER
    assert scenario.info["split"] == "karpathy"
    assert scenario.info["dropped_images_without_instances"] == {"train": 2, "test": 1}
    # by hand from KARPATHY_SUPERCAT: one image per task, + 200 (person), 201 (vehicle), 600 (kitchen)
    assert _per_task(scenario, "train") == {**{t: 1 for t in LPI_ORDER}, "person": 2, "vehicle": 2, "kitchen": 2}
    assert _per_task(scenario, "test") == {t: 1 for t in LPI_ORDER}
    test_ids = {i.image_id for task in scenario.test for i in task}
    assert test_ids == {str(i) for i in range(500, 512)}
    train_ids = {i.image_id for task in scenario.train for i in task}
    assert "600" in train_ids and not {"202", "602", "603", "601"} & (train_ids | test_ids)  # val 603 unused
    kitchen = scenario.train[LPI_ORDER.index("kitchen")]
    restval = [i for i in kitchen if i.image_id == "600"][0]
    assert restval.image == root.resolve() / "coco" / "val2014" / "COCO_val2014_000000000600.jpg"
    assert restval.captions == tuple(f"Karpathy caption {k} of 600." for k in range(5))  # from the split file
    for name, task in zip(scenario.task_names, scenario.train + scenario.test):
        assert all(i.task == name for i in task)
    counts = {c["task"]: c for c in scenario.counts()}
    assert counts["person"]["train_captions"] == 10 and counts["person"]["test_captions"] == 5


def test_coco_supercat_karpathy_split_uses_the_same_rule(tmp_path):
    root = write_coco_supercat_karpathy(tmp_path / "data")
    scenario = build_scenario("coco_supercat", {"split": "karpathy", "assign": "largest"}, root)
    # 200 moves to animal and 600 to food, exactly as under split=val2014
    assert _per_task(scenario, "train") == {**{t: 1 for t in LPI_ORDER}, "animal": 2, "vehicle": 2, "food": 2}
    val2014 = build_scenario("coco_supercat", {"assign": "largest"}, root)
    tasks = {i.image_id: i.task for split in val2014.train + val2014.test for i in split}
    karpathy = {i.image_id: i.task for split in scenario.train + scenario.test for i in split}
    assert all(tasks[image] == task for image, task in karpathy.items())


def test_coco_supercat_karpathy_split_needs_its_files(tmp_path):
    root = write_coco_supercat(tmp_path / "data")  # no dataset_coco.json
    (root / "coco" / "annotations" / "captions_train2014.json").unlink()  # not needed in this mode
    with pytest.raises(DataError) as info:
        build_scenario("coco_supercat", {"split": "karpathy"}, root)
    assert "dataset_coco.json" in str(info.value) and "captions_train2014" not in str(info.value)
    with pytest.raises(ConfigError, match="split"):
        build_scenario("coco_supercat", {"split": "karpathi"}, root)


def test_scenarios_describe_reports_both_splits(tmp_path, capsys):
    from benchmark.cli import main

    root = write_coco_supercat_karpathy(tmp_path / "data")
    for split in ("val2014", "karpathy"):
        assert main(["scenarios", "--describe", "coco_supercat", "--data-root", str(root),
                     "--set", f"split={split}"]) == 0
        out = capsys.readouterr().out
        assert f"split: {split}" in out
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] == ["kitchen"]}
        # task train_images train_captions test_images test_captions, by hand
        expected = ["kitchen", "1", "2", "2", "6"] if split == "val2014" else ["kitchen", "2", "10", "1", "5"]
        assert rows["kitchen"] == expected
