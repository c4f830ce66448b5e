"""Where a result came from: code version, data files, package versions, machine and device.

Two things here also decide a run's *identity* (its config hash, hence whether a rerun may
skip it, see :func:`benchmark.runner.plan_runs`):

* :func:`code_identity` — a SHA-256 over the source that can change results: the harness
  (every ``.py`` file under ``benchmark/`` and the JSON model configs in
  ``benchmark/backbone/configs/``, minus the modules that only read, present or store results,
  :data:`RESULT_NEUTRAL`) and the method's own source (its module, or its whole sub-package,
  plus the shared ``methods/common/``; the method contract is harness code), and the versions of the packages
  that compute the numbers. Content, not the git commit: an uncommitted change is a different
  version, and a commit that only touches the README does not make GPU-days of finished runs
  stale. The git commit and dirty flag are still recorded (:func:`git_state`).

  What is hashed is the *code*, not the text (:func:`normalised_source`): each Python file is
  parsed and its syntax tree, without docstrings and other bare string statements, is dumped
  (:func:`ast.dump`, which keeps no comments, line numbers or layout); a JSON config is hashed
  as its parsed value. So a comment, a docstring, a blank line or re-wrapped code leaves every
  run id as it was, and a changed formula or constant changes it. The dump's format belongs to
  the Python version, so the hash includes ``major.minor`` (:data:`SOURCE_HASH_SCHEME`): moving
  to another Python minor version makes finished runs stale, as it may change the numbers too.
* :func:`data_manifest` — the scenario's annotation files with size, modification time and
  SHA-256 (not the images: hashing 100k images would take longer than many runs; an image is
  identified by the annotation file that lists it), or, for the synthetic scenario, the
  generator version. Only names and checksums enter the identity, so moving the data folder
  or touching a file does not invalidate results.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "open_clip_torch", "avalanche-lib", "transformers", "peft", "numpy",
            "pandas", "pillow", "safetensors", "clvl-benchmark")
# Packages whose version can change the numbers a run produces (part of its identity).
RESULT_PACKAGES = ("torch", "torchvision", "open_clip_torch", "avalanche-lib", "peft", "numpy", "pillow")
REPO_ROOT = Path(__file__).resolve().parents[1]
HARNESS_ROOT = Path(__file__).resolve().parent
# Harness modules that never touch training or evaluation: editing them must not make
# finished runs look stale. Paths relative to benchmark/, with "/" as the separator; an entry
# ending in "/" is a whole sub-package (e.g. "reporting/"). Every other .py file under
# benchmark/ counts.
RESULT_NEUTRAL = frozenset({"__main__.py", "cli.py", "reporting/", "stats.py", "provenance.py", "testing.py",
                            "io.py", "checkpoint.py", "errors.py", "tracking.py",
                            # Split out of checkpoint.py, and progress bars, which only watch (like tracking.py).
                            "rng.py", "plain.py", "run/progress.py",
                            # The bench command only measures speed; no run imports it.
                            "bench/",
                            # Where runs execute (--launcher ray); each cell runs benchmark.run unchanged.
                            "launch/"})
# Names how source is turned into what is hashed (see normalised_source); ast.dump's format
# depends on the Python version, hence its major.minor.
SOURCE_HASH_SCHEME = f"ast-dump-no-docstrings/1/python{sys.version_info.major}.{sys.version_info.minor}"


def package_versions(names=PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state() -> dict[str, object]:
    """The commit of the harness checkout and whether it had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# ============================================================================ code identity


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Remove every statement that is only a string constant: docstrings of modules, classes and
    functions, and the attribute docstrings some code puts after an assignment. They do nothing
    at run time (the harness reads no ``__doc__``). A body left empty gets a ``pass``."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [statement for statement in body
                    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                            and isinstance(statement.value.value, str))]
            if len(kept) != len(body):
                setattr(node, field, kept or [ast.Pass()])
    return tree


def normalised_source(path: Path) -> bytes:
    """What of a source file decides results, as bytes to hash (see the module docstring).

    ``.py``: :func:`ast.dump` of its syntax tree without docstrings: no comments, line numbers,
    blank lines or formatting. ``.json``: the parsed value, keys sorted. A file that does not
    parse (or any other file) is hashed as it is.
    """
    data = path.read_bytes()
    try:
        if path.suffix == ".py":
            return ast.dump(_strip_docstrings(ast.parse(data, filename=str(path)))).encode()
        if path.suffix == ".json":
            return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    except (SyntaxError, ValueError):
        pass
    return data


def _digest_files(files: list[Path], root: Path) -> str:
    """SHA-256 over (relative path, normalised content) of ``files``, in a stable order."""
    sha = hashlib.sha256(SOURCE_HASH_SCHEME.encode() + b"\0")
    for path in sorted(set(files)):
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.name
        sha.update(relative.encode() + b"\0")
        sha.update(normalised_source(path))
        sha.update(b"\0")
    return sha.hexdigest()


def is_result_neutral(relative: str) -> bool:
    """Whether ``relative`` (a path under ``benchmark/``, "/"-separated) is in :data:`RESULT_NEUTRAL`."""
    return any(relative == entry or (entry.endswith("/") and relative.startswith(entry)) for entry in RESULT_NEUTRAL)


def harness_source_files() -> list[Path]:
    """The harness files that enter :func:`harness_digest` (see the module docstring)."""
    files = [p for p in HARNESS_ROOT.rglob("*.py")
             if not is_result_neutral(p.relative_to(HARNESS_ROOT).as_posix())]
    files += list((HARNESS_ROOT / "backbone" / "configs").glob("*.json"))
    return sorted(p for p in files if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=1)
def harness_digest() -> str:
    return _digest_files(harness_source_files(), HARNESS_ROOT)


def method_source_files(cls: type) -> list[Path]:
    """The files whose content decides what a method class computes.

    Its module file; if the module sits in a package of its own (``methods/lpi/``, or a
    user's ``mypkg/``), every ``.py`` file of that package; plus the shared ``methods/common/``
    and ``methods/base.py`` (now only a re-export: the contract itself, ``benchmark/method.py``,
    is in the harness digest). A class without a source file (defined in a notebook) has none.
    """
    try:
        module_file = Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):
        return []
    files = [module_file]
    package = cls.__module__.rpartition(".")[0]
    if package and package != "methods":
        files += list(module_file.parent.rglob("*.py"))
    methods_dir = REPO_ROOT / "methods"
    files += [methods_dir / "base.py", *(methods_dir / "common").rglob("*.py")]
    return [p for p in files if p.is_file() and "__pycache__" not in p.parts]


def method_digest(cls: type) -> str:
    files = method_source_files(cls)
    if not files:
        return f"no-source:{cls.__module__}.{cls.__qualname__}"
    return _digest_files(files, REPO_ROOT)


def code_identity(method_cls: type) -> dict[str, Any]:
    """What of the code a run's results depend on (part of its config hash)."""
    versions = package_versions(RESULT_PACKAGES)
    versions.pop("python")
    return {"harness_sha256": harness_digest(), "method_sha256": method_digest(method_cls), "packages": versions}


def code_version(method_cls: type) -> dict[str, Any]:
    """:func:`code_identity` plus the git state, for the record."""
    return {**code_identity(method_cls), "git": git_state()}


# ============================================================================ data identity


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            sha.update(block)
    return sha.hexdigest()


def data_manifest(scenario) -> dict[str, Any]:
    """The scenario's data files with their checksums (see the module docstring).

    Built from ``scenario.info["sources"]`` (every built-in file-based scenario lists its
    annotation files there) and ``scenario.info["generator_version"]`` (synthetic).
    """
    files = []
    for source in dict.fromkeys(scenario.info.get("sources") or []):  # unique, in order
        path = Path(source)
        stat = path.stat()
        files.append({"path": str(path), "name": path.name, "size": stat.st_size,
                      "mtime": stat.st_mtime, "sha256": file_sha256(path)})
    manifest: dict[str, Any] = {"files": files}
    if "generator_version" in scenario.info:
        manifest["generator_version"] = scenario.info["generator_version"]
    if not files and "generator_version" not in manifest:
        manifest["note"] = "the scenario lists no source files; identified by its options and per-task counts"
    return manifest


def backbone_weights(name: str) -> dict[str, Any] | None:
    """Checksums of a backbone given as a local weight file or ``local-dir:`` folder (its content
    can change under the same name); None for named tags (a tag names fixed weights) and random
    weights. The synthetic backbone is identified by its recipe, which is harness code."""
    from .backbone.resolve import WEIGHT_SUFFIXES, parse_backbone_name

    arch, tag = parse_backbone_name(name)
    if tag is None and arch.startswith("local-dir:"):
        folder = Path(arch.split(":", 1)[1]).expanduser()
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    elif tag and (os.sep in tag or tag.endswith(WEIGHT_SUFFIXES)) and Path(tag).expanduser().is_file():
        files = [Path(tag).expanduser()]
    else:
        return None
    return {"files": [{"path": str(p), "name": p.name, "size": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in files]}


def data_identity(scenario, manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of the manifest that decides results: checksums and names, not paths or times."""
    return {"files": [[f["name"], f["sha256"]] for f in manifest["files"]],
            "generator_version": manifest.get("generator_version"),
            "counts": scenario.counts()}


# ============================================================================ machine


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict[str, object]:
    return {"versions": package_versions(), "git": git_state(), "host": platform.node(),
            "platform": platform.platform(), "device": str(device), "device_name": device_description(device),
            "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def training_data(streams, decode: str, num_workers: int) -> dict[str, object]:
    """How the training images were decoded and fed (see :mod:`benchmark.data.decode`): the
    decode path asked for, the one the training transform really got (a fast path falls back
    to ``pil`` for a transform it cannot follow), whether crops travelled as uint8 (normalised
    on the device) or as the transform's float output, the loader workers, and the versions
    of the decoders that produce the pixels."""
    from PIL import features

    from .data.decode import effective_decode

    pairs = (streams.train_pairs or [None])[0]
    split = pairs.host_split() if pairs is not None else None
    return {"decode": decode, "decode_used": effective_decode(split, decode),
            "transport": "uint8" if split is not None else "float32", "num_workers": num_workers,
            "decoders": {"pillow": package_versions(("pillow",)).get("pillow"),
                         "libjpeg_turbo": features.version("libjpeg_turbo"),
                         "torchvision": package_versions(("torchvision",)).get("torchvision")}}


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window for one run; False where that is impossible.

    CUDA: the allocator's peak statistics. CPU: Linux resets a process's peak resident set size
    (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs`` (since Linux 4.0); elsewhere
    only the peak since the process started is known.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb(device: torch.device, window_reset: bool = False) -> tuple[float, str]:
    """Peak memory and what it measures.

    ``cuda_max_allocated``: the CUDA allocator's peak for the run. ``run_peak_rss``: the
    process's peak resident memory since :func:`reset_peak_memory` (the run, on Linux).
    ``process_peak_rss``: the peak since the process started, which includes earlier runs of
    the same command.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    hwm = _vm_hwm_mb() if window_reset else None
    if hwm is not None:
        return hwm, "run_peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def __getattr__(name: str):
    # protocol_card lives in benchmark.reporting.card now; `from benchmark.provenance import
    # protocol_card` keeps working (imported on demand: provenance must not import pandas).
    if name == "protocol_card":
        from .reporting.card import protocol_card

        return protocol_card
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
