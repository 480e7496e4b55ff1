"""Stopping cleanly: a request to stop becomes a checkpoint at the next step boundary.

The train loop asks `StopRequests.requested()` before each call of the train step and
passes the answer into it; the step sums every worker's answer in its one all-reduce, so all
workers see a stop request in the same step and save together (saving is collective under
MultiWorkerMirroredStrategy: a worker that stopped alone would leave the others hanging).
"""

from __future__ import annotations

import signal
from typing import Optional


class StopRequests:
    """SIGTERM/SIGINT as a flag (on the main thread; elsewhere signals cannot be caught)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (inside a Ray Train worker)
            pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def requested(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
