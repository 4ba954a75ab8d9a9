"""Stopping a long training run from a signal without tearing a step in half.

A plain KeyboardInterrupt lands wherever Python happens to be, for example halfway through an
optimiser's update, and the checkpoint written on the way out then holds a state no run ever had.
A :class:`StopSwitch` turns SIGINT and SIGTERM into a request that the run honours where its state
is whole, so the same command, run again, resumes exactly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class StopSwitch:
    """A stop asked for by a signal handler (:meth:`request`), honoured at whole-state points.

    Inside :meth:`interruptible`, work a stop may throw away and redo (computing gradients),
    a request raises KeyboardInterrupt at once; elsewhere it only marks the stop, and the loop
    raises it at its next :meth:`check`, where a checkpoint would be whole.
    """

    def __init__(self) -> None:
        self.asked = False
        self._interruptible = False

    def request(self) -> None:
        self.asked = True
        if self._interruptible:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.asked:
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def handle_signals(self) -> None:
        """Make SIGINT (Ctrl-C, ``timeout -s INT``) and SIGTERM (``kill``, Docker) requests."""
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, lambda *_: self.request())
