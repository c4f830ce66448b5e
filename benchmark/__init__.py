"""A benchmark harness for continual vision-language (CLIP image-text retrieval) learning."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


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
