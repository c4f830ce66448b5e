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
