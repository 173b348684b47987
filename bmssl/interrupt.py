"""Stopping a long loop cleanly on Ctrl-C (SIGINT) or SIGTERM.

    with StopRequests() as stop:
        while working:
            one_step()                 # never cut in half by the first signal
            if stop.requested:
                save(); break          # the work done so far is kept

The first signal only records itself (`stop.signal`) and prints what will happen; the loop
finishes its step and stops. A second signal aborts at once (Abort, a KeyboardInterrupt that
names the signal, so that a second SIGTERM still exits 143, not Ctrl-C's 130). Outside the
main thread (where Python cannot install handlers) nothing is installed and signals act as usual.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abort(KeyboardInterrupt):
    """The second signal: `signum` is its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number: an Abort's signal, else SIGINT (a plain Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", int(signal.SIGINT))


class StopRequests:
    def __init__(self, message: str = "stopping after the step in progress; again to abort at once"):
        self.message = message
        self.signal: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by this signal: 128 + its number."""
        return 128 + int(self.signal) if self.signal is not None else 0

    def _handle(self, signum, _frame):
        if self.signal is not None:
            raise Abort(signum)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                # an ignored signal stays ignored (a shell's `cmd &` ignores SIGINT: training had
                # honoured it while data loading and evaluation ignored it)
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
