"""Stopping on Ctrl-C / SIGTERM (bmssl/interrupt.py)."""
import os
import signal

import pytest

from bmssl.interrupt import Abort, StopRequests, exit_status


def test_stop_requests_keep_an_ignored_signal_ignored_and_a_second_signal_names_itself():
    """`bmssl train ... &` from a script ignores SIGINT: StopRequests had installed its handler
    anyway. A second signal aborts with an Abort carrying that signal (exit 143 for SIGTERM)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(Abort) as aborted:
        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.exit_status == 143
            os.kill(os.getpid(), signal.SIGTERM)
    assert aborted.value.signum == signal.SIGTERM and exit_status(aborted.value) == 143
    assert exit_status(KeyboardInterrupt()) == 130
