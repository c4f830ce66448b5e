"""benchmark.io is the one atomic writer, and its files get the permissions the umask gives."""

import os
import re
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from benchmark import io as bio
from benchmark.scenarios import synthetic

ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
@pytest.mark.parametrize("writer", ["text", "json", "bytes", "with"])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, mask, expected, writer):
    target = tmp_path / "out" / "file"
    with umask(mask):
        if writer == "text":
            bio.atomic_write_text(target, "x\n")
        elif writer == "json":
            bio.atomic_write_json(target, {"a": 1})
        elif writer == "bytes":
            bio.atomic_write_bytes(target, b"x")
        else:
            bio.atomic_write_with(target, lambda handle: handle.write(b"x"))
        # What open() would give a brand-new file under the same umask.
        reference = tmp_path / "reference"
        reference.write_bytes(b"")
    assert mode(target) == expected == mode(reference)


@posix_only
def test_overwriting_gives_the_umask_mode_again(tmp_path):
    target = tmp_path / "record.json"
    with umask(0o077):
        bio.atomic_write_json(target, {"a": 1})
    with umask(0o022):
        bio.atomic_write_json(target, {"a": 2})
    assert mode(target) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["record.json"]


def test_a_failing_writer_leaves_no_temp_file_and_the_old_contents(tmp_path):
    target = tmp_path / "model.pt"
    bio.atomic_write_bytes(target, b"old")

    def fail(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bio.atomic_write_with(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_temp_names_are_unique_hidden_and_never_reused(tmp_path, monkeypatch):
    """Two writers to the same target never share a temp file (O_EXCL, random names)."""
    seen = []
    real_open = os.open

    def spy(name, flags, *args):
        seen.append((os.path.basename(name), flags))
        return real_open(name, flags, *args)

    monkeypatch.setattr(bio.os, "open", spy)
    for _ in range(3):
        bio.atomic_write_text(tmp_path / "t.csv", "a\n")
    temp = [(name, flags) for name, flags in seen if name.endswith(bio.TEMP_SUFFIX)]
    assert len({name for name, _ in temp}) == 3
    assert all(name.startswith(".t.csv.") and flags & os.O_EXCL and flags & os.O_CREAT for name, flags in temp)


@posix_only
def test_synthetic_backbone_cache_uses_the_shared_writer(tmp_path, monkeypatch):
    """The pretrained synthetic weights are written like every other output (was mkstemp: 0600)."""
    monkeypatch.setattr(synthetic, "_pretrain", lambda recipe: {"w": torch.zeros(2)})
    with umask(0o022):
        path = synthetic.pretrained_synthetic_weights("clvl-tiny", tmp_path)
    assert mode(path) == 0o644
    assert torch.load(path)["w"].shape == (2,)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_no_other_module_makes_its_own_temp_files():
    """One atomic writer: nothing outside benchmark/io.py calls mkstemp/NamedTemporaryFile/os.replace."""
    pattern = re.compile(r"\b(mkstemp|NamedTemporaryFile|os\.replace|os\.rename)\b")
    offenders = [str(path.relative_to(ROOT)) for folder in ("benchmark", "methods")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if path != ROOT / "benchmark" / "io.py" and pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
