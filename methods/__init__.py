"""Continual-learning methods and the registry that names them.

``python -m benchmark run --methods NAME[,NAME...]`` accepts, for each entry:

* a registered name (``python -m benchmark methods`` lists them),
* ``package.module:ClassName`` — any importable :class:`~methods.base.Method` subclass,
* a name published by an installed package under the entry-point group ``benchmark.methods``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import sys

from benchmark.errors import RegistryError

from .base import Method, MethodConfig, TrainData

ENTRY_POINT_GROUP = "benchmark.methods"
_REGISTRY: dict[str, type[Method]] = {}
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a subclass of methods.base.Method")
    if not _NAME_PATTERN.match(cls.name or ""):
        raise ValueError(f"{cls.__name__}.name must be lower-case letters, digits, '_' or '-', got {cls.name!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"method name {cls.name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_methods() -> dict[str, type[Method]]:
    """Registered methods (built-in first), plus those published through entry points."""
    _load_builtin()
    found = dict(_REGISTRY)
    for name in _entry_points():
        if name not in found:
            try:
                found[name] = get_method(name)
            except RegistryError:
                continue
    return found


def get_method(name: str) -> type[Method]:
    """Return the method class for a registry name, ``module:Class`` path or entry point."""
    _load_builtin()
    if ":" in name:
        return _import_method(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry = _entry_points().get(name)
    if entry is not None:
        try:
            cls = entry.load()
        except Exception as error:  # a broken third-party package must not take the CLI down
            raise RegistryError(f"entry point {name!r} ({entry.value}) cannot be loaded: {error}") from None
        _check_method_class(cls, f"entry point {name!r} ({entry.value})")
        return cls
    known = sorted(set(_REGISTRY) | set(_entry_points()))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RegistryError(f"unknown method {name!r}{hint}; known methods: {', '.join(known)}; "
                        "or give your own class as package.module:ClassName")


def _import_method(path: str) -> type[Method]:
    module_name, _, class_name = path.partition(":")
    # Like `python -m`, resolve modules from the working directory too (the console script
    # does not put it on sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RegistryError(f"cannot import module {module_name!r} for method {path!r}: {error}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RegistryError(f"module {module_name!r} has no class {class_name!r} (from method {path!r})")
    _check_method_class(cls, path)
    return cls


def _check_method_class(cls, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RegistryError(f"{origin} is not a subclass of methods.base.Method")
    if not cls.name:
        raise RegistryError(f"{origin} has no `name` class attribute")


def _load_builtin() -> None:
    # Importing the modules runs their @register_method decorators.
    from . import coda, dualprompt, finetune, l2p, lora, lpi, sprompts, zeroshot  # noqa: F401


__all__ = ["Method", "MethodConfig", "TrainData", "available_methods", "get_method", "register_method",
           "ENTRY_POINT_GROUP"]
