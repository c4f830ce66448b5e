"""What an installed wheel contains: package data, and the files the code reads at run time."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES = ("benchmark", "methods")


def _package_of(folder: Path) -> tuple[str, Path]:
    """The innermost regular package holding ``folder`` (dotted name, its directory)."""
    while not (folder / "__init__.py").is_file():
        folder = folder.parent
    return ".".join(folder.relative_to(ROOT).parts), folder


def data_files() -> list[Path]:
    """Every non-Python file under the shipped packages (what a wheel must carry besides code)."""
    return sorted(path for name in PACKAGES for path in (ROOT / name).rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".py", ".pyc"))


def test_the_packages_have_data_files_to_ship():
    names = {path.relative_to(ROOT).as_posix() for path in data_files()}
    assert {"benchmark/backbone/configs/clvl-tiny.json", "methods/lpi/data/coco_supercat_task_similarity.csv"} <= names


def test_package_data_covers_every_non_python_file():
    """setuptools only puts non-.py files in a wheel when [tool.setuptools.package-data] names them."""
    declared = PYPROJECT.get("tool", {}).get("setuptools", {}).get("package-data", {})
    missing = []
    for path in data_files():
        package, folder = _package_of(path.parent)
        patterns = declared.get(package, []) + declared.get("*", [])
        if not any(path in set(folder.glob(pattern)) for pattern in patterns):
            missing.append(f"{path.relative_to(ROOT).as_posix()} (package {package})")
    assert missing == []


def test_run_time_files_are_read_from_inside_the_packages():
    """Nothing the code reads may live outside benchmark/ or methods/ (it would not be installed)."""
    from benchmark.backbone.resolve import CONFIG_DIR
    from methods.lpi.similarity import SHIPPED_CSV

    backbone = resources.files("benchmark.backbone")
    lpi = resources.files("methods.lpi")
    assert Path(CONFIG_DIR) == Path(os.fspath(backbone.joinpath("configs")))
    assert (Path(CONFIG_DIR) / "clvl-tiny.json").is_file()
    assert Path(os.fspath(SHIPPED_CSV)).parent.parent == Path(os.fspath(lpi))
    assert SHIPPED_CSV.is_file()


def test_the_shipped_similarity_matrix_is_the_one_in_datasets():
    """datasets/ keeps a copy for readers of the repository; it must not drift from the package data."""
    from methods.lpi.similarity import SHIPPED_CSV

    assert (ROOT / "datasets" / "coco_supercat_task_similarity.csv").read_bytes() == SHIPPED_CSV.read_bytes()


def _can_build_wheels() -> bool:
    """Building without isolation needs a setuptools with bdist_wheel (>= 70.1) or the wheel package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return major >= 68


@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools>=70.1 (or wheel) to build without isolation; "
                                                    ".ci/run builds and tests the real wheel")
def test_built_wheel_carries_the_data_and_works_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, unpack it elsewhere and use it from there."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = {path.relative_to(ROOT).as_posix() for path in data_files()}
        assert expected <= names
        site = tmp_path / "site"
        archive.extractall(site)
    # From a folder outside the checkout, with only the unpacked wheel providing the harness.
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import benchmark, methods.lpi.similarity as s; from benchmark.backbone.resolve import load_backbone;"
            "print(benchmark.__file__); print(len(s.read_similarity_csv(s.SHIPPED_CSV)));"
            "print(type(load_backbone('clvl-tiny', cache_dir='cache')).__name__)")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    where, rows, backbone = result.stdout.split()[-3:]
    assert Path(where).is_relative_to(site)
    assert (rows, backbone) == ("12", "ClipBackbone")


# ------------------------------------------------ the top-level datasets/ folder is not a package
def _python_at_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` the way a user does from the repository root (the root first on sys.path)."""
    path = [str(extra_path)] if extra_path else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(path + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_datasets_folder_is_not_taken_for_hugging_face_datasets():
    """From the root, datasets/ used to import as a namespace package: transformers then reported
    Hugging Face ``datasets`` as available and code importing it broke."""
    assert not (ROOT / "datasets" / "__init__.py").exists()
    code = ("import importlib.util, sys; import benchmark; import transformers.utils as u;"
            "print(sys.path[0] in ('', '.') or sys.path[0]);"
            "print(importlib.util.find_spec('datasets'), u.is_datasets_available());"
            "exec('try:\\n import datasets\\n print(\"imported\", datasets)\\nexcept ImportError:\\n print(\"ImportError\")')")
    result = _python_at_root(code)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines[0] in ("True", str(ROOT)), "the root must be on sys.path for this test to mean anything"
    assert lines[1:3] == ["None False", "ImportError"]


def test_a_real_datasets_package_still_imports_from_the_root(tmp_path):
    """A regular ``datasets`` package (as Hugging Face's is) must win over the folder, untouched."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'regular package'\n", encoding="utf-8")
    result = _python_at_root("import benchmark, datasets; print(datasets.WHO); print(datasets.__file__)",
                             extra_path=tmp_path / "site")
    assert result.returncode == 0, result.stderr[-2000:]
    who, where = result.stdout.strip().split("\n")
    assert who == "regular package" and Path(where) == fake / "__init__.py"


# ------------------------------------------------------ declared dependencies are what is imported
# Declared without being imported, each for a stated reason (everything else must be imported).
USED_WITHOUT_IMPORT = {"tabulate": "pandas.DataFrame.to_markdown needs it for the Markdown tables",
                       "tensorboard": "torch.utils.tensorboard (the tensorboard logger) needs it"}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements(strings) -> dict:
    from packaging.requirements import Requirement

    requirements = [Requirement(text) for text in strings]
    return {_normalise(req.name): req for req in requirements}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level names of every absolute import in the shipped code, stdlib and own packages
    excluded (imports inside functions and try/except ImportError count too) -> files."""
    import ast

    found: dict[str, set[str]] = {}
    for name in PACKAGES:
        for path in sorted((ROOT / name).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                        found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_import_is_a_declared_dependency_and_every_dependency_is_used():
    import importlib.metadata

    declared = _requirements(PYPROJECT["project"]["dependencies"])
    # An optional extra's package (ray, for --launcher ray) may be imported too: lazily, where the
    # feature runs (tests/test_launch.py checks that for ray).
    extras = _requirements(sum((reqs for name, reqs in PYPROJECT["project"].get("optional-dependencies", {}).items()
                                if name != "dev"), []))
    providers = importlib.metadata.packages_distributions()  # import name -> installed distributions
    imported = set()
    undeclared = []
    for module, files in sorted(third_party_imports().items()):
        dists = {_normalise(dist) for dist in providers.get(module, [])}
        assert dists, f"{module} (imported in {sorted(files)}) is not installed, so its distribution is unknown"
        if not dists & (set(declared) | set(extras)):
            undeclared.append(f"{module} ({'/'.join(sorted(dists))}) imported in {sorted(files)}")
        imported |= dists
    assert undeclared == [], "imported but not in [project].dependencies"
    unused = sorted(set(declared) - imported - set(USED_WITHOUT_IMPORT))
    assert unused == [], "declared in [project].dependencies but never imported"


def test_the_import_scan_sees_guarded_and_local_imports():
    """scipy is imported inside a function under try/except ImportError: the scan must see it."""
    assert "benchmark/stats.py" in third_party_imports()["scipy"]
    assert "methods/lora.py" in third_party_imports()["peft"]


def test_peft_is_bounded_because_its_internals_are_used():
    from packaging.version import Version

    peft = _requirements(PYPROJECT["project"]["dependencies"])["peft"]
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in peft.specifier), str(peft)
    assert Version("0.21.2") in peft.specifier  # the version CI tests
    # Releases before 0.18 lack PeftModel.set_requires_grad, which methods/lora.py calls.
    assert "set_requires_grad" in (ROOT / "methods" / "lora.py").read_text(encoding="utf-8")
    assert Version("0.17.1") not in peft.specifier


def test_constraints_pin_every_dependency_within_its_range():
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_normalise(name)] = Version(version)
    project = PYPROJECT["project"]
    wanted = _requirements(project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), []))
    problems = [f"{name}: {pins.get(name, 'not pinned')} vs {req.specifier}" for name, req in sorted(wanted.items())
                if name not in pins or pins[name] not in req.specifier]
    assert problems == []


def test_ci_checks_the_wheel_before_the_tests():
    """.ci/run builds the wheel, installs it into a fresh venv and runs the README's main job from
    outside the checkout; pytest stays the last command (its summary line closes the log)."""
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert "set -euo pipefail" in lines[0:2]
    assert lines[-1].endswith("python -m pytest")
    build, install = text.index("pip\" wheel"), text.index(".whl -c constraints.txt")
    run = text.index("-m benchmark run --methods zeroshot,finetune --scenario synthetic")
    assert build < install < run < text.index("test -s results/tables/synthetic/results.md") < len(text) - len(lines[-1])


def test_missing_shipped_configs_are_reported_as_a_broken_install(tmp_path, monkeypatch):
    """Without its package data the harness used to say 'unknown backbone architecture clvl-tiny'."""
    from benchmark.backbone import resolve
    from benchmark.errors import BenchmarkError

    monkeypatch.setattr(resolve, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(resolve, "_configs_registered", False)
    with pytest.raises(BenchmarkError, match="broken install") as error:
        resolve.load_backbone("clvl-tiny", cache_dir=tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
