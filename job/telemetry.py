"""What a run shows while it trains: TensorBoard scalars, a progress line, profiler traces.

Only the chief writes TensorBoard files (other workers get no-op writers), except the
profiler, which every worker may run into its own subdirectory when asked.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import tensorflow as tf
from tqdm import tqdm


class Scalars:
    """TensorBoard writers for the `train` and `validation` runs of a workdir."""

    def __init__(self, logdir: Optional[str]):
        if logdir is None:
            self._writers = {"train": tf.summary.create_noop_writer(), "validation": tf.summary.create_noop_writer()}
        else:
            self._writers = {run: tf.summary.create_file_writer(os.path.join(logdir, run)) for run in ("train", "validation")}

    def write(self, run: str, step: int, values: dict) -> None:
        with self._writers[run].as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()


class Throughput:
    """Images/sec and mean step time since the last `read()`."""

    def __init__(self):
        self._start, self._steps = time.perf_counter(), 0

    def add(self, steps: int) -> None:
        self._steps += steps

    def read(self, global_batch: int) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps = max(self._steps, 1)
        rate = self._steps * global_batch / elapsed
        self._start, self._steps = time.perf_counter(), 0
        return rate, 1000.0 * elapsed / steps


class ProfilerWindow:
    """Traces train steps [start, stop) of one phase into `logdir` for TensorBoard's Profile tab."""

    def __init__(self, logdir: Optional[str], steps: Optional[tuple[int, int]]):
        self._logdir, self._steps = logdir, steps
        self.active = False
        self.traced = False

    def before(self, step: int) -> None:
        if self._logdir and self._steps and not self.active and not self.traced and self._steps[0] <= step < self._steps[1]:
            tf.profiler.experimental.start(self._logdir)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self._steps[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active, self.traced = False, True

    def trace(self, step: int):
        """Step marker: the Profile tab's step-time breakdown keys on these."""
        return tf.profiler.experimental.Trace("train", step_num=step, _r=1)


def progress(phase: str, total: int, initial: int, enabled: bool) -> tqdm:
    # On a terminal a live bar; in logs (no tty) a line every 30 s rather than a flood.
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=phase,
        unit="step",
        disable=not enabled,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
