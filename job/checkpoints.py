"""Checkpoints that survive crashes, and a lock so two runs never share a workdir.

TensorFlow's CheckpointManager writes a checkpoint's files before it updates the
`checkpoint` index, so a crash mid-save leaves the previous checkpoint as the latest.
Under MultiWorkerMirroredStrategy every worker must take part in a save; only the chief
writes into the workdir, the others into a temporary directory that is deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

log = logging.getLogger(__name__)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """An advisory flock on <workdir>/.lock holding the owner's pid; released on exit or crash."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, ".lock")
        self._file = None

    def __enter__(self):
        self._file = open(self._path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise WorkdirBusy(f"workdir {os.path.dirname(self._path)!r} is in use by a live run (pid {owner}); "
                              "wait for it, stop it, or choose another workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class Checkpoints:
    """Save every N steps and restore the newest readable checkpoint."""

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, keep: int, chief: bool):
        self._scratch = None if chief else tempfile.mkdtemp(prefix="ckpt-worker-")
        self.directory = directory if chief else self._scratch
        self._checkpoint = checkpoint
        self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=keep)

    @property
    def latest(self) -> Optional[str]:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> Optional[str]:
        """Restore the newest checkpoint that reads back; warn about and skip broken ones."""
        for path in reversed(self.manager.checkpoints):
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except (tf.errors.OpError, AssertionError, ValueError) as err:
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                            path, str(err).splitlines()[0][:160])
        return None

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
