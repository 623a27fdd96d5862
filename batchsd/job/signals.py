"""Signals during a run: the first SIGINT/SIGTERM lets the batch in flight finish and be written,
then the run stops (results flushed, exit 130/143); a second one drops the batch in flight."""
from __future__ import annotations

import signal
import threading

from rich.console import Console


class StopRequested:
    """Turns the first SIGINT/SIGTERM into a flag; the second raises KeyboardInterrupt (drop the batch)."""

    def __init__(self, console: Console):
        self.console = console
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            self.console.print(f"[yellow]{name}: finishing the batch in flight, then stopping "
                               "(send it again to drop that batch)[/yellow]")
        else:
            raise KeyboardInterrupt

    def __bool__(self) -> bool:
        return self.signal_name is not None
