"""A benchmark harness for continual vision-language (CLIP image-text retrieval) learning.

The public API, for writing and checking a method or a scenario of your own::

    from benchmark import Method, MethodConfig, TrainData, Prompts, register_method, check_method
    from benchmark import register_scenario

Each name is imported when first used (module ``__getattr__``), so ``import benchmark`` stays
cheap (no torch) and imports neither ``methods`` nor any other part of the harness.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import os as _os
import sys as _sys

# public name -> the module that defines it
_PUBLIC = {
    "Method": "benchmark.method",
    "MethodConfig": "benchmark.method",
    "TrainData": "benchmark.method",
    "register_method": "benchmark.method",
    "register_scenario": "benchmark.scenarios.base",
    "Prompts": "benchmark.backbone.prompts",
    "check_method": "benchmark.testing",
}
__all__ = sorted([*_PUBLIC, "__version__"])


def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, the version
    pyproject.toml declares (read as text: no TOML parser needed), else ``"0+unknown"``."""
    import importlib.metadata

    try:
        return importlib.metadata.version("clvl-benchmark")
    except importlib.metadata.PackageNotFoundError:
        pass
    import re

    pyproject = _os.path.join(_os.path.dirname(__file__), _os.pardir, "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as file:
            match = re.search(r'^version\s*=\s*"([^"]+)"', file.read(), flags=re.M)
    except OSError:
        match = None
    return match.group(1) if match else "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
    else:
        raise AttributeError(f"module 'benchmark' has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list:
    return sorted({*globals(), *__all__})


def _hide_the_repository_datasets_folder() -> None:
    """Keep the checkout's ``datasets/`` folder (data docs, no code) from passing for a package.

    Started from the repository root, the current folder is on ``sys.path`` and Python takes
    ``datasets/`` for a namespace package, so ``find_spec("datasets")`` succeeds and libraries
    such as transformers then believe Hugging Face ``datasets`` is installed and import it. When
    that folder is the *only* thing ``datasets`` would import, mark the module absent
    (``sys.modules[name] = None``: ``find_spec`` returns None, ``import datasets`` raises
    ImportError). A real ``datasets`` installation is a regular package, which Python prefers
    over namespace portions, so it is left alone.
    """
    if "datasets" in _sys.modules:
        return
    try:
        spec = _importlib_util.find_spec("datasets")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is not None or not spec.submodule_search_locations:
        return  # absent, or a real (regular) package
    ours = _os.path.normcase(_os.path.realpath(_os.path.join(_os.path.dirname(__file__), _os.pardir, "datasets")))
    portions = {_os.path.normcase(_os.path.realpath(path)) for path in spec.submodule_search_locations}
    if portions == {ours}:
        _sys.modules["datasets"] = None


_hide_the_repository_datasets_folder()
