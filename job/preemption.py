"""Stopping cleanly: a request to stop becomes one checkpoint at the next step boundary.

The train loop asks `StopRequests.requested()` before each call of the train step and
passes the answer into it; the step sums every worker's answer in its one all-reduce, so all
workers see a stop request at the same step and save together (saving is collective under
MultiWorkerMirroredStrategy: a worker that stopped alone would leave the others hanging).

Where a request comes from:
  - SIGTERM/SIGINT to this process, when it can catch them (on its main thread: one machine,
    or a multi-worker run launched by hand with TF_CONFIG);
  - a SIGTERM to any worker of a MultiWorkerMirroredStrategy run whose signals this process
    cannot catch (Ray Train runs the job on a thread): TensorFlow's own handler then publishes
    a preemption notice in its coordination service, which `TfPreemptionNotice` watches;
  - anything else the launcher passes in (job.launch: the Ray driver's SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

# The key TensorFlow's C++ PreemptionNotifier sets in the coordination service on SIGTERM
# (tensorflow/python/distribute/failure_handling/preemption_watcher.py uses the same).
TF_PREEMPTION_KEY = "TF_DEFAULT_PREEMPTION_NOTICE_KEY"


class TfPreemptionNotice:
    """Whether TensorFlow announced that some worker of this multi-worker run got SIGTERM.

    A daemon thread blocks on the coordination service's key until it is set (readable by
    every worker); the strategy must exist first (it starts the service).
    """

    def __init__(self):
        self.message: Optional[str] = None
        threading.Thread(target=self._watch, name="tf-preemption-notice", daemon=True).start()

    def _watch(self) -> None:
        from tensorflow.python.eager import context

        try:
            self.message = context.context().get_config_key_value(TF_PREEMPTION_KEY)
        except Exception:  # noqa: BLE001 - the service stops when the run ends: nothing more to watch
            return
        log.warning("preemption notice: %s got SIGTERM; stopping at the next step boundary", self.message)

    def __call__(self) -> Optional[str]:
        return self.message and f"a SIGTERM to {self.message}"


class StopRequests:
    """Signals to this process (where it can catch them) and other `sources`: callables that
    return why to stop, or None."""

    def __init__(self, sources: tuple[Callable[[], Optional[str]], ...] = ()):
        self.received: Optional[int] = None
        self.sources = list(sources)
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

    def reason(self) -> Optional[str]:
        """Why this process wants to stop, or None."""
        if self.received is not None:
            return f"signal {self.received}"
        for source in self.sources:
            if why := source():
                return why
        return None

    def requested(self) -> bool:
        return self.reason() is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
