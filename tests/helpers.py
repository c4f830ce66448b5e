"""Helpers shared by several test modules (test modules import from here, never from each other)."""

from __future__ import annotations

import contextlib
import io

from benchmark.cli import main


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured (for module-scoped fixtures, where capsys is unavailable)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
