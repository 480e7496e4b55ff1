"""What a Ray run's driver and workers tell each other besides Ray Train's reports.

`RunControl` is one small actor the driver starts per run:
  - stop requests: the driver sets it on SIGTERM; rank 0 polls it (`DriverStopPoll`) and
    votes in the step's all-reduce, so every rank stops at the same step (job.preemption);
  - the last report: rank 0's metrics at every report (step, phase, validation, `stopped`),
    which the driver reads when the worker group ends (Ray's Result carries the metrics of
    checkpoints it registered, and no checkpoint goes through Ray: job.launch);
  - the console: rank 0's `job` log lines, and the warnings and errors of the other ranks,
    are sent to it (`ConsoleRelay`) and the driver prints them, once and in order. Workers'
    own output (TensorFlow's native start-up lines, Ray Train's report dumps, each rank's copy
    of every line) stays in Ray's log files unless telemetry.verbose: it no longer depends on
    Ray's log streaming, which may also drop or delay lines.
`FailFast`, a Ray Train callback on the controller, ends a run at the first JobError (no
retry can fix bad input or a non-finite loss) and tells the console about any other failure
that Ray retries.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Optional

import ray
import ray.train

from job.errors import JobError


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self):
        self.stop_reason: Optional[str] = None
        self.lines: list[str] = []
        self.report: Optional[dict] = None

    def set_report(self, metrics: Optional[dict]) -> None:
        self.report = metrics

    def get_report(self) -> Optional[dict]:
        return self.report

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def get_stop_reason(self) -> Optional[str]:
        return self.stop_reason

    def add_line(self, line: str) -> None:
        self.lines.append(line)

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def flush(self) -> bool:
        """Returns once every call made before it by the same caller has run (Ray keeps their order)."""
        return True


class DriverStopPoll:
    """A stop source (job.preemption) for rank 0: the driver's request, asked at most every
    POLL_SECONDS so that short chunks do not each wait for a round trip."""

    POLL_SECONDS = 2.0

    def __init__(self, control):
        self.control, self.reason, self._next = control, None, 0.0

    def __call__(self) -> Optional[str]:
        if self.reason is None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.POLL_SECONDS
            self.reason = ray.get(self.control.get_stop_reason.remote())
        return self.reason


class ConsoleRelay(logging.Handler):
    """Sends formatted log records to the driver's console (RunControl.add_line)."""

    def __init__(self, control, prefix: str = "", level: int = logging.INFO):
        super().__init__(level)
        self.control, self.prefix = control, prefix
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.control.add_line.remote(self.prefix + self.format(record))
        except Exception:  # noqa: BLE001 - a console line is never worth a failed run
            self.handleError(record)

    def close(self) -> None:
        try:
            ray.get(self.control.flush.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the driver may be gone already
            pass
        super().close()


class ConsolePrinter:
    """On the driver: prints the relayed lines as they come, until closed (then the rest)."""

    def __init__(self, control, every_s: float = 0.5):
        self.control, self.every_s = control, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def _print(self) -> None:
        for line in ray.get(self.control.take_lines.remote()):
            print(line, file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._print()
            except Exception:  # noqa: BLE001 - Ray going down at the end of the run
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._print()


class FailFast(ray.train.UserCallback):
    """Ends the run at the first JobError a worker raises: retrying cannot fix those (Ray Train
    2.60 retries every worker error otherwise). Other failures are retried and announced."""

    def __init__(self, control):
        self.control = control

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, JobError):
                raise error
        rank, error = next(iter(sorted(worker_exceptions.items())))
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self.control.add_line.remote(f"WARNING: the worker group failed (rank {rank}: {type(error).__name__}: "
                                     f"{first_line}); Ray restarts it from the last checkpoint if ray.max_failures allows")
