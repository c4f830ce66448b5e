"""The README's promises: its two commands, and its "Add your own method" example."""

import importlib.util
import re
from pathlib import Path

from benchmark.testing import check_method

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_example_in_readme_is_the_example_file():
    """The code a reader copies from the README is exactly examples/my_method.py."""
    block = re.search(r"```python\n(.*?)```", _section("Add your own method"), re.S).group(1)
    assert block == (ROOT / "examples" / "my_method.py").read_text(encoding="utf-8")


def test_readme_example_passes_the_conformance_check(tmp_path):
    """Load the class from the README's own code block and run the conformance kit on it."""
    block = re.search(r"```python\n(.*?)```", _section("Add your own method"), re.S).group(1)
    module_file = tmp_path / "readme_method.py"
    module_file.write_text(block, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("readme_method", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = check_method(module.TextPromptTuning)
    assert "training" in report.checks and "frozen-backbone" in report.checks


def test_ci_runs_the_readme_test_command():
    """.ci/run must run the test command the README gives a new user."""
    commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", _section("Fresh machine: two commands"))
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "python -m benchmark run --methods zeroshot,finetune --scenario synthetic" in demo
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # CI adds -q to pip only; the command is otherwise the README's.
    assert tests.replace("pip install -e", "pip install -q -e") in ci


def _contract_notes() -> str:
    section = _section("Add your own method")
    return section[section.index("What the contract expects"):section.index("The contract (")]


def test_readme_quotes_the_conformance_kits_real_messages():
    """Each 'Broken:' message the README quotes is what the kit / registry really says."""
    import pytest

    from benchmark.method import get_method
    from benchmark.registry import BrokenEntry

    notes = " ".join(_contract_notes().split())
    example = importlib.util.spec_from_file_location("readme_example", ROOT / "examples" / "my_method.py")
    module = importlib.util.module_from_spec(example)
    example.loader.exec_module(module)

    class Unnormalised(module.TextPromptTuning):
        name = "unnormalised"

        def encode_texts(self, tokens, task_ids=None):
            return 3.0 * super().encode_texts(tokens, task_ids)

    with pytest.raises(AssertionError) as raised:
        check_method(Unnormalised)
    assert "are not L2-normalised" in str(raised.value) and "return F.normalize(x, dim=-1)" in str(raised.value)
    assert "are not L2-normalised: row norms lie in [a, b]; return F.normalize(x, dim=-1)" in notes

    class MiscountedParameters(module.TextPromptTuning):
        name = "miscounted"

        def parameter_counts(self):
            counts = super().parameter_counts()
            return {**counts, "added": counts["added"] + 1, "total": counts["total"] + 1}

    with pytest.raises(AssertionError) as raised:
        check_method(MiscountedParameters)
    assert "parameter_counts() disagrees with the live module" in str(raised.value)
    assert "count from self.parameters()" in str(raised.value)
    assert "parameter_counts() disagrees with the live module (...); count from self.parameters()" in notes

    with pytest.raises(BrokenEntry) as raised:
        get_method("no_such_package_for_the_readme.mymod:MyMethod")
    message = str(raised.value)
    assert "cannot import module 'no_such_package_for_the_readme.mymod' for method" in message
    assert "a `module:Class` path must be importable" in message and "add that folder to PYTHONPATH" in message
    assert "module:Class path must be importable ... or add that folder to PYTHONPATH" in notes


def test_readme_names_the_backbone_attributes_that_exist():
    """The sizes the README tells a method author to use are real ClipBackbone attributes."""
    from benchmark.backbone import ClipBackbone

    for name in ("embed_dim", "vision_width", "text_width", "vision_blocks", "text_blocks", "context_length",
                 "image_size"):
        assert f"`{name}`" in _contract_notes(), name
        assert isinstance(getattr(ClipBackbone, name), property), name


def test_readme_times_name_their_machine_and_the_script_that_remeasures_them(monkeypatch):
    import pytest

    demo = _section("Fresh machine: two commands")
    assert "90 s" in demo and "2-core x86_64" in demo and "scripts/time_readme.py" in demo
    spec = importlib.util.spec_from_file_location("time_readme", ROOT / "scripts" / "time_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    facts = module.machine()
    assert facts["cores"] >= 1 and facts["cpu"] and facts["torch"]
    # The script runs exactly the README's demo command (and the grid the Methods section gives).
    assert "python -m benchmark run " + " ".join(module.DEMO) in demo
    assert "--methods " + module.GRID[1] in _section("Methods")
    # A failing command ends the script with one error line, not a traceback.

    class Done:
        returncode, stderr = 2, "Traceback...\nerror: unknown scenario 'x'\n"

    monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(SystemExit) as stopped:
        module.timed_run(["--scenario", "x"], ROOT / "unused", ROOT / "unused")
    assert str(stopped.value).endswith("exited 2: error: unknown scenario 'x'")
