"""Atomic file writes.

Every file the benchmark produces (run records, tables, figures) is written to a temporary
file in the *same* folder and then moved over the target with :func:`os.replace`. On POSIX
and Windows that rename is atomic within one file system, so a reader (or a crash, or a
Ctrl-C) sees either the complete old file or the complete new one, never half of each. The
temporary file must live next to the target because a rename across file systems is a copy.

This module is the project's only atomic writer. Files get the permissions the umask gives a
new file (``0o666 & ~umask``: ``-rw-r--r--`` under the usual 022), like any file opened with
``open(path, "w")``; :func:`tempfile.mkstemp` is not used because it always creates ``0600``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write_with", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "to_json_safe",
           "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders; return the path."""
    return atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it over ``path``.

    For large payloads (checkpoints) that should stream to disk instead of being built in
    memory first, e.g. ``atomic_write_with(path, lambda f: torch.save(state, f))``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden, clearly-named temp file: if the process is killed before the cleanup below,
    # the leftover is recognisable and is never mistaken for a result (no .json/.csv suffix).
    fd, tmp_name = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            # Without fsync a power loss after the rename can leave an empty file behind.
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        _fsync_folder(path.parent)
    except BaseException:
        # Any failure (including KeyboardInterrupt) leaves the old file untouched; only the
        # temp file is ours to remove.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


# O_EXCL: never open a file someone else made; O_BINARY (Windows only): no newline translation.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _create_temp_file(path: Path) -> tuple[int, str]:
    """Create a new, empty, uniquely named temp file next to ``path``; return ``(fd, name)``.

    The mode passed to :func:`os.open` is ``0o666``, which the kernel reduces by the umask, so
    the finished file has the permissions the user asked for (without reading the umask, which
    can only be done racily by setting it).
    """
    for _ in range(100):
        name = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(name, _TEMP_FLAGS, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Newlines are written as given (no translation),
    so files are byte-identical across platforms."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically.

    NaN and ±inf become ``null`` (strict JSON has no NaN; other tools choke on it), and numpy
    scalars/arrays become plain Python values. Key order is preserved, so a record reads in
    the order it was built.
    """
    text = json.dumps(to_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def to_json_safe(obj: Any) -> Any:
    """Return a copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``."""
    if isinstance(obj, dict):
        return {str(key): to_json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):  # numpy scalar: np.float32, np.int64, np.bool_, ...
        return to_json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def probe_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents) and a temporary file in it, removed at once: raises
    the ``OSError`` a later write there would meet, before any work is spent on what to write."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
        pass
