"""Deferring Ctrl-C over short state changes that must not stop half-way.

Python raises KeyboardInterrupt between any two bytecodes of the main thread. A state
change that cannot be undone cheaply (weights written in place, a message written to a
worker's pipe) runs inside ``deferred_interrupts()``: a SIGINT that arrives meanwhile is
held and delivered, through the handler that was installed before, once the block ends.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):
        # signals reach the main thread only; a handler installed outside Python cannot
        # be put back, so it is left alone
        yield
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            _deliver(previous, held[0])


def _deliver(handler, frame) -> None:
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)
    # SIG_IGN: dropped, as it would have been without the deferral
