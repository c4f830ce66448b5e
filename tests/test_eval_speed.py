"""Evaluation speed-ups change nothing but the time (issue 14, items 2, 3 and the one score product).

* Retrieval: one score product for both directions gives the same ranks and ties as the former
  two products (one per direction, kept below as the reference).
* Evaluation: the one-pass ``evaluate_images`` / ``evaluate_texts`` of every shipped method give
  the recall, routing and per-query ranks of the former ``encode_*`` + ``route_*`` path, with and
  without the :class:`EvaluationCache`, over several sessions; the declared ``forward_passes``
  is the number of image-encoder passes an uncached evaluation makes, and the cache removes the
  frozen ones.
* Routing keys: text keys come from the token ids alone (identical to the former pass over the
  pairs, and no image is decoded); image keys come from each image once, which equals the former
  pass where each image has one caption, and the de-duplicated former features otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from benchmark.data import torch_datasets
from benchmark.data.preprocessing import reference_transform
from benchmark.data.torch_datasets import CaptionPairs, split_eval_transform
from benchmark.errors import DataError
from benchmark.evaluation import EvaluationCache, Protocol, evaluate_session
from benchmark.method import Method
from benchmark.retrieval import retrieval_ranks
from benchmark.testing import tiny_setup
from methods.coda import CodaPrompt
from methods.common.routing import frozen_features
from methods.dualprompt import DualPrompt
from methods.l2p import L2P, L2PConfig
from methods.lora import LoRA, LoraMethodConfig
from methods.lpi.method import LPI, LPIReleased
from methods.sprompts import SPrompts
from methods.zeroshot import ZeroShot


# ---------------------------------------------------------------------- the former two products
def two_product_ranks(images, texts, caption_image, chunk_size):
    """The former implementation: i2t from ``images @ texts.T``, t2i from ``texts @ images.T``."""
    n_images, n_texts = len(images), len(texts)
    i2t, i2t_tied, i2t_true = (torch.empty(n_images, dtype=torch.long) for _ in range(3))
    ids = torch.arange(n_texts)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        scores = images[start:stop] @ texts.T
        in_chunk = (caption_image >= start) & (caption_image < stop)
        rows = caption_image[in_chunk] - start
        own = scores[rows, ids[in_chunk]]
        best = torch.full((stop - start,), float("-inf")).scatter_reduce_(0, rows, own, reduce="amax")
        at_best = torch.zeros(stop - start, dtype=torch.long).scatter_add_(0, rows, (own == best[rows]).long())
        i2t[start:stop] = (scores > best[:, None]).sum(1)
        i2t_tied[start:stop] = (scores == best[:, None]).sum(1) - at_best
        i2t_true[start:stop] = at_best
    t2i, t2i_tied = torch.empty(n_texts, dtype=torch.long), torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        scores = texts[start:stop] @ images.T
        true = scores.gather(1, caption_image[start:stop, None])
        t2i[start:stop] = (scores > true).sum(1)
        t2i_tied[start:stop] = (scores == true).sum(1) - 1
    return {"i2t": i2t, "t2i": t2i, "i2t_tied": i2t_tied, "i2t_tied_true": i2t_true, "t2i_tied": t2i_tied}


def gallery(seed: int, exact: bool, n_images: int = 37):
    """1-5 captions per image in shuffled order. ``exact``: small-integer features, whose products
    are exact in float32 whatever the order of summation, with many exact ties (duplicated images
    and captions); else random unit vectors (distinct scores)."""
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.repeat_interleave(torch.arange(n_images), torch.randint(1, 6, (n_images,), generator=g))
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    if not exact:
        images = torch.nn.functional.normalize(torch.randn(n_images, 16, generator=g), dim=1)
        return images, torch.nn.functional.normalize(torch.randn(len(caption_image), 16, generator=g), dim=1), \
            caption_image
    images = torch.randint(-2, 3, (n_images, 6), generator=g).float()
    texts = torch.randint(-2, 3, (len(caption_image), 6), generator=g).float()
    images[1::5] = images[0::5][: len(images[1::5])]
    texts[2::7] = texts[0::7][: len(texts[2::7])]
    return images, texts, caption_image


@pytest.mark.parametrize("exact", [True, False], ids=["exact-ties", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 4, 9, 1000])
def test_one_product_gives_the_two_products_ranks_and_ties(seed, chunk_size, exact):
    images, texts, caption_image = gallery(seed, exact)
    expected = two_product_ranks(images, texts, caption_image, chunk_size)
    ranks = retrieval_ranks(images, texts, caption_image, chunk_size=chunk_size, device="cpu")
    chunked = retrieval_ranks(images, texts, caption_image, chunk_size=chunk_size, max_scores=0)
    if exact:  # ties are exercised
        assert int(expected["t2i_tied"].sum()) > 0 and int(expected["i2t_tied"].sum()) > 0
    for name, values in expected.items():
        assert torch.equal(getattr(ranks, name), values), name  # one product
        assert torch.equal(getattr(chunked, name), values), name  # beyond max_scores: the two products


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranking_on_cuda_gives_the_cpu_ranks_on_exact_scores():
    # Small integers: every product is exact, so CPU and GPU scores agree bit for bit.
    g = torch.Generator().manual_seed(3)
    images = torch.randint(-2, 3, (50, 8), generator=g).float()
    texts = torch.randint(-2, 3, (150, 8), generator=g).float()
    caption_image = torch.arange(50).repeat_interleave(3)
    cpu = retrieval_ranks(images, texts, caption_image, chunk_size=7)
    gpu = retrieval_ranks(images, texts, caption_image, chunk_size=7, device="cuda")
    for name in ("i2t", "t2i", "i2t_tied", "i2t_tied_true", "t2i_tied"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name


# ---------------------------------------------------------------------- the split eval transform
def test_kept_crops_finish_to_exactly_the_eval_transform():
    setup = tiny_setup(ZeroShot)
    gallery = setup.streams.galleries[0]
    crops = torch.stack([gallery.crop(i) for i in range(len(gallery))])
    assert crops.dtype == torch.uint8
    assert torch.equal(gallery.finish(crops), torch.stack([gallery[i][0] for i in range(len(gallery))]))
    assert split_eval_transform(reference_transform(32)) is None  # random crops are never kept


# ---------------------------------------------------------------------- evaluation: one pass, cache
CASES = [(LPI, None), (LPIReleased, None), (DualPrompt, None), (L2P, L2PConfig(top_k=3)), (CodaPrompt, None),
         (SPrompts, None), (LoRA, LoraMethodConfig(mode="per_task")), (ZeroShot, None)]


def _prepared(cls, config):
    """Two tasks started and their keys fitted (no training: the initial prompts are random)."""
    setup = tiny_setup(cls, config)
    for task in range(2):
        setup.method.before_training_exp(setup.train_data(task))
        setup.method.after_training_exp(setup.train_data(task))
    return setup


def _evaluate(setup, after_task, protocol, cache=None):
    torch.manual_seed(after_task)  # lpi_released's random eval crops: the same draws on every path
    return evaluate_session(setup.method, setup.streams.galleries, after_task, protocol, batch_size=3,
                            device=torch.device("cpu"), cache=cache)


def _same(a, b):
    assert a.recall == b.recall and a.routing == b.routing
    for direction in a.ranks:
        for task in a.ranks[direction]:
            assert torch.equal(a.ranks[direction][task], b.ranks[direction][task])


@pytest.mark.parametrize("identity", ["inferred", "given"])
@pytest.mark.parametrize("cls, config", CASES, ids=[c.name for c, _ in CASES])
def test_one_pass_and_cache_give_the_former_results(cls, config, identity, monkeypatch):
    setup = _prepared(cls, config)
    protocol = Protocol(gallery="union", task_identity=identity)
    cache = EvaluationCache()
    cached = [_evaluate(setup, t, protocol, cache) for t in (0, 1, 1)]
    uncached = [_evaluate(setup, t, protocol) for t in (0, 1)]
    method = setup.method
    # The former path: encode_* then route_* (the base class's evaluate_* hooks).
    monkeypatch.setattr(method, "evaluate_images", lambda i, t=None, f=None: Method.evaluate_images(method, i, t, f))
    monkeypatch.setattr(method, "evaluate_texts", lambda i, t=None, f=None: Method.evaluate_texts(method, i, t, f))
    former = [_evaluate(setup, t, protocol) for t in (0, 1)]
    for session, expected in enumerate(former):
        _same(uncached[session], expected)
        _same(cached[session], expected)
    _same(cached[2], former[1])
    if identity == "inferred" and cls not in (ZeroShot, L2P, CodaPrompt):
        assert former[1].routing is not None  # routing is really compared
    deterministic = cls is not LPIReleased
    n_images = sum(len(g) for g in setup.streams.galleries)
    assert cache.decoded == (n_images if deterministic else 0)  # each test image decoded once for 3 sessions


def _image_passes(setup, run):
    """Images that went through the backbone's image encoder during ``run()``."""
    backbone, seen = setup.method.backbone, []
    original = backbone.encode_image
    backbone.encode_image = lambda images, *a, **k: (seen.append(len(images)), original(images, *a, **k))[1]
    try:
        run()
    finally:
        del backbone.encode_image
    return sum(seen)


@pytest.mark.parametrize("cls, config", [c for c in CASES if c[0] is not LPIReleased], ids=[
    c.name for c, _ in CASES if c is not LPIReleased])
def test_declared_forward_passes_are_the_passes_made(cls, config):
    setup = _prepared(cls, config)
    protocol = Protocol(gallery="union", task_identity="inferred")
    n_images = sum(len(g) for g in setup.streams.galleries)
    assert _image_passes(setup, lambda: _evaluate(setup, 1, protocol)) == setup.method.forward_passes * n_images
    cache = EvaluationCache()
    _evaluate(setup, 1, protocol, cache)  # fills the cache
    # With the frozen features cached, only the prompted pass is left.
    assert _image_passes(setup, lambda: _evaluate(setup, 1, protocol, cache)) == n_images


def test_crop_cache_respects_its_cap():
    setup = _prepared(ZeroShot, None)
    protocol = Protocol(gallery="union")
    crop_bytes = setup.streams.galleries[0].crop(0).numel()
    cache = EvaluationCache(max_crop_bytes=crop_bytes * len(setup.streams.galleries[0]))  # room for task 0 only
    _same(_evaluate(setup, 1, protocol, cache), _evaluate(setup, 1, protocol))
    assert cache.crop_bytes <= cache.max_crop_bytes and cache.decoded == len(setup.streams.galleries[0])
    with pytest.raises(ValueError, match="max_crop_bytes"):
        EvaluationCache(max_crop_bytes=-1)


# ---------------------------------------------------------------------- routing keys
def _pairs_dataset(setup, task, captions_per_image=None, eval_transform=True):
    """A task's training pairs with a deterministic transform, optionally cut to N captions per image."""
    items = setup.scenario.train[task]
    if captions_per_image is not None:
        items = [type(item)(**{**vars(item), "captions": list(item.captions[:captions_per_image])})
                 for item in items]
    transform = setup.backbone.preprocess_eval if eval_transform else setup.backbone.preprocess_train
    return CaptionPairs(items, transform, setup.backbone.tokenizer)


def test_text_keys_come_from_the_tokens_alone(monkeypatch):
    setup = tiny_setup(ZeroShot)
    pairs = setup.train_data(0).dataset
    former = frozen_features(setup.backbone, Subset(pairs, range(len(pairs))), modality="text", batch_size=5,
                             device=torch.device("cpu"))

    def no_decoding(item):
        raise AssertionError("an image was decoded for text keys")

    monkeypatch.setattr(torch_datasets, "load_image", no_decoding)
    now = frozen_features(setup.backbone, pairs, modality="text", batch_size=5, device=torch.device("cpu"))
    assert torch.equal(now, former)


def test_key_fitting_runs_at_the_training_precision():
    """``auto`` on the CPU is float32 with autocast off (bit-equal to ``fp32``); ``bf16`` really
    runs autocast (other features, within bf16's rounding), and the features come back float32."""
    setup = tiny_setup(ZeroShot)
    cpu = torch.device("cpu")
    pairs = _pairs_dataset(setup, 0)
    for modality in ("image", "text"):
        auto = frozen_features(setup.backbone, pairs, modality=modality, batch_size=4, device=cpu)
        fp32 = frozen_features(setup.backbone, pairs, modality=modality, batch_size=4, device=cpu, precision="fp32")
        bf16 = frozen_features(setup.backbone, pairs, modality=modality, batch_size=4, device=cpu, precision="bf16")
        assert torch.equal(auto, fp32) and bf16.dtype == torch.float32
        assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=5e-2)


def test_image_keys_use_each_image_once():
    setup = tiny_setup(ZeroShot)
    cpu = torch.device("cpu")
    one = _pairs_dataset(setup, 0, captions_per_image=1)
    former = frozen_features(setup.backbone, Subset(one, range(len(one))), modality="image", batch_size=4, device=cpu)
    assert torch.equal(frozen_features(setup.backbone, one, modality="image", batch_size=4, device=cpu), former)
    # Two captions per image: the former pass saw every image twice; now it is seen once.
    two = _pairs_dataset(setup, 0, captions_per_image=2)
    assert all(len(item.captions) == 2 for item in two.items)
    former = frozen_features(setup.backbone, Subset(two, range(len(two))), modality="image", batch_size=4, device=cpu)
    now = frozen_features(setup.backbone, two, modality="image", batch_size=4, device=cpu)
    assert len(now) == len(two.items) and torch.equal(now, former[::2])


def test_loader_workers_change_nothing():
    setup = _prepared(SPrompts, None)
    protocol = Protocol(gallery="union")
    expected = _evaluate(setup, 1, protocol)
    for cache in (None, EvaluationCache()):
        torch.manual_seed(1)
        with_workers = evaluate_session(setup.method, setup.streams.galleries, 1, protocol, batch_size=3,
                                        device=torch.device("cpu"), cache=cache, num_workers=2)
        _same(with_workers, expected)
    pairs = _pairs_dataset(setup, 0)  # a deterministic transform: the workers decode
    cpu = torch.device("cpu")
    assert torch.equal(frozen_features(setup.backbone, pairs, modality="image", batch_size=4, device=cpu, num_workers=2),
                       frozen_features(setup.backbone, pairs, modality="image", batch_size=4, device=cpu))


def test_the_cache_leaves_the_global_rng_where_decoding_leaves_it():
    # A resumed run starts with an empty cache: the run's later random draws must not depend on it.
    setup = _prepared(ZeroShot, None)
    protocol = Protocol(gallery="union")
    cache = EvaluationCache()
    states = []
    for run_cache in (None, cache, cache):  # decode, fill the cache, read from it
        torch.manual_seed(5)
        evaluate_session(setup.method, setup.streams.galleries, 1, protocol, batch_size=3,
                         device=torch.device("cpu"), cache=run_cache)
        states.append(torch.get_rng_state())
    assert cache.decoded == sum(len(g) for g in setup.streams.galleries)
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])


def test_a_broken_test_image_in_a_worker_is_a_one_line_data_error(tmp_path):
    setup = _prepared(ZeroShot, None)
    gallery = setup.streams.galleries[0]
    missing = tmp_path / "missing.jpg"
    item = gallery.items[1]  # not the first: the cache sizes its crops on image 0 in this process
    gallery.items[1] = type(item)(**{**vars(item), "image": missing})
    for cache in (None, EvaluationCache()):
        with pytest.raises(DataError) as raised:
            evaluate_session(setup.method, setup.streams.galleries, 0, Protocol(), batch_size=3,
                             device=torch.device("cpu"), cache=cache, num_workers=1)
        assert str(raised.value).startswith(f"image file not found: {missing}") and "\n" not in str(raised.value)
