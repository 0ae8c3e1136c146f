"""A rank's stop request: SIGTERM or SIGINT ends the run at the end of the current step, with a
checkpoint. Installed by the entry point before the slow imports, so that a signal during
start-up is not lost (nor a traceback). A second SIGINT (Ctrl-C again) interrupts at once."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("furnace")


class StopRequest:
    def __init__(self):
        self.name: str | None = None  # the first signal's name once one arrived
        self.interrupts = 0
        # Taken by the first signal's handler in one C call: a second signal (the launcher passing
        # a group's SIGTERM on) can run its handler inside the first one, between any two bytecodes.
        self._first = [True]

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def __bool__(self) -> bool:
        return self.name is not None

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # a launcher passes Ctrl-C on as SIGTERM, so this is the user again
                raise KeyboardInterrupt
        try:
            self._first.pop()  # a launcher passing the same stop on changes nothing
        except IndexError:
            return
        self.name = signal.Signals(signum).name
        log.warning(f"{self.name} received: saving a checkpoint at the end of this step, then exiting")
