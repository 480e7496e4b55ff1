"""Checkpoints that survive crashes.

TensorFlow's CheckpointManager writes a checkpoint's files before it updates the
`checkpoint` index, so a crash mid-save leaves the previous checkpoint as the latest.
Restoring tries the newest checkpoint first and falls back past unreadable ones; it lists
them from the index and from the ckpt-<N>.index files beside it, because TensorFlow treats a
garbled index as "no checkpoints" (a run would silently start over) and fails on an empty one.
Under MultiWorkerMirroredStrategy every worker must take part in a save; only the chief
writes into the workdir, the others into a temporary directory that is deleted.

Everything that knows how a checkpoint directory is laid out lives here: finding, restoring,
saving, and copying the newest checkpoint between directories (Ray's reported copies).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from typing import Optional

import tensorflow as tf

from job.errors import CheckpointNotSaved, NoReadableCheckpoint

log = logging.getLogger(__name__)


def _reason(err: Exception) -> str:
    """'No space left on device' out of TF's '{{function_node ...}} path; No space left on device [Op:SaveV2]'."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.rsplit("; ", 1)[-1].split(" [Op:")[0].strip()


INDEX = "checkpoint"  # TensorFlow's index file: the newest checkpoint and those kept


def _step_of(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


def checkpoints_to_try(directory: str) -> list[str]:
    """Checkpoint prefixes in `directory`, newest first: those the index lists and any complete
    ckpt-<N> beside it (TF renames a checkpoint into place only once it is fully written)."""
    if not os.path.isdir(directory):
        return []
    try:
        state = tf.train.get_checkpoint_state(directory)
        listed = list(state.all_model_checkpoint_paths) if state else []
    except ValueError:  # an empty index file; a garbled one TF only warns about and reads as none
        listed = []
    on_disk = [m[1] for name in os.listdir(directory) if (m := re.fullmatch(r"(ckpt-\d+)\.index", name))]
    paths = {os.path.join(directory, os.path.basename(p)) for p in listed} | {os.path.join(directory, p) for p in on_disk}
    return sorted(paths, key=_step_of, reverse=True)


def checkpoint_step(directory: str) -> Optional[int]:
    """Step of the newest checkpoint in `directory` (saved as ckpt-<step>), or None."""
    candidates = checkpoints_to_try(directory)
    return _step_of(candidates[0]) if candidates else None


def copy_latest_checkpoint(source: str, destination: str) -> int:
    """Copy only the newest checkpoint of `source` (data, index and an index file naming it)
    into `destination`; returns its step."""
    candidates = checkpoints_to_try(source)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {source}")
    prefix = os.path.basename(candidates[0])
    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        if name.startswith(prefix + "."):
            shutil.copy2(os.path.join(source, name), destination)
    # The CheckpointState CheckpointManager reads, by TensorFlow's own writer (atomic: a
    # temporary file renamed into place). A timestamp after last_preserved_timestamp makes the
    # manager list (and later rotate) this checkpoint. Written last: a crash before this leaves
    # `destination` pointing at what it had. An absolute directory keeps the path as given,
    # relative to it (TF would rewrite it against a relative one).
    tf.compat.v1.train.update_checkpoint_state(os.path.abspath(destination), prefix, [prefix],
                                               all_model_checkpoint_timestamps=[time.time()],
                                               last_preserved_timestamp=0)
    return _step_of(prefix)


def adopt_checkpoint(source: str, directory: str) -> bool:
    """Make `source`'s newest checkpoint the latest of `directory` unless that one is as new."""
    theirs, ours = checkpoint_step(source), checkpoint_step(directory)
    if theirs is None or (ours is not None and ours >= theirs):
        return False
    copy_latest_checkpoint(source, directory)
    return True


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str, partial: bool = False) -> Optional[str]:
    """Restore the newest checkpoint of `directory` that reads back, warning about broken ones;
    None if there is none. `partial`: the checkpoint may hold more (e.g. optimizer slots)."""
    candidates = checkpoints_to_try(directory)
    for path in candidates:
        try:
            status = checkpoint.restore(path)
            (status.expect_partial() if partial else status).assert_existing_objects_matched()
            return path
        except Exception as err:  # noqa: BLE001 - a damaged file fails as OpError, IndexError, ValueError...
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                        path, type(err).__name__, (str(err).splitlines() or [""])[0][:160])
    if candidates:
        # Starting from scratch would soon rotate these away: the user decides, not the job.
        raise NoReadableCheckpoint(
            f"none of the {len(candidates)} checkpoints in {directory} reads back "
            "(see the warnings above); move them away to start over")
    return None


def _open_manager(checkpoint: tf.train.Checkpoint, directory: str, keep: int) -> tf.train.CheckpointManager:
    """The chief's manager. An index file TF cannot even open is set aside first (the checkpoints
    stay; restore_newest finds them by name) rather than stopping every rerun."""
    try:
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    except ValueError as err:
        index = os.path.join(directory, INDEX)
        os.replace(index, index + ".unreadable")
        log.warning("checkpoint index %s is unreadable (%s); moved it to %s.unreadable", index, err, index)
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)


class Checkpoints:
    """Save every N steps and restore the newest readable checkpoint; a context manager that
    frees a non-chief's scratch directory however the run ends."""

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, keep: int, chief: bool):
        # Only the chief writes `directory`; the others save into scratch (every worker must
        # take part in a save) and restore from the chief's checkpoints or another source.
        self._scratch = None if chief else tempfile.mkdtemp(prefix="ckpt-worker-")
        self.directory = directory if chief else self._scratch
        self._checkpoint = checkpoint
        self.manager = _open_manager(checkpoint, self.directory, keep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def latest(self) -> Optional[str]:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        try:
            return self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as err:
            # TF writes into <prefix>_temp and renames only when complete, and updates the index
            # last: a failed save leaves the previous checkpoint the latest. Free the partial files.
            shutil.rmtree(os.path.join(self.directory, f"ckpt-{step}_temp"), ignore_errors=True)
            raise CheckpointNotSaved(
                f"checkpoint of step {step} could not be written to {self.directory} ({_reason(err)}); "
                f"the previous checkpoint {self.latest or '(none)'} is intact: fix that and rerun to resume from it"
            ) from None

    def restore_latest(self, source: str) -> Optional[str]:
        """Restore the newest checkpoint of `source` that reads back; warn about and skip broken ones."""
        return restore_newest(self._checkpoint, source)

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
