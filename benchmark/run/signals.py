"""Ctrl-C and SIGTERM while a grid runs: the first asks for a stop at the next safe point, a
second stops at once (:func:`benchmark.run.loop.run_all` says where the safe points are)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from ..errors import RunInterrupted


class StopSignals:
    """While a grid runs, the first SIGINT/SIGTERM becomes a request to stop at a safe point."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        # Handlers can only be installed from the main thread (a run driven from another thread
        # keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without waiting for a checkpoint
        self.signal_number = number
        print(f"\n{signal.Signals(number).name} received: stopping at the next safe point (a checkpoint is "
              "saved); send it again to stop at once", file=sys.stderr, flush=True)

    def interrupted(self, message: str) -> RunInterrupted:
        name = signal.Signals(self.signal_number).name
        return RunInterrupted(f"{name}: {message}", self.signal_number)
