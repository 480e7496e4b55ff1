"""Uploads off the training path: a URI workdir's checkpoints, TensorBoard files and summary
go from local scratch to the store in one background thread while training goes on.

* One upload at a time, in the order asked; a newer push of the same name (`checkpoints`,
  `tensorboard`, ...) replaces one still waiting, so at most one checkpoint is in flight and
  at most one more waits (the newest).
* A checkpoint push is a snapshot: the files of the kept checkpoints, hard-linked into
  `<scratch>/.uploads/` when it is asked for (TensorFlow may rotate them away meanwhile),
  sent data first, then the `checkpoint` index that names them, then the deletion of rotated
  ones. A checkpoint counts as saved (`saved`) only once its index is in the store.
* A store that fails or stops answering (a request gets nothing back for
  storage.REQUEST_TIMEOUT_S; 5xx, throttling, a refused connection) is retried with backoff
  for up to storage.outage_timeout_s without progress; past that, `check()` and `wait()`
  raise StorageUnavailable naming the store and the last checkpoint safe in it.
* `wait()` (the end of a run, a preemption) returns once everything asked for is in the store.

With a local path every push is a no-op: files are written in place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time

from job.errors import StorageUnavailable
from job.storage import Workdir, local_files

log = logging.getLogger(__name__)

FIRST_DELAY_S, MAX_DELAY_S = 0.5, 30.0  # backoff between attempts of an upload the store failed


@dataclasses.dataclass
class _Push:
    name: str
    mirror: bool
    last: tuple
    files: dict | None  # a snapshot ({relative path: hard link}), or None: what `name` holds when sent
    staging: str | None = None
    step: int | None = None  # the checkpoint this push completes


class Uploads:
    def __init__(self, workdir: Workdir, outage_timeout_s: float, saved: str | None = None):
        self.workdir, self.outage_timeout_s = workdir, outage_timeout_s
        self.saved = saved  # the newest checkpoint complete in the store (its URI), for messages
        self._pending: dict[str, _Push] = {}
        self._busy: _Push | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._failed: StorageUnavailable | None = None
        self._progress_at = time.monotonic()
        self._error: str | None = None  # the last error of the outage under way
        self._outage_logged = False
        self._count = 0
        self._thread: threading.Thread | None = None

    # --- the training thread's side -------------------------------------------------------
    def push(self, name: str, mirror: bool = False, last: tuple = (), snapshot: bool = False,
             step: int | None = None) -> None:
        """Queue `name` for the store; replaces a push of the same name that has not started."""
        if not self.workdir.remote:
            return
        self.check()
        files, staging = None, None
        if snapshot:
            self._count += 1
            staging = self.workdir.path(".uploads", f"{self._count}")
            files = {}
            for rel, path in local_files(self.workdir.path(name)).items():
                files[rel] = os.path.join(staging, rel)
                os.makedirs(os.path.dirname(files[rel]), exist_ok=True)
                try:
                    os.link(path, files[rel])
                except OSError:  # a filesystem without hard links
                    shutil.copy2(path, files[rel])
        with self._cond:
            replaced = self._pending.pop(name, None)
            if self._busy is None and not self._pending:
                self._progress_at = time.monotonic()  # the store has had nothing to answer until now
            self._pending[name] = _Push(name, mirror, last, files, staging, step)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="uploads", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if replaced and replaced.staging:
            shutil.rmtree(replaced.staging, ignore_errors=True)

    def check(self) -> None:
        """StorageUnavailable if the store has been away longer than the bound."""
        with self._cond:
            if self._failed is None and (self._busy or self._pending) and self._away() > self.outage_timeout_s:
                self._fail()
            if self._failed is not None:
                raise self._failed

    def wait(self) -> None:
        """Until everything pushed is in the store (StorageUnavailable if the store stays away)."""
        with self._cond:
            while self._busy or self._pending:
                self._cond.wait(timeout=1.0)
                if self._failed is None and self._away() > self.outage_timeout_s:
                    self._fail()
                if self._failed is not None:
                    raise self._failed
        self.check()

    def idle(self) -> bool:
        with self._cond:
            return not (self._busy or self._pending)

    def close(self) -> None:
        """Stop the thread (what is still queued is dropped: call wait() first to keep it)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        shutil.rmtree(self.workdir.path(".uploads"), ignore_errors=True)

    # --- the upload thread ----------------------------------------------------------------
    def _away(self) -> float:
        return time.monotonic() - self._progress_at

    def _progress(self) -> None:
        self._progress_at = time.monotonic()

    def _sent(self, job: _Push) -> None:
        """Every file of `job` is in the store, the index last: its checkpoint counts as saved."""
        if job.step is not None:
            with self._cond:
                self.saved = self.workdir.uri(job.name, f"ckpt-{job.step}")

    def _fail(self, cause: str | None = None) -> None:
        what = (f"cannot be written ({cause})" if cause else
                f"has not answered for {self.outage_timeout_s:g}s (storage.outage_timeout_s; {self._error or 'no reply'})")
        self._failed = StorageUnavailable(
            f"the workdir's store {self.workdir.location} {what}; the last checkpoint safe in it is "
            f"{self.saved or '(none)'}: rerun the same command to resume from it once the store is back")
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing or self._failed:
                    return
                job = self._pending.pop(next(iter(self._pending)))
                self._busy = job
            delay = FIRST_DELAY_S
            while True:
                try:
                    self.workdir.push(job.name, job.mirror, job.last, job.files, self._progress,
                                      sent=lambda job=job: self._sent(job))
                    break
                except Exception as err:  # noqa: BLE001 - OSError: the store; anything else ends the uploads too
                    with self._cond:
                        if not isinstance(err, OSError):  # not a passing fault of the store's: retrying cannot help
                            self._fail(f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
                        if self._failed or self._closing:  # the run has been told; nothing more to say
                            self._busy = None
                            self._cond.notify_all()
                            return
                        self._error = " ".join(str(err).split())[:200]
                        if not self._outage_logged:
                            self._outage_logged = True
                            log.warning("the workdir's store %s failed (%s); retrying for up to %gs "
                                        "(storage.outage_timeout_s) while training goes on",
                                        self.workdir.location, self._error, self.outage_timeout_s)
                        if self._away() > self.outage_timeout_s:
                            self._fail()
                        if self._failed or self._closing:
                            self._busy = None
                            self._cond.notify_all()
                            return
                        self._cond.wait(timeout=min(delay, max(self.outage_timeout_s - self._away(), 0.1)))
                    delay = min(delay * 2, MAX_DELAY_S)
            with self._cond:
                if self._outage_logged and not self._failed:
                    log.warning("the workdir's store %s answers again%s", self.workdir.location,
                                f"; checkpoint of step {job.step} is complete in it" if job.step is not None else "")
                self._outage_logged, self._error = False, None
                self._busy = None
                self._cond.notify_all()
            if job.staging:
                shutil.rmtree(job.staging, ignore_errors=True)
