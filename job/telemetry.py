"""What a run shows while it trains: TensorBoard scalars, a progress line, profiler traces.

Only the chief writes TensorBoard files (other workers get no-op writers), except the
profiler, which every worker may run into its own subdirectory when asked.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import tensorflow as tf
from tqdm import tqdm

log = logging.getLogger(__name__)


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
    """Traces train steps [start, stop) of one phase into `logdir` for TensorBoard's Profile tab.

    Each step in the window runs as its own loop-free call (StepFunctions.train_step) under its
    own step marker: when a TF while loop runs inside the window (the multi-step chunk's
    `tf.range`), the profiler groups events by the loop's iterations and ignores the markers,
    and the overview page and the input-pipeline analyzer then show no step time. The step
    before the window also runs alone, untraced, so that the single-step function's tracing
    and first run stay out of the trace. The train loop ends its chunks there, so the window
    is reached whatever train.steps_per_call is.

    Every worker runs the window's steps alone, also those that do not trace (`logdir` None):
    all workers must run the same calls, or their collectives would not match.
    """

    def __init__(self, logdir: Optional[str], steps: Optional[tuple[int, int]]):
        self._logdir, self._steps = logdir, steps
        self.active = False
        self.done = False

    def _first(self) -> Optional[int]:
        """The first step run alone (the warm-up step, or the window's start at step 0)."""
        if not self._steps or self.done:
            return None
        return max(self._steps[0] - 1, 0)

    def covers(self, step: int) -> bool:
        """Whether `step` runs alone: in the window or its warm-up step."""
        first = self._first()
        return first is not None and first <= step < self._steps[1]

    def next_start(self, step: int) -> Optional[int]:
        """Where chunks must end to reach the window, if it is still ahead of `step`."""
        first = self._first()
        return first if first is not None and step < first else None

    def run_step(self, step: int, step_number: int, run_step):
        """run_step() for phase step `step`; inside the window and with a logdir, under the
        profiler, marked as step `step_number` (the markers the overview page and the
        input-pipeline analyzer key on)."""
        if step < self._steps[0] or not self._logdir:
            return run_step()  # the warm-up (traced by tf.function and run once, outside the trace), or no trace here
        if not self.active:
            tf.profiler.experimental.start(self._logdir)
            self.active = True
        with tf.profiler.experimental.Trace("train", step_num=step_number, _r=1):
            return run_step()

    def after(self, step: int) -> None:
        if self._steps and step >= self._steps[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
        self.done = True


def unreachable_window(steps: Optional[tuple[int, int]], phase: str, phase_steps: int) -> Optional[str]:
    """Why telemetry.profile_steps will never trace in `phase`, or None."""
    if steps is not None and steps[0] >= phase_steps:
        return (f"telemetry.profile_steps={list(steps)} starts after the last step of phase {phase} "
                f"({phase_steps} steps): nothing will be traced")
    return None


class History:
    """Validation results of a run and the first time each accuracy threshold was crossed."""

    def __init__(self, thresholds: list[float], previous: dict):
        self.thresholds = thresholds
        self.rows: list[dict] = list(previous.get("validation_history", []))
        self.time_to_accuracy: list[dict] = list(previous.get("time_to_accuracy", []))

    def record(self, row: dict) -> list[dict]:
        """Add a validation row (phase, step, val_accuracy, wall_seconds, images_seen...); returns
        the time-to-accuracy entries it adds."""
        self.rows.append(row)
        reached = {r["threshold"] for r in self.time_to_accuracy}
        new = [{"threshold": t, "wall_seconds": row["wall_seconds"], "images_seen": row["images_seen"],
                "step": row["step"], "phase": row["phase"]}
               for t in self.thresholds if t not in reached and row["val_accuracy"] >= t]
        self.time_to_accuracy += new
        return new


class Progress:
    """Where a phase stands: on a terminal a live tqdm bar; elsewhere (a log file, Ray's job
    logs, the driver of a Ray run) a line from the `job` logger at a log point, at most every
    `every_s` seconds, and at the end: step, images/sec, loss and time left."""

    def __init__(self, phase: str, total: int, initial: int, enabled: bool, every_s: float,
                 tty: Optional[bool] = None):
        self.phase, self.total, self.step, self.enabled, self.every_s = phase, total, initial, enabled, every_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._last_line = time.monotonic()
        self._bar = tqdm(total=total, initial=initial, desc=phase, unit="step", dynamic_ncols=True, file=sys.stderr,
                         mininterval=0.5) if enabled and self.tty else None

    def advance(self, steps: int) -> None:
        self.step += steps
        if self._bar:
            self._bar.update(steps)

    def report(self, loss: float, images_per_sec: float, steps_per_sec: float) -> None:
        """At a log point: the bar's postfix, or a line if it is time for one."""
        if self._bar:
            self._bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_sec:.0f}", refresh=False)
            return
        now = time.monotonic()
        if not self.enabled or (now - self._last_line < self.every_s and self.step < self.total):
            return
        self._last_line = now
        left = (self.total - self.step) / steps_per_sec if steps_per_sec > 0 else float("nan")
        log.info("%s step %d/%d (%d%%), %.0f img/s, loss %.4f, %s left", self.phase, self.step, self.total,
                 100 * self.step // max(self.total, 1), images_per_sec, loss, _duration(left))

    def close(self) -> None:
        if self._bar:
            self._bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
