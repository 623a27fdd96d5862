"""Signals during a run: the first SIGINT/SIGTERM lets the batch in flight finish and be written,
then the run stops (results flushed, exit 130/143); a second one drops the batch in flight. Once
the run is finishing (no batch left to drop: the writer's last rows, the results table, the done
marker) further signals are noted and the finishing goes on, since what it writes is finished work;
SIGKILL still stops it, and the next run resumes from the journal."""
from __future__ import annotations

import signal
import threading

from rich.console import Console


class StopRequested:
    """Turns the first SIGINT/SIGTERM into a flag; the second raises KeyboardInterrupt (drop the batch)
    until `finishing` is called."""

    def __init__(self, console: Console):
        self.console = console
        self.signal_name: str | None = None
        self._finishing = False
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
        elif self._finishing:
            self.console.print(f"[yellow]{name}: already stopping; writing the finished rows and the results "
                               "(SIGKILL would leave them to the next run's resume)[/yellow]")
        else:
            raise KeyboardInterrupt

    def finishing(self) -> None:
        """From now on a signal is noted, not raised (see the module's docstring)."""
        self._finishing = True

    def __bool__(self) -> bool:
        return self.signal_name is not None
