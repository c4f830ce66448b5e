"""The method registry, the conformance check (benchmark.testing) and the built-in methods."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` lives at the repository root, outside the installed packages
    sys.path.insert(0, str(ROOT))

from benchmark import method as method_module  # noqa: E402
from benchmark.errors import RegistryError  # noqa: E402
from benchmark.testing import CHECKS, ConformanceError, check_method, tiny_setup  # noqa: E402
from examples.my_method import TextPromptConfig, TextPromptTuning  # noqa: E402
from methods import ENTRY_POINT_GROUP, available_methods, get_method, register_method  # noqa: E402
from methods.base import Method, MethodConfig  # noqa: E402
from methods.finetune import Finetune, FinetuneConfig  # noqa: E402
from methods.zeroshot import ZeroShot  # noqa: E402

EXAMPLE = "examples.my_method:TextPromptTuning"


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry, restored after the test (register_method looks it up at call time)."""
    monkeypatch.setattr(method_module, "METHODS", method_module.METHODS.copy())


@pytest.fixture
def published(monkeypatch):
    """Publish entry points in the ``benchmark.methods`` group: ``published({"name": "module:Class"})``."""
    real = importlib.metadata.entry_points

    def publish(mapping: dict[str, str]):
        points = [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in mapping.items()]

        def entry_points(**kwargs):
            return points if kwargs.get("group") == ENTRY_POINT_GROUP else real(**kwargs)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return publish


# --------------------------------------------------------------------------------- registry
def test_example_is_imported_from_this_repository():
    import examples

    assert Path(examples.__file__).resolve().parent == ROOT / "examples", (
        "`examples` resolved to another package (avalanche-lib ships one); examples/__init__.py must exist")


def test_builtin_methods_are_registered():
    found = available_methods()
    assert found["zeroshot"] is ZeroShot and found["finetune"] is Finetune
    assert get_method("zeroshot") is ZeroShot and get_method("finetune") is Finetune


def test_unknown_name_lists_known_methods_and_suggests_a_close_one():
    with pytest.raises(RegistryError) as error:
        get_method("nope")
    assert "'nope'" in str(error.value) and "zeroshot" in str(error.value) and "finetune" in str(error.value)
    assert "did you mean" not in str(error.value)
    with pytest.raises(RegistryError, match=r"did you mean 'finetune'\?"):
        get_method("finetun")


def test_module_class_path_loads_the_example_without_registering_it():
    assert get_method(EXAMPLE) is TextPromptTuning
    assert TextPromptTuning.name == "textprompt"
    assert "textprompt" not in available_methods()  # loadable by path; not in the built-in registry


@pytest.mark.parametrize("path, message", [
    ("no_such_module_for_tests:Thing", "cannot import module 'no_such_module_for_tests'"),
    ("examples.my_method:NoSuchClass", "has no class 'NoSuchClass'"),
    ("examples.my_method:TextPromptConfig", "not a subclass of benchmark.Method"),
    ("methods.base:Method", "has no `name`"),
], ids=["bad-module", "missing-class", "not-a-method", "no-name"])
def test_bad_module_class_paths_raise_registry_errors(path, message):
    with pytest.raises(RegistryError, match=re.escape(message)):
        get_method(path)


def test_entry_points_publish_methods(published):
    published({"textprompt": EXAMPLE})
    assert get_method("textprompt") is TextPromptTuning
    assert available_methods()["textprompt"] is TextPromptTuning
    assert {"finetune", "zeroshot"} <= set(available_methods())  # built-ins still there
    with pytest.raises(RegistryError, match=r"did you mean 'textprompt'\?"):
        get_method("textprompts")


def test_entry_point_to_a_non_method_is_rejected_and_skipped(published):
    published({"not-a-method": "examples.my_method:TextPromptConfig"})
    with pytest.raises(RegistryError, match="entry point 'not-a-method'"):
        get_method("not-a-method")
    assert "not-a-method" not in available_methods()


def test_register_method_rejects_bad_names_duplicates_and_non_methods(private_registry):
    for bad in ("", "Upper", "has space", "1starts-with-digit", "dot.ted"):
        cls = type("Bad", (Method,), {"name": bad})
        with pytest.raises(ValueError, match="name must be lower-case"):
            register_method(cls)
    with pytest.raises(TypeError, match="not a subclass"):
        register_method(TextPromptConfig)
    clash = type("OtherFinetune", (Method,), {"name": "finetune"})
    with pytest.raises(ValueError, match="already taken by methods.finetune.Finetune"):
        register_method(clash)
    assert get_method("finetune") is Finetune

    fresh = type("Fresh", (Method,), {"name": "fresh-method_1"})
    assert register_method(fresh) is fresh
    assert register_method(fresh) is fresh  # registering the same class again is harmless
    assert get_method("fresh-method_1") is fresh and "fresh-method_1" in available_methods()


def test_builtin_entries_name_their_own_classes():
    """Each lazy built-in entry imports a class whose ``name`` is the entry's name."""
    assert set(method_module.BUILTIN_METHODS) <= set(available_methods())
    for name, path in method_module.BUILTIN_METHODS.items():
        module, _, qualname = path.partition(":")
        cls = get_method(name)
        assert (cls.name, cls.__module__, cls.__qualname__) == (name, module, qualname)


def test_every_builtin_config_field_has_help():
    import dataclasses

    for name, cls in available_methods().items():
        for item in dataclasses.fields(cls.Config):
            text = item.metadata.get("help", "")
            assert text.strip() and "\n" not in text, f"{name}.{item.name} has no one-line help"


@pytest.mark.parametrize("name, params, message", [
    ("l2p", {"top_k": 99}, "top_k must be between 1 and pool_size (10), got 99"),
    ("l2p", {"pull_weight": -1.0}, "pull_weight must be >= 0"),
    ("finetune", {"trainable": ["wheels"]}, "unknown part(s) ['wheels']"),
    ("finetune", {"replay_memory": -1}, "replay_memory must be >= 0"),
    ("coda", {"prompt_length": 3}, "prompt_length must be even"),
    ("dualprompt", {"e_length": 0}, "g_length and e_length must be >= 1"),
    ("sprompts", {"optimizer": "rmsprop"}, "sprompts.optimizer must be one of"),
    ("lora", {"rank": 0}, "rank must be >= 1"),
    ("lora", {"targets": ["qkv"]}, "lora.targets"),
    ("lpi", {"depth": 10}, "lpi.depth (10) exceeds num_layers (9)"),
    ("lpi_released", {"k": 0}, "lpi_released.k must be a positive integer"),
    ("lpi", {"depth": 1}, "set interaction=false for depth=1"),
])
def test_config_values_fail_when_the_config_is_built(name, params, message):
    """Checks that need only the config run in its __post_init__: no backbone is built."""
    with pytest.raises(ValueError) as error:
        get_method(name).Config(**params)
    assert message in str(error.value)


# --------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("cls, config", [
    (ZeroShot, None),
    (Finetune, None),
    (Finetune, FinetuneConfig(trainable=["visual"])),
    (TextPromptTuning, None),
], ids=["zeroshot", "finetune", "finetune-visual", "example-textprompt"])
def test_check_method_passes(cls, config):
    report = check_method(cls, config)
    expected = [c for c in CHECKS if cls.trains or c != "training"]
    assert report.checks == expected
    assert report.method == cls.name
    counts = report.parameter_counts
    assert counts["total"] >= counts["trainable"] >= 0 and counts["backbone"] > 0
    assert set(report.final_recall_at_1) == {"i2t", "t2i"}
    if cls.trains:
        assert report.losses and all(torch.isfinite(torch.tensor(report.losses)))
    if cls is TextPromptTuning:  # P=4 tokens of the text width: all it adds and all it trains
        assert counts["added"] == counts["trainable"] == 4 * 64
    if config is not None:  # visual tower only
        assert 0 < counts["trainable"] < counts["backbone"]


def test_finetune_visual_leaves_the_text_tower_bit_identical():
    setup = tiny_setup(Finetune, FinetuneConfig(trainable=["visual"]))
    model = setup.backbone.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    strategy = setup.make_strategy()
    for experience in setup.streams.train_stream:
        strategy.train(experience)
    visual = [n for n in before if n.startswith("visual.")]
    rest = [n for n in before if not n.startswith("visual.")]
    assert visual and rest and "token_embedding.weight" in rest and "logit_scale" in rest
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert not changed & set(rest), f"frozen text-tower parameters changed: {sorted(changed & set(rest))}"
    assert "visual.conv1.weight" in changed and "visual.proj" in changed


# Deliberately broken methods: each must fail exactly the check that names its fault.
class WritesFrozenWeight(TextPromptTuning):
    name = "writes-frozen"

    def after_training_exp(self, data):
        with torch.no_grad():
            self.backbone.model.ln_final.weight.mul_(1.5)  # frozen, yet changed in place


class Unnormalised(ZeroShot):
    name = "unnormalised"

    def encode_images(self, images, task_ids=None):
        return self.backbone.encode_image(images, normalize=False)


@dataclass(kw_only=True)
class NoDefaultConfig(MethodConfig):
    rank: int  # no default


class ConfigWithoutDefault(ZeroShot):
    name = "no-default"
    Config = NoDefaultConfig


class PlainAttributeState(TextPromptTuning):
    """Learns a count in a plain attribute: lost by state_dict()."""

    name = "plain-attribute"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        self.tasks_done = 0

    def after_training_exp(self, data):
        self.tasks_done += 1

    def encode_texts(self, tokens, task_ids=None):
        from benchmark.backbone import Prompts

        return self.backbone.encode_text(tokens, Prompts(tokens=self.prompt * (1 + self.tasks_done)))


class Nondeterministic(ZeroShot):
    name = "nondeterministic"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        self.noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))

    def encode_images(self, images, task_ids=None):
        features = super().encode_images(images, task_ids)
        noise = torch.randn(features.shape, generator=self.noise)
        return nn.functional.normalize(features + 0.1 * noise, dim=-1)


class DeadGradient(TextPromptTuning):
    name = "dead-gradient"

    def encode_texts(self, tokens, task_ids=None):
        from benchmark.backbone import Prompts

        return self.backbone.encode_text(tokens, Prompts(tokens=self.prompt * 0.0))


class UnreachableParameter(TextPromptTuning):
    name = "unreachable"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        self.hidden = [nn.Parameter(torch.zeros(3))]  # a plain list: the module does not see it

    def trainable_parameters(self):
        return [self.prompt, *self.hidden]


class MiscountedParameters(ZeroShot):
    name = "miscounted"

    def parameter_counts(self):
        counts = super().parameter_counts()
        return {**counts, "total": counts["total"] - 1}


BROKEN = [
    (WritesFrozenWeight, "frozen-backbone", "backbone parameter model.ln_final.weight was frozen"),
    (Unnormalised, "features", "encode_images(..., task_ids=None) are not L2-normalised"),
    (ConfigWithoutDefault, "class-contract", "field(s) rank have no default"),
    (PlainAttributeState, "state-dict", "does not reproduce the trained model"),
    (Nondeterministic, "determinism", "two runs with seed 0"),
    (DeadGradient, "training", "no trainable parameter received a non-zero gradient"),
    (UnreachableParameter, "training", "not reachable from the module"),
    (MiscountedParameters, "parameter-counts", "total: reported"),
]


@pytest.mark.parametrize("cls, check, message", BROKEN, ids=[cls.__name__ for cls, _, _ in BROKEN])
def test_check_method_names_the_broken_property(cls, check, message):
    with pytest.raises(AssertionError) as error:
        check_method(cls)
    assert isinstance(error.value, ConformanceError) and error.value.check == check, str(error.value)
    assert f"conformance check {check!r} failed" in str(error.value)
    assert message in str(error.value)


def test_check_method_rejects_a_config_of_another_class():
    with pytest.raises(ConformanceError, match="not .*TextPromptTuning.Config"):
        check_method(TextPromptTuning, FinetuneConfig())


# --------------------------------------------------------------------------------- replay
class TaskLabelRecorder(SupervisedPlugin):
    """Task labels of every training mini-batch, per experience."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, set[int]] = {}

    def after_training_iteration(self, strategy, **kwargs):
        task = int(strategy.experience.current_experience)
        self.seen.setdefault(task, set()).update(strategy.mb_task_id.tolist())


@pytest.mark.parametrize("memory", [0, 16])
def test_finetune_replay_mixes_earlier_tasks_into_batches(memory):
    setup = tiny_setup(Finetune, FinetuneConfig(trainable=["visual"], replay_memory=memory))
    assert len(setup.method.plugins()) == (1 if memory else 0)
    recorder = TaskLabelRecorder()
    strategy = setup.make_strategy(plugins=[recorder])
    for experience in setup.streams.train_stream:
        strategy.train(experience)
    assert recorder.seen[0] == {0}
    if memory:
        assert recorder.seen[1] == {0, 1}, "replay never put a task-0 pair into a task-1 batch"
    else:
        assert recorder.seen[1] == {1}, "task-0 pairs reached task-1 batches without replay"


# --------------------------------------------------------------------------------- one name per method
def test_a_method_is_called_by_its_class_name_however_it_is_selected(published):
    """Registered name, entry-point name or module:Class path: method_params end up under `cls.name`."""
    from benchmark.method import select_methods

    published({"my_method": EXAMPLE})
    for selector in (EXAMPLE, "my_method"):
        for key in (selector, "textprompt"):
            classes, params = select_methods(["zeroshot", selector], {key: {"num_tokens": 8}})
            assert classes == {"zeroshot": ZeroShot, selector: TextPromptTuning}
            assert params == {"textprompt": {"num_tokens": 8}}


def test_two_selected_methods_of_one_name_are_refused(tmp_path, monkeypatch):
    from benchmark.errors import ConfigError
    from benchmark.method import select_methods

    (tmp_path / "clash_methods.py").write_text(
        "from examples.my_method import TextPromptTuning\n\n\nclass Other(TextPromptTuning):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"both named 'textprompt'.*another `name`"):
        select_methods([EXAMPLE, "clash_methods:Other"])
    with pytest.raises(ConfigError, match="'finetune' is selected twice"):
        select_methods(["finetune", "methods.finetune:Finetune"])
