"""Name → object registries (methods, scenarios, weight recipes) and the one "did you mean" helper.

A :class:`Registry` finds an object by name in three places, in this order: entries added in
code (:meth:`Registry.register`, or :meth:`Registry.add_lazy` with a ``"module:Object"`` path
that is imported only when the name is first asked for), then packages that publish the name
under the registry's entry-point group. A registry that accepts paths also resolves a
``"module:Object"`` path given instead of a name. Unknown names and entries that cannot be
loaded raise one-line :class:`UnknownName` / :class:`BrokenEntry` errors (both
:class:`~benchmark.errors.RegistryError`, so the command line prints them and exits 2).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
from typing import Any, Callable, Iterable, Iterator

from .errors import RegistryError


class UnknownName(RegistryError):
    """No entry of that name (the message lists the known ones and suggests a close one)."""


class BrokenEntry(RegistryError):
    """An entry exists but cannot be loaded, or does not hold what the registry expects."""


def did_you_mean(name: str, known: Iterable[str], *, n: int = 1, prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` naming up to ``n`` close matches of ``name`` in ``known``, or ``""``.

    ``prefix`` goes before each suggestion (a config section, e.g. ``"training."``)."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=n)
    if not close:
        return ""
    return f" (did you mean {', '.join(f'{prefix}{c!r}' for c in close)}?)"


def import_object(path: str, what: str = "") -> Any:
    """The object a ``"package.module:Name"`` path names; :class:`BrokenEntry` when it cannot be had.

    ``what`` says what the path was for, in messages (e.g. ``"method 'pkg.mod:Cls'"``)."""
    what = what or repr(path)
    module_name, _, attribute = path.partition(":")
    # Like `python -m`, resolve modules from the working directory too (a console script does
    # not put it on sys.path), so a user's own module next to their config is found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        hint = ""
        if error.name and module_name.split(".")[0] == error.name.split(".")[0]:
            # The user's own package is not on the path: say where Python looked and how to add it.
            hint = (f"; a `module:Class` path must be importable: run from the folder that holds "
                    f"{module_name.split('.')[0]!r}, install its package, or add that folder to PYTHONPATH")
        raise BrokenEntry(f"cannot import module {module_name!r} for {what}: {error}{hint}") from None
    except ImportError as error:
        raise BrokenEntry(f"cannot import module {module_name!r} for {what}: {error}") from None
    obj = module
    for part in attribute.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise BrokenEntry(f"module {module_name!r} has no class {attribute!r} (from {what})")
    return obj


def _path_of(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else None


def _taken_by(obj: Any) -> str:
    path = _path_of(obj)
    return f" by {path.replace(':', '.')}" if path else ""


class Registry:
    """Objects of one kind by name.

    Args:
        kind: what an entry is, for messages ("method").
        group: the entry-point group that installed packages publish names under (None: none).
        check: ``check(obj, origin)`` raises :class:`BrokenEntry` when ``obj`` is not of this kind
            (``origin`` names where it came from, for the message); run on everything loaded
            from a path or an entry point, and on :meth:`register` (as a TypeError there).
        paths: whether a ``"module:Object"`` path is accepted in place of a name.
        advice: appended to the unknown-name message (e.g. how else to name one).
    """

    def __init__(self, kind: str, *, group: str | None = None, check: Callable[[Any, str], None] | None = None,
                 paths: bool = False, advice: str = ""):
        self.kind, self.group, self.paths, self.advice = kind, group, paths, advice
        self._check = check
        self._objects: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:Object", until first use

    # ---- adding ---------------------------------------------------------------------------
    def register(self, name: str, obj: Any, *, replace: bool = False) -> Any:
        """Add ``obj`` under ``name``; a different object already there is a ValueError unless ``replace``."""
        if self._check is not None:
            try:
                self._check(obj, repr(obj))
            except BrokenEntry as error:
                raise TypeError(str(error)) from None
        if name in self._lazy and not replace and self._lazy[name] != _path_of(obj):
            self._resolve_lazy(name)  # a clash only if the lazy entry turns out to be another object
        # (When the paths agree, the lazy entry's own module is registering it as it is imported.)
        existing = self._objects.get(name)
        if existing is not None and existing is not obj and not replace:
            raise ValueError(f"{self.kind} name {name!r} is already taken{_taken_by(existing)}")
        self._lazy.pop(name, None)
        self._objects[name] = obj
        return obj

    def add_lazy(self, name: str, path: str) -> None:
        """Name the object at ``"module:Object"``, imported the first time ``name`` is asked for."""
        if name not in self._objects:
            self._lazy[name] = path

    def __setitem__(self, name: str, obj: Any) -> None:
        self.register(name, obj, replace=True)

    def copy(self) -> "Registry":
        """An independent registry with the same entries (e.g. to register things in a test)."""
        other = Registry(self.kind, group=self.group, check=self._check, paths=self.paths, advice=self.advice)
        other._objects, other._lazy = dict(self._objects), dict(self._lazy)
        return other

    # ---- finding --------------------------------------------------------------------------
    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Names published by installed packages (looked up each time: packages come and go)."""
        if self.group is None:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every known name, sorted: registered, lazy and published."""
        return sorted(set(self._objects) | set(self._lazy) | set(self.entry_points()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._objects or name in self._lazy or name in self.entry_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def get(self, name: str) -> Any:
        """The object for ``name`` (or a ``"module:Object"`` path, where accepted)."""
        if self.paths and ":" in name:
            obj = import_object(name, f"{self.kind} {name!r}")
            self._validate(obj, name)
            return obj
        if name in self._objects:
            return self._objects[name]
        if name in self._lazy:
            return self._resolve_lazy(name)
        entry = self.entry_points().get(name)
        if entry is not None:
            try:
                obj = entry.load()
            except Exception as error:  # a broken third-party package must not take the CLI down
                raise BrokenEntry(f"entry point {name!r} ({entry.value}) cannot be loaded: {error}") from None
            self._validate(obj, f"entry point {name!r} ({entry.value})")
            return obj
        raise UnknownName(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                          f"known {self.kind}s: {', '.join(self.names())}{self.advice}")

    def available(self) -> dict[str, Any]:
        """Every entry loaded, by name: code entries in the order added, then published ones
        (a published entry that cannot be loaded is left out, so one broken package does not
        hide the rest)."""
        found = {name: self.get(name) for name in [*self._objects, *self._lazy]}
        for name in self.entry_points():
            if name not in found:
                try:
                    found[name] = self.get(name)
                except RegistryError:
                    continue
        return found

    # ---- internals ------------------------------------------------------------------------
    def _resolve_lazy(self, name: str) -> Any:
        path = self._lazy[name]
        obj = import_object(path, f"{self.kind} {name!r}")
        self._validate(obj, f"{self.kind} {name!r} ({path})")
        self._lazy.pop(name, None)
        self._objects.setdefault(name, obj)
        return self._objects[name]

    def _validate(self, obj: Any, origin: str) -> None:
        if self._check is not None:
            self._check(obj, origin)


__all__ = ["BrokenEntry", "Registry", "UnknownName", "did_you_mean", "import_object"]
