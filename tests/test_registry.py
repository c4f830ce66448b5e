"""benchmark.registry (one Registry, one did-you-mean) and the public API of ``import benchmark``."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.errors import RegistryError
from benchmark.registry import BrokenEntry, Registry, UnknownName, did_you_mean

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- did_you_mean
def test_did_you_mean_suggests_the_closest_names_or_nothing():
    assert did_you_mean("finetun", ["zeroshot", "finetune"]) == " (did you mean 'finetune'?)"
    assert did_you_mean("zzzz", ["zeroshot", "finetune"]) == ""
    assert did_you_mean("epoch", ["epochs", "seeds"], prefix="training.") == " (did you mean training.'epochs'?)"
    two = did_you_mean("clvl-tinny", ["clvl-tiny", "clvl-tiny2", "ViT-B-16"], n=2)
    assert two == " (did you mean 'clvl-tiny', 'clvl-tiny2'?)"


# --------------------------------------------------------------------------------- Registry
@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for throw-away modules; they are dropped from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("regtest_"):
            del sys.modules[name]


def test_lazy_entries_are_imported_on_first_use_only(module_dir):
    (module_dir / "regtest_lazy.py").write_text("THING = {'made': True}\n")
    registry = Registry("thing")
    registry.add_lazy("thing", "regtest_lazy:THING")
    assert "thing" in registry and registry.names() == ["thing"]
    assert "regtest_lazy" not in sys.modules  # listing names imports nothing
    assert registry.get("thing") == {"made": True}
    assert "regtest_lazy" in sys.modules
    assert registry.get("thing") is registry["thing"]


def test_unknown_names_list_the_known_ones_with_a_suggestion():
    registry = Registry("widget", advice="; or write one")
    registry.register("gear", object())
    registry.add_lazy("sprocket", "nowhere:X")
    with pytest.raises(UnknownName) as error:
        registry.get("gaer")
    assert str(error.value) == "unknown widget 'gaer' (did you mean 'gear'?); known widgets: gear, sprocket; or write one"
    assert isinstance(error.value, RegistryError)


def test_broken_entries_are_one_line_errors(module_dir):
    (module_dir / "regtest_broken.py").write_text("VALUE = 3\n")

    def check(obj, origin):
        if not isinstance(obj, str):
            raise BrokenEntry(f"{origin} is not a string")

    registry = Registry("word", check=check)
    registry.add_lazy("missing-module", "regtest_no_such_module:X")
    registry.add_lazy("missing-object", "regtest_broken:NOPE")
    registry.add_lazy("wrong-kind", "regtest_broken:VALUE")
    for name, fragment in (("missing-module", "cannot import module 'regtest_no_such_module'"),
                           ("missing-object", "has no class 'NOPE'"), ("wrong-kind", "is not a string")):
        with pytest.raises(BrokenEntry) as error:
            registry.get(name)
        assert fragment in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(TypeError, match="is not a string"):
        registry.register("number", 3)


def test_register_refuses_another_object_under_a_taken_name(module_dir):
    (module_dir / "regtest_owner.py").write_text("class Owner:\n    pass\n")
    registry = Registry("kind")
    registry.add_lazy("owner", "regtest_owner:Owner")

    class Intruder:
        pass

    with pytest.raises(ValueError, match="kind name 'owner' is already taken by regtest_owner.Owner"):
        registry.register("owner", Intruder)
    import regtest_owner

    assert registry.register("owner", regtest_owner.Owner) is regtest_owner.Owner  # the same object: fine
    registry["owner"] = Intruder  # item assignment replaces
    assert registry.get("owner") is Intruder


def test_entry_points_are_found_after_code_entries_and_broken_ones_are_skipped(monkeypatch, module_dir):
    (module_dir / "regtest_published.py").write_text("GOOD = 'good'\n")
    points = [importlib.metadata.EntryPoint("good", "regtest_published:GOOD", "regtest.group"),
              importlib.metadata.EntryPoint("bad", "regtest_published:MISSING", "regtest.group")]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: points if kw.get("group") == "regtest.group" else real(**kw))
    registry = Registry("item", group="regtest.group")
    registry.register("local", "local")
    assert registry.names() == ["bad", "good", "local"]
    assert registry.get("good") == "good"
    with pytest.raises(BrokenEntry, match="entry point 'bad'"):
        registry.get("bad")
    assert registry.available() == {"local": "local", "good": "good"}


def test_copy_is_independent():
    registry = Registry("thing")
    registry.register("a", 1)
    copy = registry.copy()
    copy.register("b", 2)
    assert registry.names() == ["a"] and copy.names() == ["a", "b"]


# --------------------------------------------------------------------------------- the public API
def _fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter (from the repository root) and return the JSON it prints."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_benchmark_imports_neither_methods_nor_torch():
    seen = _fresh_python(
        "import json, sys, benchmark, benchmark.config, benchmark.registry\n"
        "benchmark.config.build_config(None, None, ['training.epochs=1'])\n"
        "after_config = sorted(m for m in ('methods', 'torch') if m in sys.modules)\n"
        "benchmark.Method\n"
        "print(json.dumps({'after_config': after_config, 'after_method': 'methods' in sys.modules}))")
    assert seen == {"after_config": [], "after_method": False}


def test_every_public_name_resolves_to_its_definition():
    import benchmark
    from benchmark import backbone, method, testing
    from benchmark.scenarios import base

    expected = {"Method": method.Method, "MethodConfig": method.MethodConfig, "TrainData": method.TrainData,
                "register_method": method.register_method, "register_scenario": base.register_scenario,
                "Prompts": backbone.Prompts, "check_method": testing.check_method}
    assert set(benchmark.__all__) == {*expected, "__version__"}
    for name, obj in expected.items():
        assert getattr(benchmark, name) is obj, name
    assert set(benchmark.__all__) <= set(dir(benchmark))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        benchmark.Nope  # noqa: B018


def test_version_is_the_distribution_version_or_the_checkout_version():
    import re

    import benchmark

    try:
        expected = importlib.metadata.version("clvl-benchmark")
    except importlib.metadata.PackageNotFoundError:
        expected = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert benchmark.__version__ == expected


def test_old_import_paths_still_work():
    import benchmark
    import methods
    from benchmark import config, evaluation
    from methods import base

    assert (base.Method, base.MethodConfig, base.TrainData) == (benchmark.Method, benchmark.MethodConfig,
                                                               benchmark.TrainData)
    assert methods.register_method is benchmark.register_method and methods.Method is benchmark.Method
    assert config.ProtocolConfig is config.Protocol is evaluation.Protocol


def test_train_data_names_its_batch_size_for_what_it_is():
    """TrainData.encode_batch_size is the batch for a method's own passes; the old name still reads, with a warning."""
    import warnings

    import torch

    from benchmark import TrainData

    data = TrainData(task_id=0, task_name="t", dataset=None, encode_batch_size=16, device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert data.batch_size == 16
    assert [w.category for w in caught] == [DeprecationWarning] and "encode_batch_size" in str(caught[0].message)
