"""Checkpoints without the frozen backbone, the text tower cut to the batch's longest caption,
and captions tokenised once (issue 14, items 5 and 6).

* Checkpoints: the rule that leaves backbone entries out (:class:`benchmark.checkpoint.FrozenWeights`)
  on a toy module for every kind of write; an ``lpi`` checkpoint holds none of the pretrained
  backbone and records the digest of what it left out (recomputed here from the documented
  formula); a resumed ``lpi`` and ``finetune`` run equals an uninterrupted one bit for bit; a
  changed backbone is refused with one line; a v1 checkpoint (whole state dict) still resumes.
* Text tower: features and gradients with the cut equal those without it (float64, every prompt
  kind the adapter offers), the cut length against a row-by-row count, and training batches
  arrive cut.
* Token cache: a hit gives the ids the tokenizer gives, memory and disk; another tokenizer or
  other captions miss; a damaged file is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from benchmark import checkpoint as ckpt
from benchmark.backbone import ClipBackbone, Prompts, load_backbone
from benchmark.backbone.adapter import TokenTrimmer
from benchmark.data import token_cache
from benchmark.data.token_cache import TokenCache, tokenizer_identity
from benchmark.data.torch_datasets import tokenize_all
from benchmark.run import loop
from helpers import error_line, run_main

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated function update:DeprecationWarning")

TINY = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "2", "--batch-size", "8",
        "--set", "scenario_options.train_images=8", "--set", "scenario_options.test_images=4",
        "--set", "scenario_options.captions_per_image=2",
        "--set", "scenario_options.tasks=[colours,backdrops,textures]", "--no-tables", "--keep-checkpoints"]


# ============================================================================ the rule


class Toy(nn.Module):
    """A stand-in for a method: a two-layer "backbone" and a parameter of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        self.backbone.register_buffer("stat", torch.zeros(3))
        self.own = nn.Parameter(torch.zeros(2))


def left_out(module: nn.Module) -> list[str]:
    return ckpt.FrozenWeights(module).split(module)[1]


def test_untouched_backbone_entries_are_left_out_and_the_method_own_are_kept():
    toy = Toy()
    frozen = ckpt.FrozenWeights(toy)
    saved, omitted = frozen.split(toy)
    assert sorted(omitted) == ["backbone.0.bias", "backbone.0.weight", "backbone.1.bias", "backbone.1.weight",
                       "backbone.stat"]
    assert list(saved) == ["own"]
    toy.backbone.requires_grad_(True)  # trainable is not written: still as built
    toy.backbone(torch.randn(2, 4)).sum().backward()
    assert frozen.split(toy)[1] == omitted


@pytest.mark.parametrize("write", ["optimizer step", "no_grad add_", "load_state_dict", "new parameter",
                                   "dtype change", "buffer fill_"])
def test_every_ordinary_write_to_a_backbone_entry_gets_it_saved(write):
    toy = Toy()
    frozen = ckpt.FrozenWeights(toy)
    layer = toy.backbone[0]
    if write == "optimizer step":
        optimizer = torch.optim.AdamW([layer.weight], lr=0.1)
        toy.backbone(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        changed = ["backbone.0.weight"]
    elif write == "no_grad add_":
        with torch.no_grad():
            layer.bias.add_(1.0)
        changed = ["backbone.0.bias"]
    elif write == "load_state_dict":
        layer.load_state_dict(nn.Linear(4, 4).state_dict())
        changed = ["backbone.0.weight", "backbone.0.bias"]
    elif write == "new parameter":
        layer.weight = nn.Parameter(layer.weight.detach().clone())  # same values, another tensor
        changed = ["backbone.0.weight"]
    elif write == "dtype change":
        toy.backbone[1].double()
        changed = ["backbone.1.weight", "backbone.1.bias"]
    else:
        toy.backbone.stat.fill_(2.0)
        changed = ["backbone.stat"]
    saved, omitted = frozen.split(toy)
    assert sorted(set(saved) - {"own"}) == sorted(changed)
    assert not set(changed) & set(omitted)
    for name in changed:  # what is saved is the live value
        assert torch.equal(saved[name], toy.state_dict()[name])


def independent_digest(entries: dict[str, torch.Tensor], names: list[str]) -> str:
    """The documented formula, written out: SHA-256 over (name, SHA-256 of name/dtype/shape/bytes)."""
    combined = hashlib.sha256()
    for name in names:
        tensor = entries[name].detach().cpu().contiguous()
        one = hashlib.sha256(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        one.update(tensor.numpy().tobytes())
        combined.update(f"{name}\0{one.hexdigest()}\0".encode())
    return combined.hexdigest()


def test_digest_follows_the_documented_formula_and_sees_one_changed_value():
    toy = Toy()
    frozen = ckpt.FrozenWeights(toy)
    _, names = frozen.split(toy)
    assert frozen.digest(toy, names) == independent_digest(toy.state_dict(), names)
    other = Toy()
    with torch.no_grad():
        other.backbone[1].bias[0] += 1e-6
    assert ckpt.FrozenWeights(other).digest(other, names) != frozen.digest(toy, names)


# ============================================================================ runs


def cli(out: Path, cache_dir: Path, method: str, *extra: str) -> tuple[int, str]:
    code, _, err = run_main(["run", "--methods", method, *TINY, *extra, "--cache-dir", str(cache_dir),
                             "--output-dir", str(out)])
    return code, err


def outcome(out: Path) -> tuple[dict, dict]:
    (record_path,) = (out / "runs").glob("*.json")
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    return json.loads(record_path.read_text()), torch.load(checkpoint, weights_only=True)


def the_checkpoint(out: Path) -> Path:
    (checkpoint,) = (out / "checkpoints").rglob(ckpt.FILE_NAME)
    return checkpoint


@contextlib.contextmanager
def crash_after_checkpoint(number: int):
    original = loop.RunExecution._save
    count = {"n": 0}

    class Crash(Exception):
        pass

    def save(self, strategy=None):
        original(self, strategy)
        count["n"] += 1
        if count["n"] == number:
            raise Crash

    loop.RunExecution._save = save
    try:
        with pytest.raises(Crash):
            yield
    finally:
        loop.RunExecution._save = original


def assert_same_run(expected: tuple[dict, dict], actual: tuple[dict, dict]) -> None:
    (record_a, state_a), (record_b, state_b) = expected, actual
    assert record_b["recall"] == record_a["recall"]
    assert record_b["final_session_queries"] == record_a["final_session_queries"]
    assert list(state_b["method_state"]) == list(state_a["method_state"])
    different = [k for k in state_a["method_state"]
                 if not torch.equal(state_a["method_state"][k], state_b["method_state"][k])]
    assert not different, f"not bit-identical after resuming: {different[:5]}"
    assert state_b["frozen"] == state_a["frozen"]
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])


@pytest.fixture(scope="module")
def fresh_backbone(cache_dir):
    """The backbone as a run with seed 0 loads it (``clvl-tiny`` has random weights drawn from
    the seed, which the run sets first: :func:`benchmark.run.factory.build_method`)."""
    from benchmark.run.runtime import seed_everything

    def load():
        seed_everything(0)
        return load_backbone("clvl-tiny", cache_dir=cache_dir)
    return load


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir):
    """Uninterrupted runs of lpi and finetune, shared by the tests below."""
    runs = {}
    for method in ("lpi", "finetune"):
        out = tmp_path_factory.mktemp(f"reference-{method}")
        code, err = cli(out, cache_dir, method)
        assert code == 0, err
        runs[method] = (out, outcome(out))
    return runs


def test_lpi_checkpoint_holds_no_pretrained_backbone_and_its_digest(references, fresh_backbone):
    _, (_, state) = references["lpi"]
    pretrained = {f"backbone.{k}": v for k, v in fresh_backbone().state_dict().items()}
    assert pretrained and not set(pretrained) & set(state["method_state"])
    assert sorted(state["frozen"]["names"]) == sorted(pretrained)
    assert state["frozen"]["digest"] == independent_digest(pretrained, state["frozen"]["names"])
    assert state["schema"] == ckpt.SCHEMA
    assert any(name.startswith("prompts.") for name in state["method_state"])  # what lpi trained is there


def test_finetune_checkpoint_saves_every_backbone_weight_training_changed(references, fresh_backbone):
    _, (_, state) = references["finetune"]
    pretrained = {f"backbone.{k}": v for k, v in fresh_backbone().state_dict().items()}
    changed = {k for k, v in pretrained.items()
               if k not in state["frozen"]["names"] and not torch.equal(v, state["method_state"][k])}
    assert changed  # fine-tuning did move the backbone
    for name in state["frozen"]["names"]:  # whatever was left out is still the pretrained value
        assert name in pretrained
    assert set(pretrained) == set(state["frozen"]["names"]) | (set(pretrained) & set(state["method_state"]))


@pytest.mark.parametrize("method, crash_at, extra", [
    ("lpi", 2, ()),  # after task 2 of 3
    ("lpi", 3, ("--checkpoint-every", "1")),  # task 1, step 3: optimizer state included
    ("finetune", 7, ("--checkpoint-every", "1")),  # task 2, step 2: the fine-tuned backbone is saved
])
def test_a_resumed_run_with_slim_checkpoints_equals_an_uninterrupted_one(method, crash_at, extra, tmp_path,
                                                                         cache_dir, references):
    out = tmp_path / "out"
    with crash_after_checkpoint(crash_at):
        cli(out, cache_dir, method, *extra)
    assert not list((out / "runs").glob("*.json"))
    code, err = cli(out, cache_dir, method, "--resume", *extra)
    assert code == 0, err
    assert_same_run(references[method][1], outcome(out))


def test_a_changed_backbone_is_refused_in_one_line(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "out"
    with crash_after_checkpoint(1):
        cli(out, cache_dir, "lpi")
    original = loop.load_backbone

    def nudged(*args, **kwargs):
        backbone = original(*args, **kwargs)
        with torch.no_grad():
            backbone.model.ln_final.bias[0] += 1e-3  # as if the weights file had changed
        return backbone

    monkeypatch.setattr(loop, "load_backbone", nudged)
    code, err = cli(out, cache_dir, "lpi", "--resume")
    assert code != 0
    line = error_line(err, "backbone's weights changed since checkpoint", "--force")
    assert "Traceback" not in err and line
    assert the_checkpoint(out).exists()  # kept for when the weights are back


def test_a_v1_checkpoint_with_the_whole_state_still_resumes_identically(tmp_path, cache_dir, references,
                                                                          fresh_backbone):
    out = tmp_path / "out"
    with crash_after_checkpoint(2):
        cli(out, cache_dir, "lpi")
    path = the_checkpoint(out)
    state = torch.load(path, weights_only=True)
    pretrained = fresh_backbone().state_dict()
    for name in state.pop("frozen")["names"]:  # what a v1 checkpoint held in full
        state["method_state"][name] = pretrained[name.removeprefix("backbone.")]
    state["schema"] = "clvl-benchmark/checkpoint/v1"
    torch.save(state, path)
    code, err = cli(out, cache_dir, "lpi", "--resume")
    assert code == 0, err
    record, final = outcome(out)
    expected_record, expected = references["lpi"][1]
    assert record["recall"] == expected_record["recall"]
    for name, value in expected["method_state"].items():
        assert torch.equal(final["method_state"][name], value), name


def test_measure_save_compares_whole_and_slim_states(fresh_backbone, tmp_path):
    from methods.lpi.method import LPI

    torch.manual_seed(0)
    method = LPI(fresh_backbone(), None, num_tasks=2)
    result = ckpt.measure_save(method, tmp_path, repeats=1)
    pretrained = len(method.backbone.state_dict())
    assert result["entries_left_out"] == pretrained
    assert result["entries_saved"] == len(method.state_dict()) - pretrained
    assert result["slim"]["bytes"] < result["full"]["bytes"]
    assert result["ratio_bytes"] == pytest.approx(result["full"]["bytes"] / result["slim"]["bytes"])
    assert not list(tmp_path.iterdir())  # its scratch folder is gone


# ============================================================================ the text tower


@pytest.fixture(scope="module")
def tiny64(fresh_backbone) -> ClipBackbone:
    return fresh_backbone().double().eval()


def captions(bb: ClipBackbone, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """SOT, random words, EOT, zero padding (CLIP's layout; EOT is the highest id)."""
    vocab = bb.model.vocab_size
    sot, eot = vocab - 2, vocab - 1
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), bb.context_length, dtype=torch.long)
    for row, n in enumerate(lengths):
        words = torch.randint(1, vocab - 2, (n,), generator=generator).tolist()
        seq = ([sot] + words + [eot])[:bb.context_length]
        seq[-1] = eot
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids


@contextlib.contextmanager
def untrimmed(bb: ClipBackbone):
    """encode_text as before the cut: every position of the context."""
    bb.cut_text = False
    try:
        yield
    finally:
        bb.cut_text = True


def prompt_kinds(bb: ClipBackbone, n: int = 3) -> dict[str, Prompts]:
    """Every prompt kind of the adapter; per-sample ones for a batch of 4."""
    width, depth = bb.text_width, len(bb.text_blocks)
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.1).requires_grad_(True)

    return {
        "none": Prompts(),
        "tokens (S-Prompts' CoOp context)": Prompts(tokens=rand(1, n, width)),
        "tokens + deep add (LPI)": Prompts(tokens=rand(4, n, width), deep={1: rand(4, n, width)}, deep_mode="add"),
        "tokens + deep replace (VPT-deep)": Prompts(tokens=rand(1, n, width), deep={depth - 1: rand(1, n, width)},
                                                    deep_mode="replace"),
        "prefix (DualPrompt / CODA)": Prompts(prefix={0: (rand(1, 2, width), rand(1, 2, width))}),
        "tokens + prefix": Prompts(tokens=rand(1, n, width), prefix={1: (rand(4, 2, width), rand(4, 2, width))}),
    }


def test_trimmer_length_is_the_last_pooled_position_plus_one(tiny64):
    ids = captions(tiny64, [3, 9, 0, 5])
    expected = 1 + max(row.tolist().index(max(row.tolist())) for row in ids)  # first highest id, per row
    assert expected == 11
    trimmer = tiny64.token_trimmer()
    assert trimmer.exact and trimmer.length(ids) == expected
    assert torch.equal(tiny64.trim_tokens(ids), ids[:, :expected])
    eos = TokenTrimmer("eos", eos_id=7)
    rows = torch.tensor([[1, 5, 7, 0, 0, 0], [1, 7, 7, 9, 0, 0]])
    assert eos.length(rows) == 3  # the first eos of each row: positions 2 and 1
    assert TokenTrimmer("last", None, exact=False).length(rows) == 6


@pytest.mark.parametrize("kind", ["none", "tokens (S-Prompts' CoOp context)", "tokens + deep add (LPI)",
                                  "tokens + deep replace (VPT-deep)", "prefix (DualPrompt / CODA)",
                                  "tokens + prefix"])
def test_cut_text_tower_gives_the_same_features_and_gradients(tiny64, kind):
    bb = tiny64
    lengths = [2, 7, 4, 11]  # the longest caption: 13 of 32 positions
    ids = captions(bb, lengths)
    assert bb.trim_tokens(ids).shape[1] == 13 < bb.context_length
    weight = bb.model.transformer.resblocks[0].mlp.c_fc.weight

    def features_and_grads(cut: bool):
        prompts = prompt_kinds(bb)[kind]
        leaves = [t for t in (prompts.tokens, *prompts.deep.values(), *(x for kv in prompts.prefix.values()
                                                                         for x in kv)) if t is not None]
        weight.requires_grad_(True)
        with (contextlib.nullcontext() if cut else untrimmed(bb)):
            features = bb.encode_text(ids, prompts)
        loss = (features * torch.linspace(-1, 1, features.shape[1], dtype=features.dtype)).sum()
        grads = torch.autograd.grad(loss, [weight, *leaves])
        weight.requires_grad_(False)
        return features.detach(), grads

    cut, cut_grads = features_and_grads(True)
    full, full_grads = features_and_grads(False)
    assert torch.allclose(cut, full, rtol=0, atol=1e-12)
    for a, b in zip(cut_grads, full_grads):
        assert b.abs().max() > 0
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_cut_text_tower_matches_open_clip_in_float32_and_keeps_long_captions(fresh_backbone):
    bb = fresh_backbone().eval()
    ids = captions(bb, [1, 4, 40])  # the last is cut by the context, as open_clip's tokenizer does
    with torch.no_grad():
        ours = bb.encode_text(ids)
        theirs = bb.model.encode_text(ids, normalize=True)
        short = bb.encode_text(ids[:2])
        with untrimmed(bb):
            full_short = bb.encode_text(ids[:2])
        prompts = Prompts(tokens=torch.randn(1, 5, bb.text_width) * 0.1)
        long_cut = bb.encode_text(ids, prompts)  # 32 + 5 > context: the prompt path cuts the caption
        with untrimmed(bb):
            long_full = bb.encode_text(ids, prompts)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(short, full_short, atol=1e-6)
    assert torch.allclose(long_cut, long_full, atol=1e-6)


def test_already_trimmed_ids_give_the_same_features(tiny64):
    """Ids cut on the host before a GPU sees them are run at their width, with the same result
    as all positions; with ``cut_text`` off they are padded back to the full context."""
    ids = captions(tiny64, [3, 5])
    narrow = ids[:, :7]  # the longest caption ends at position 6
    prompts = Prompts(tokens=torch.randn(1, 4, tiny64.text_width, dtype=torch.float64))
    with torch.no_grad():
        cut, cut_prompted = tiny64.encode_text(narrow), tiny64.encode_text(narrow, prompts)
        with untrimmed(tiny64):
            full, full_prompted = tiny64.encode_text(ids), tiny64.encode_text(ids, prompts)
            padded = tiny64.encode_text(narrow)
    assert torch.allclose(cut, full, rtol=0, atol=1e-12)
    assert torch.allclose(cut_prompted, full_prompted, rtol=0, atol=1e-12)
    assert torch.equal(padded, full)


def test_training_batches_arrive_with_tokens_cut_to_their_longest_caption(fresh_backbone):
    from torch.utils.data import DataLoader

    from benchmark.scenarios import build_scenario
    from benchmark.scenarios.streams import make_streams

    scenario = build_scenario("synthetic", {"train_images": 6, "test_images": 2, "captions_per_image": 2,
                                            "tasks": ["colours"]}, None)
    streams = make_streams(scenario, fresh_backbone())
    dataset = streams.train_stream[0].dataset
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)
    full = streams.train_pairs[0].tokens
    start = 0
    for images, tokens, index, task in loader:
        rows = full[start:start + len(tokens)]
        longest = 1 + int(rows.argmax(dim=1).max())
        assert tokens.shape == (len(rows), longest) and torch.equal(tokens, rows[:, :longest])
        assert (rows[:, longest:] == 0).all()  # only padding was dropped
        start += len(tokens)
    assert start == len(full)
    import pickle

    again = pickle.loads(pickle.dumps(dataset.collate_fn))  # worker processes get it pickled
    assert again.trimmer == dataset.collate_fn.trimmer


# ============================================================================ the token cache


@pytest.fixture
def clean_memory():
    token_cache.clear_memory()
    yield
    token_cache.clear_memory()


CAPTIONS = ["a red circle on a blue backdrop", "two small squares", "a striped triangle, large"]


def counted(tokenizer, calls: list):
    def tokenize() -> torch.Tensor:
        calls.append(1)
        return tokenizer(CAPTIONS).long()
    return tokenize


def test_cache_gives_the_tokenizer_ids_from_memory_and_from_disk(tmp_path, clean_memory):
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    expected = tokenizer(CAPTIONS).long()  # the tokenizer itself, no cache
    calls: list = []
    cache = TokenCache(tmp_path)
    first = cache.tokens(tokenizer, CAPTIONS, counted(tokenizer, calls))
    second = cache.tokens(tokenizer, CAPTIONS, counted(tokenizer, calls))
    assert torch.equal(first, expected) and torch.equal(second, expected) and second.dtype == torch.int64
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    second[0, 0] = -5  # a caller's copy: the cache is not touched
    assert torch.equal(cache.tokens(tokenizer, CAPTIONS, counted(tokenizer, calls)), expected)

    token_cache.clear_memory()  # a new process: only the file is left
    other_process = TokenCache(tmp_path)
    assert torch.equal(other_process.tokens(open_clip.get_tokenizer("ViT-B-16"), CAPTIONS,
                                            counted(tokenizer, calls)), expected)
    assert len(calls) == 1 and other_process.hits == 1
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_another_tokenizer_or_other_captions_miss(tmp_path, clean_memory):
    clip = open_clip.get_tokenizer("ViT-B-16")
    short = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    no_lowercasing = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")
    assert len({tokenizer_identity(clip), tokenizer_identity(short), tokenizer_identity(no_lowercasing)}) == 3
    assert tokenizer_identity(open_clip.get_tokenizer("ViT-B-16")) == tokenizer_identity(clip)
    cache = TokenCache(tmp_path)
    cache.tokens(clip, CAPTIONS, lambda: clip(CAPTIONS))
    variants = [(short, CAPTIONS), (clip, CAPTIONS[:2]), (clip, [CAPTIONS[0] + "s", *CAPTIONS[1:]]),
                (clip, CAPTIONS[::-1]), (clip, ["a red circle on a", "blue backdrop", *CAPTIONS[1:]])]
    for tokenizer, texts in variants:
        got = cache.tokens(tokenizer, texts, lambda t=tokenizer, x=texts: t(x))
        assert torch.equal(got, tokenizer(texts).long())
    assert cache.misses == 1 + len(variants) and cache.hits == 0


def test_unknown_tokenizers_are_never_cached(clean_memory):
    def tokenizer(texts):
        return torch.ones(len(texts), 5, dtype=torch.long)

    assert tokenizer_identity(tokenizer) is None
    calls: list = []
    cache = TokenCache()
    for _ in range(2):
        cache.tokens(tokenizer, CAPTIONS, lambda: calls.append(1) or tokenizer(CAPTIONS))
    assert len(calls) == 2


def test_a_damaged_cache_file_is_a_miss_and_is_written_again(tmp_path, clean_memory):
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    TokenCache(tmp_path).tokens(tokenizer, CAPTIONS, lambda: tokenizer(CAPTIONS))
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a tensor")
    token_cache.clear_memory()
    cache = TokenCache(tmp_path)
    assert torch.equal(cache.tokens(tokenizer, CAPTIONS, lambda: tokenizer(CAPTIONS)), tokenizer(CAPTIONS).long())
    assert cache.misses == 1
    assert torch.equal(torch.load(path, weights_only=True).long(), tokenizer(CAPTIONS).long())


def test_datasets_tokenise_through_the_cache_in_effect(tmp_path, clean_memory):
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with token_cache.using(TokenCache(tmp_path)) as cache:
        first = tokenize_all(tokenizer, CAPTIONS, chunk=2)
        again = tokenize_all(tokenizer, CAPTIONS, chunk=2)
    assert torch.equal(first, tokenizer(CAPTIONS).long()) and torch.equal(again, first)
    assert (cache.hits, cache.misses) == (1, 1)


# ============================================================================ the conformance check


def test_conformance_check_catches_a_backbone_write_that_checkpoints_would_miss():
    """A write through ``.data`` moves no version counter: the checkpoint would leave that weight
    out; ``check_method`` rebuilds from what a checkpoint saves and names the cause."""
    from benchmark.testing import ConformanceError, check_method
    from methods.finetune import Finetune

    class WritesThroughData(Finetune):
        """Sets a backbone weight by hand instead of by its optimizer (which leaves it out)."""
        name = "writes-through-data"

        def trainable_parameters(self):
            bias = self.backbone.model.ln_final.bias
            return [p for p in super().trainable_parameters() if p is not bias]

        def after_training_exp(self, data):
            self.backbone.model.ln_final.bias.data.add_(0.5)  # PyTorch does not count this write

    with pytest.raises(ConformanceError) as error:
        check_method(WritesThroughData)
    assert error.value.check == "state-dict" and "never through .data" in str(error.value)
    check_method(Finetune)  # the shipped method writes through its optimizer: passes
