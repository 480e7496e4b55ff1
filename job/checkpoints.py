"""Checkpoints that survive crashes.

TensorFlow's CheckpointManager writes a checkpoint's files before it updates the
`checkpoint` index, so a crash mid-save leaves the previous checkpoint as the latest.
Restoring tries the newest checkpoint first and falls back past unreadable ones; it lists
them from the index and from the ckpt-<N>.index files beside it, because TensorFlow treats a
garbled index as "no checkpoints" (a run would silently start over) and fails on an empty one.
Under MultiWorkerMirroredStrategy every worker must take part in a save; only the chief
writes into the workdir, the others into a temporary directory that is deleted.

Before a checkpoint is restored, what it holds is compared with what the objects restoring it
need: the layout of each top-level object (model, step, one optimizer per phase) read from
the checkpoint's object graph and variable list (its index file only, no tensor data), against
the same layout of the new objects, computed without writing anything. A difference is state
that other settings shaped (an optimizer's slots, which variables it trains, a loss scaler);
job.resume decides what to do about it, before any restore, and such a checkpoint is never
called unreadable. "Unreadable" is kept for damage: an index that does not parse, a missing
or truncated data file. Restores always say expect_partial(), so TensorFlow never prints its
per-variable "could not be found" warnings; whether everything needed was restored is checked
by the layout comparison and by assert_existing_objects_matched.

Everything that knows how a checkpoint directory is laid out lives here: finding, restoring
and saving. A URI workdir's checkpoints go to the store from local scratch (job.uploads):
the files of each checkpoint first, this `checkpoint` index last.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
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


# --- what a checkpoint holds, against what the objects restoring it need --------------------------

# {top-level object: {path of a variable inside it: (shape, dtype, the model path of the same
# variable when it is shared with the model, e.g. an optimizer's reference to a weight it trains)}}
Layout = dict

_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_IGNORED = ("save_counter",)  # created by the first save, not part of what a run needs


def _layout(roots, children, variable) -> Layout:
    """Layout of an object graph: `roots` the [(name, node)] of its root, `children(node)` the
    same for any node, `variable(node)` its (shape, dtype) or None; nodes are compared by
    identity (`is`-equal objects, or equal ids)."""
    def walk(root) -> dict:
        paths, queue = {_identity(root): ((), root)}, [root]
        for node in queue:  # breadth first: the same structure names every variable the same way
            for name, child in children(node):
                if _identity(child) not in paths:
                    paths[_identity(child)] = ((*paths[_identity(node)][0], name), child)
                    queue.append(child)
        return paths

    objects = {name: walk(node) for name, node in roots if name not in _IGNORED}
    in_model = {key: path for key, (path, _) in objects.get("model", {}).items()}
    layout = {}
    for name, paths in objects.items():
        entries = {}
        for key, (path, node) in paths.items():
            if (value := variable(node)) is not None:
                entries["/".join(path)] = (*value, "/".join(in_model[key]) if name != "model" and key in in_model else None)
        layout[name] = entries
    return layout


def _identity(node):
    return node if isinstance(node, int) else id(node)


def saved_layout(path: str) -> tuple[Layout, Optional[int]]:
    """(layout, saved global step) of checkpoint `path`, from its index file alone; raises on a
    damaged or missing index."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(path)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()

    def variable(node_id: int):
        for attribute in graph.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE" and attribute.checkpoint_key in shapes:
                return tuple(shapes[attribute.checkpoint_key]), dtypes[attribute.checkpoint_key].name
        return None

    def children(node_id: int):
        return [(child.local_name, child.node_id) for child in graph.nodes[node_id].children]

    step_key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    step = int(reader.get_tensor(step_key)) if step_key in shapes else None
    return _layout(children(0), children, variable), step


def needed_layout(checkpoint: tf.train.Checkpoint) -> Layout:
    """The layout a save of `checkpoint` would write, from its objects (nothing written or read)."""
    import keras
    from tensorflow.python.checkpoint import graph_view

    view = graph_view.ObjectGraphView(checkpoint)

    def children(node):
        return [(ref.name, ref.ref) for ref in view.list_children(node)]

    def variable(node):
        if isinstance(node, (tf.Variable, keras.Variable)):
            return tuple(node.shape), tf.as_dtype(node.dtype).name
        return None

    return _layout(children(checkpoint), children, variable)


def layout_differences(saved: Layout, needed: Layout, names=None) -> dict[str, str]:
    """{object: what differs, in a few words} for the objects of `needed` (or `names`) whose saved state differs."""
    differences = {}
    for name in (names if names is not None else needed):
        have, want = saved.get(name), needed.get(name, {})
        if have is None:
            differences[name] = "not in the checkpoint"
        elif have != want:
            changed = sum(1 for key in set(have) & set(want) if have[key] != want[key])
            differences[name] = (f"{len(have)} variables saved, {len(want)} needed"
                                 + (f", {changed} of another shape or variable" if changed else ""))
    return differences


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str, partial: bool = False,
                   fresh: frozenset = frozenset()) -> Optional[str]:
    """Restore the newest checkpoint of `directory` that reads back, warning about damaged ones;
    None if there is none. `partial`: only the objects of `checkpoint` (e.g. the model alone)
    are wanted from a checkpoint that holds more. `fresh`: top-level objects (optimizers) left
    as they are, not restored. A checkpoint whose state does not fit the objects restored (other
    settings shaped it; job.resume has named them) is skipped with a warning that says so."""
    candidates, other_state = checkpoints_to_try(directory), 0
    needed = needed_layout(checkpoint) if candidates else {}
    wanted = [name for name in needed if name not in fresh]
    for path in candidates:
        try:
            saved, _ = saved_layout(path)
        except Exception as err:  # noqa: BLE001 - a damaged index fails as DataLossError, NotFoundError...
            _unreadable(path, err)
            continue
        if differences := layout_differences(saved, needed, wanted):
            log.warning("checkpoint %s holds state these settings do not have (%s); falling back to the previous one",
                        path, "; ".join(f"{name}: {why}" for name, why in differences.items()))
            other_state += 1
            continue
        reader = tf.train.Checkpoint(**{name: getattr(checkpoint, name) for name in wanted}) if fresh else checkpoint
        try:
            # The layouts match, so anything not restored below is a damaged file, not a setting;
            # expect_partial: TensorFlow's per-variable warnings never reach the console.
            reader.restore(path).expect_partial().assert_existing_objects_matched()
            return path
        except Exception as err:  # noqa: BLE001 - a damaged file fails as OpError, IndexError, ValueError...
            _unreadable(path, err)
    if candidates and other_state == len(candidates):
        raise NoReadableCheckpoint(
            f"none of the {len(candidates)} checkpoints in {directory} holds state these settings can restore "
            "(see the warnings above): set them back, or use another workdir")
    if candidates:
        # Starting from scratch would soon rotate these away: the user decides, not the job.
        raise NoReadableCheckpoint(
            f"none of the {len(candidates)} checkpoints in {directory} reads back "
            "(see the warnings above); move them away to start over")
    return None


def _unreadable(path: str, err: Exception) -> None:
    log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                path, type(err).__name__, (str(err).splitlines() or [""])[0][:160])


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

    def restore_latest(self, source: str, fresh: frozenset = frozenset()) -> Optional[str]:
        """Restore the newest checkpoint of `source` that reads back, but for the `fresh` objects;
        warn about and skip broken ones."""
        return restore_newest(self._checkpoint, source, fresh=fresh)

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
