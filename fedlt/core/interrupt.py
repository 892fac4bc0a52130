"""SIGINT/SIGTERM during a run: finish the current round, save a checkpoint, stop cleanly.

The first signal sets a flag that the round loop checks after each round (``checkpoint.on_signal``); the run
then saves a checkpoint, shuts Ray down and the process exits with 128 + the signal number (130 for SIGINT,
143 for SIGTERM): non-zero, because the run did not finish, so schedulers and scripts can tell it apart from a
complete run and requeue it with ``fedlt resume=RUN_DIR``. A second signal exits at once (code 128 + signal);
the last checkpoint on disk stays valid (checkpoints are written atomically).

Installed after ``ray.init`` (which replaces the driver's SIGTERM handler with its own) and only in the main
thread (Python delivers signals there; the round loop runs in Flower's ServerApp thread).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Put back the handlers that were there before the first ``install`` (fedlt used as a library)."""
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            print(f"fedlt: {name} again: exiting now; the last checkpoint is kept.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()
        print(f"fedlt: {name} received: finishing the current round, saving a checkpoint, then stopping "
              f"(send it again to exit at once).", file=sys.stderr, flush=True)
