"""The training data path (issue 14, item 1): uint8 crops normalised on the device, the decode
paths, per-item seeded augmentation (the model does not depend on the number of workers), the
worker default, and what enters a run's identity and provenance."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from benchmark.config import RunConfig, TrainingConfig, from_mapping
from benchmark.data import decode as dec
from benchmark.data.loading import (EpochSampler, SeededItems, ShuffledIndices, resolve_num_workers, sample_seed,
                                    train_loader)
from benchmark.data.torch_datasets import CaptionPairs
from benchmark.data.types import CaptionedImage
from benchmark.errors import ConfigError, DataError
from benchmark.method import get_method
from benchmark.run.factory import build_strategy
from benchmark.testing import tiny_setup

from helpers import run_main


def open_clip_train_transform(size=224):
    """open_clip's own training transform at ViT-B/16's input size (no model needed)."""
    import open_clip

    return open_clip.image_transform(size, is_train=True)


def tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def pairs_of(paths_or_images, transform, decode="pil"):
    items = [CaptionedImage(image=x, captions=("a caption",), image_id=str(i)) for i, x in enumerate(paths_or_images)]
    return CaptionPairs(items, transform, tokens, decode=decode)


def noise_image(seed, size=(57, 43)):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


# ===================================================================== host / device split
@pytest.mark.parametrize("transform", [open_clip_train_transform(32),
                                       T.Compose([T.RandomResizedCrop(24), T.RandomHorizontalFlip(), T.ToTensor(),
                                                  T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])],
                         ids=["open_clip", "imagenet"])
def test_uint8_crop_normalised_on_the_device_equals_the_whole_transform(transform):
    """Same random draws, the host stage then the device stage: bit-identical to the unsplit
    torchvision/open_clip transform (the reference computation)."""
    split = dec.split_transform(transform)
    assert split is not None and split.model_input.mean == tuple(float(m) for m in transform.transforms[-1].mean)
    for seed in range(4):
        image = noise_image(seed)
        torch.manual_seed(seed)
        expected = transform(image)
        torch.manual_seed(seed)
        crop = split.host(image)
        assert crop.dtype == torch.uint8 and crop.shape == expected.shape
        assert torch.equal(dec.to_model_input(crop[None], split.model_input)[0], expected)


def test_a_transform_that_does_not_split_runs_whole_and_passes_the_device_stage():
    custom = T.Compose([T.Resize((8, 8)), T.ToTensor()])  # no Normalize
    assert dec.split_transform(custom) is None and dec.split_transform(lambda image: image) is None
    pairs = pairs_of([noise_image(0)], custom)
    with dec.uint8_images():
        image = pairs[0][0]
    assert image.dtype == torch.float32 and torch.equal(image, custom(noise_image(0)))
    assert dec.to_model_input(image[None], None) is not None
    assert torch.equal(dec.to_model_input(image[None], None)[0], image)
    with pytest.raises(RuntimeError, match="ModelInput"):
        dec.to_model_input(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), None)


def test_dataset_items_are_normalised_floats_except_in_the_training_loader():
    """What methods' hooks and key fitting read (``dataset[i]``) is unchanged; only the training
    loader's fetches get uint8 crops."""
    transform = open_clip_train_transform(32)
    pairs = pairs_of([noise_image(1)], transform)
    torch.manual_seed(0)
    outside = pairs[0][0]
    torch.manual_seed(0)
    assert torch.equal(outside, transform(noise_image(1)))
    with dec.uint8_images():
        torch.manual_seed(0)
        inside = pairs[0][0]
    assert inside.dtype == torch.uint8
    assert torch.equal(pairs.host_split().model_input(inside[None])[0], outside)


# ======================================================================== decode paths
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from benchmark.bench.data import write_photos  # the bench's photo-like 640x480 JPEGs at quality 90

    return write_photos(tmp_path_factory.mktemp("photos"), 6, size=(640, 480))


# Mean absolute difference of the normalised crops (CLIP std ~0.27, so 0.05 is ~3.4 of 255
# grey levels): pil-draft's DCT-domain reduction averages where pil decodes every pixel, measured
# ~0.026 on these photos at 224 px; torchvision's decode + uint8 resize ~0.0001.
TOLERANCE = {"pil-draft": 0.05, "torchvision": 0.01}


@pytest.mark.parametrize("decode", ["pil-draft", "torchvision"])
def test_fast_decode_matches_the_reference_within_tolerance(decode, photos):
    transform = open_clip_train_transform(224)
    split = dec.split_transform(transform)
    assert dec.effective_decode(split, decode) == decode
    reference, fast = dec.crop_dataset(photos, transform, "pil"), dec.crop_dataset(photos, transform, decode)
    differences = []
    for index in range(len(photos)):
        torch.manual_seed(index)
        expected = split.model_input(reference[index][None].float().to(torch.uint8))
        torch.manual_seed(index)
        got = split.model_input(fast[index][None])
        assert got.shape == expected.shape == (1, 3, 224, 224)
        differences.append((got - expected).abs().mean().item())
    assert max(differences) < TOLERANCE[decode], differences
    if decode == "pil-draft":  # a 640x480 photo cropped to 224 is decoded at half scale: not the same pixels
        assert min(differences) > 0


def test_draft_decode_is_exact_where_nothing_is_reduced(tmp_path):
    """A PNG (no DCT scaling) and a JPEG no larger than the crop give exactly pil's crop."""
    transform = open_clip_train_transform(224)
    png = tmp_path / "a.png"
    noise_image(3, (300, 240)).save(png)
    small = tmp_path / "small.jpg"
    noise_image(4, (240, 230)).save(small, quality=90)
    reference, draft = pairs_of([png, small], transform, "pil"), pairs_of([png, small], transform, "pil-draft")
    with dec.uint8_images():
        for index in range(2):
            torch.manual_seed(index)
            expected = reference[index][0]
            torch.manual_seed(index)
            assert torch.equal(draft[index][0], expected)


def test_fast_paths_fall_back_to_pil_for_transforms_they_cannot_follow():
    centre = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    jitter = T.Compose([T.RandomResizedCrop(8), T.ColorJitter(0.1), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert dec.effective_decode(dec.split_transform(centre), "pil-draft") == "pil"
    assert dec.effective_decode(dec.split_transform(jitter), "torchvision") == "pil"
    assert dec.effective_decode(dec.split_transform(jitter), "pil-draft") == "pil-draft"
    assert dec.effective_decode(None, "torchvision") == "pil"
    with pytest.raises(ValueError, match="decode must be one of"):
        dec.effective_decode(None, "nvjpeg")


@pytest.mark.parametrize("decode", list(dec.DECODE_PATHS))
def test_a_corrupt_file_is_a_data_error_naming_it_on_every_decode_path(decode, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG" * 10)
    pairs = pairs_of([bad], open_clip_train_transform(32), decode)
    with dec.uint8_images(), pytest.raises(DataError, match="bad.jpg"):
        pairs[0]
    with dec.uint8_images(), pytest.raises(DataError, match="not found"):
        pairs_of([tmp_path / "missing.jpg"], open_clip_train_transform(32), decode)[0]


# =================================================================== per-item seeding
def test_sample_seeds_differ_by_every_part_of_the_key():
    import hashlib

    assert sample_seed(1, 2, 3, 4) == int.from_bytes(hashlib.blake2b(
        b"".join(v.to_bytes(8, "little") for v in (1, 2, 3, 4)), digest_size=8).digest(), "little")
    keys = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (-1, 0, 0, 0)]
    seeds = [sample_seed(*key) for key in keys]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**64 for s in seeds)
    assert sample_seed(3, 1, 2, 5) == sample_seed(3, 1, 2, 5)


class Draws(torch.utils.data.Dataset):
    """Items are the random numbers drawn from each global generator (what a transform sees)."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([float(index), torch.rand(()).item(), random.random()])


def test_an_item_draws_from_its_own_seed_and_leaves_the_global_generators_alone():
    items = SeededItems(Draws(), seed=7)
    torch.manual_seed(123)
    random.seed(5)
    before = torch.get_rng_state(), random.getstate()
    first = items[(1, 2, 3)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.manual_seed(999)  # another global state: the same item
    assert torch.equal(items[(1, 2, 3)], first)
    generator = torch.Generator().manual_seed(sample_seed(7, 1, 2, 3))
    assert first[1].item() == torch.rand((), generator=generator).item()  # the definition, computed again
    assert first[2].item() == pytest.approx(random.Random(sample_seed(7, 1, 2, 3)).random())
    assert not torch.equal(items[(1, 3, 3)], first) and not torch.equal(items[(2, 2, 3)], first)


def epoch_draws(workers, epochs=2):
    loader = train_loader(Draws(), batch_size=4, seed=1, num_workers=workers, device=torch.device("cpu"))
    sampler = loader.batch_sampler.sampler
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(0, epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_the_epoch_reaches_persistent_workers_through_the_sampler():
    torch.manual_seed(0)
    in_process = epoch_draws(0)
    state = torch.get_rng_state()
    with_workers = epoch_draws(2)
    assert torch.equal(torch.get_rng_state(), state)  # the loader drew nothing from the global generator
    for a, b in zip(in_process, with_workers):
        assert torch.equal(a, b)
    # a new epoch: another order and other draws for the same item
    assert not torch.equal(in_process[0][:, 0], in_process[1][:, 0])
    by_index = [dict((int(row[0]), row[1].item()) for row in epoch) for epoch in in_process]
    assert all(by_index[0][i] != by_index[1][i] for i in range(10))


def test_the_epoch_sampler_tags_any_index_sampler():
    class Plain(torch.utils.data.Sampler):
        epochs: list = []

        def __iter__(self):
            return iter([3, 1])

        def __len__(self):
            return 2

        def set_epoch(self, epoch):  # DistributedSampler's signature
            self.epochs.append(epoch)

    sampler = EpochSampler(Plain())
    sampler.set_epoch(2, 5)
    assert list(sampler) == [(2, 5, 3), (2, 5, 1)] and sampler.indices.epochs == [5] and len(sampler) == 2
    shuffled = ShuffledIndices(20, seed=0)
    shuffled.set_epoch(0, 0)
    first = list(shuffled)
    shuffled.set_epoch(0, 1)
    assert sorted(first) == list(range(20)) and list(shuffled) != first


def trained(method, workers, decode="pil"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = tiny_setup(get_method(method))
        strategy = build_strategy(setup, TrainingConfig(epochs=2, batch_size=8, eval_batch_size=16,
                                                        num_workers=workers, decode=decode))
        batches = []
        original = strategy._unpack_minibatch

        def spy():
            batches.append(strategy.mbatch[0].dtype)
            original()
        strategy._unpack_minibatch = spy
        strategy.train(setup.streams.train_stream[0])
    return torch.cat([p.detach().flatten() for p in setup.method.trainable_parameters()]), batches, setup


def test_a_tiny_run_trains_the_same_model_with_0_and_2_workers():
    weights0, dtypes, setup = trained("finetune", 0)
    weights2, _, _ = trained("finetune", 2)
    assert dtypes and set(dtypes) == {torch.uint8}  # crops travelled as uint8
    assert torch.equal(weights0, weights2)
    weights_other_seed_order, _, _ = trained("finetune", 0, decode="pil-draft")  # in-memory images: exact
    assert torch.equal(weights0, weights_other_seed_order)


def test_the_training_step_sees_the_whole_transforms_float_images():
    """The images a step trains on (after the device stage) are the items of the unsplit
    transform under the same per-item seeds; and the method's own view of the task
    (``TrainData.dataset``) still yields those normalised floats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = tiny_setup(get_method("finetune"))
        strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8, eval_batch_size=16, num_workers=0))
        seen, loaders = [], []
        original = strategy._unpack_minibatch

        def spy():
            original()
            seen.append(strategy.mbatch[0].clone())
            loaders.append((strategy.dataloader, strategy.adapted_dataset))
        strategy._unpack_minibatch = spy
        strategy.train(setup.streams.train_stream[0])
    loader, dataset = loaders[0]
    sampler = loader.batch_sampler.sampler
    sampler.set_epoch(0, 0)
    keys = list(sampler)[:8]
    whole = SeededItems(dataset, seed=setup.seed, uint8=False)
    expected = torch.stack([whole[key][0] for key in keys])
    assert expected.dtype == torch.float32 and torch.equal(seen[0], expected)
    assert setup.train_data(0).dataset[0][0].dtype == torch.float32


def test_the_training_loader_normalises_like_the_training_side_of_a_key_fitting_switch():
    """LPI with key_preprocess=reference trains on CLIP crops and fits keys on ImageNet-normalised
    ones: the training loop's device stage is CLIP's; key fitting (dataset items in the main
    process) still gets the reference transform's floats."""
    from benchmark.data.preprocessing import IMAGENET_MEAN, KeyFittingTransform
    from methods.lpi import LPI, LPIConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = tiny_setup(LPI, LPIConfig(key_preprocess="reference"))
        strategy = build_strategy(setup, TrainingConfig(epochs=1, batch_size=8, eval_batch_size=16))
    pairs = setup.streams.train_pairs[0]
    switch = pairs.transform
    assert isinstance(switch, KeyFittingTransform)
    clip_mean = tuple(float(m) for m in setup.backbone.preprocess_train.transforms[-1].mean)
    assert strategy.image_input.mean == clip_mean != IMAGENET_MEAN
    with switch.fitting_keys():
        assert pairs.host_split().model_input.mean == IMAGENET_MEAN
        torch.manual_seed(0)
        item = pairs[0][0]
        torch.manual_seed(0)
        assert item.dtype == torch.float32 and torch.equal(item, switch.keys(pairs.items[0].image.convert("RGB")))
    assert pairs.host_split().model_input.mean == clip_mean


# ======================================================================= workers default
def test_auto_workers_are_none_on_cpu_and_cores_but_one_on_cuda(monkeypatch):
    import benchmark.data.loading as loading

    assert TrainingConfig().num_workers == "auto"
    assert resolve_num_workers("auto", torch.device("cpu")) == 0
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    for cores, expected in ((1, 0), (2, 1), (12, 11), (64, 16)):
        monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert resolve_num_workers("auto", torch.device("cuda")) == expected
    # Each process's share: 4 torchrun processes on 64 cores get 15 each; a Ray cell given 6
    # CPUs gets 5, and 2 processes of such a cell 2 each.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers("auto", torch.device("cuda")) == 15
    monkeypatch.setenv(loading.CELL_CPUS_ENV, "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers("auto", torch.device("cuda")) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_workers("auto", torch.device("cuda")) == 2
    assert resolve_num_workers(7, torch.device("cuda")) == 7  # a number is taken as given


@pytest.mark.parametrize("bad", ["many", -1, True, 1.5])
def test_bad_workers_or_decode_are_config_errors(bad):
    with pytest.raises(ConfigError, match="num_workers"):
        from_mapping(TrainingConfig, {"num_workers": bad}, "training")
    with pytest.raises(ConfigError, match="training.decode must be one of pil, pil-draft, torchvision"):
        from_mapping(TrainingConfig, {"decode": "fast"}, "training")


def test_workers_flag_sets_training_num_workers_and_rejects_words(monkeypatch, tmp_path, capsys):
    from benchmark.cli import main

    import benchmark.run as run_package

    seen = []
    monkeypatch.setattr(run_package, "run_all", lambda config, control: seen.append(config) or [])
    for flag, expected in (("3", 3), ("auto", "auto")):
        code, _, err = run_main(["run", "--workers", flag, "--no-tables", "--output-dir", str(tmp_path)])
        assert code == 0, err
        assert seen[-1].training.num_workers == expected
    with pytest.raises(SystemExit) as exit_status:
        main(["run", "--workers", "lots"])
    assert exit_status.value.code == 2 and "workers must be a number or auto" in capsys.readouterr().err


# =================================================================== identity, provenance
def test_num_workers_leaves_the_run_identity_but_decode_does_not():
    from benchmark.run.planning import plan_runs
    from benchmark.testing import tiny_scenario

    def digest(**training):
        config = RunConfig(methods=["finetune"], training=TrainingConfig(**training), device="cpu")
        (run,) = plan_runs(config, tiny_scenario(2), "clvl-tiny")
        return run.digest, run.identity["training"]

    (zero, identity), (sixteen, _) = digest(num_workers=0), digest(num_workers=16)
    assert zero == sixteen and "num_workers" not in identity and identity["decode"] == "pil"
    assert digest(decode="pil-draft")[0] != zero


def test_provenance_records_the_decode_path_and_transport():
    from benchmark import provenance

    _, _, setup = trained("finetune", 0, decode="torchvision")
    record = provenance.training_data(setup.streams, "torchvision", 0)
    # open_clip's transform splits (uint8 transport); the synthetic images are in memory, but the
    # path the transform gets is torchvision's (in-memory images are decoded by Pillow anyway).
    assert record["decode"] == "torchvision" and record["decode_used"] == "torchvision"
    assert record["transport"] == "uint8" and record["num_workers"] == 0
    assert record["decoders"]["pillow"] and record["decoders"]["torchvision"]


def test_a_run_records_its_decode_path_and_another_worker_count_is_the_same_run(tmp_path, cache_dir):
    """End to end through `run`: the record's provenance says how images were decoded and fed;
    rerunning with another --workers finds the finished run (same identity) instead of training again."""
    from helpers import write_image, write_table

    root = tmp_path / "data"
    rows = {"train": [], "test": []}
    for task, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for i in range(3):
            write_image(root / f"{task}{i}.jpg", colour)
            rows["train"] += [{"image": f"{task}{i}.jpg", "caption": f"a {task} square {i}", "task": task},
                              {"image": f"{task}{i}.jpg", "caption": f"all {task}, picture {i}", "task": task}]
        write_image(root / f"{task}_test.jpg", colour)
        rows["test"].append({"image": f"{task}_test.jpg", "caption": f"a {task} test square", "task": task})
    for split, table in rows.items():
        write_table(root / f"{split}.csv", table)
    out = tmp_path / "out"
    argv = ["run", "--methods", "finetune", "--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "1",
            "--batch-size", "4", "--no-tables", "--scenario", "custom",
            "--set", "scenario_options={train: train.csv, test: test.csv}", "--set", "training.decode=pil-draft",
            "--data-root", str(root), "--cache-dir", str(cache_dir), "--output-dir", str(out)]
    code, _, err = run_main([*argv, "--workers", "1"])
    assert code == 0, err
    (record_path,) = (out / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    fed = record["provenance"]["training_data"]
    assert (fed["decode"], fed["decode_used"], fed["transport"], fed["num_workers"]) == ("pil-draft", "pil-draft",
                                                                                        "uint8", 1)
    written = record_path.stat().st_mtime_ns
    code, _, err = run_main([*argv, "--workers", "0"])
    assert code == 0, err
    assert [p.name for p in (out / "runs").glob("*.json")] == [record_path.name]
    assert record_path.stat().st_mtime_ns == written  # skipped as finished, not trained again
