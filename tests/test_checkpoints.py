"""Restoring past damaged checkpoints and damaged index files, in training and in export."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from job.checkpoints import INDEX, Checkpoints
from job.config import load_config
from job.errors import NoReadableCheckpoint
from job.export import restore_classifier
from job.model import build_model


def _two_checkpoints(directory):
    """ckpt-1 holding 1.0 and ckpt-2 holding 2.0, saved as the job saves them."""
    value = tf.Variable(0.0)
    checkpoint = tf.train.Checkpoint(value=value)
    manager = tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=3)
    for step in (1, 2):
        value.assign(float(step))
        manager.save(checkpoint_number=step)
    value.assign(0.0)
    return value, checkpoint


@pytest.mark.parametrize("index_text", ["", 'model_checkpoint_path: "ckpt-2"\nall_model_che\x00garbage{{'])
def test_a_damaged_index_still_resumes_from_the_newest_checkpoint(tmp_path, index_text, caplog):
    value, checkpoint = _two_checkpoints(tmp_path)
    (tmp_path / INDEX).write_text(index_text)
    try:
        tf_sees = tf.train.latest_checkpoint(str(tmp_path))
    except ValueError:
        tf_sees = None
    assert tf_sees is None  # what TensorFlow alone makes of it: no checkpoints, start over

    with caplog.at_level(logging.WARNING):
        checkpoints = Checkpoints(checkpoint, str(tmp_path), keep=3, chief=True)
        assert checkpoints.restore_latest(str(tmp_path)) == str(tmp_path / "ckpt-2")
    assert value.numpy() == 2.0
    # Training goes on: the next save writes a good index; no finished checkpoint is deleted.
    checkpoints.save(3)
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-3")
    assert all((tmp_path / f"ckpt-{n}.index").is_file() for n in (1, 2, 3))
    if index_text == "":  # TF cannot even open an empty one: set aside, with a warning
        assert (tmp_path / f"{INDEX}.unreadable").is_file()
        assert "checkpoint index" in caplog.text and "unreadable" in caplog.text


def test_a_worker_reads_past_an_empty_index_without_writing(tmp_path):
    value, checkpoint = _two_checkpoints(tmp_path)
    (tmp_path / INDEX).write_text("")
    before = sorted(os.listdir(tmp_path))
    worker = Checkpoints(checkpoint, str(tmp_path), keep=3, chief=False)
    assert worker.restore_latest(str(tmp_path)) == str(tmp_path / "ckpt-2") and value.numpy() == 2.0
    worker.close()
    assert sorted(os.listdir(tmp_path)) == before


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _, checkpoint = _two_checkpoints(tmp_path)
    for data in tmp_path.glob("*.data-*"):
        data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(NoReadableCheckpoint, match="none of the 2 checkpoints"):
        Checkpoints(checkpoint, str(tmp_path), keep=3, chief=True).restore_latest(str(tmp_path))


def test_export_restores_past_a_damaged_latest_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    config = load_config(None, [f"workdir={workdir}", "data.data_dir=/nonexistent/tfds", "model.image_size=32",
                                "model.alpha=0.35", "model.weights=none", "model.dropout=0.0"])
    model = build_model(config.model, 10)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model.classifier), str(workdir / "checkpoints"), 3)
    kernel = model.head.weights[0]
    saved = {}
    for step in (1, 2):
        kernel.assign(tf.fill(kernel.shape, float(step)))
        saved[step] = kernel.numpy()
        manager.save(checkpoint_number=step)
    data = next((workdir / "checkpoints").glob("ckpt-2.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    with tfds.testing.mock_data(num_examples=8):
        restored, path, _ = restore_classifier(config, str(workdir))
    assert path == str(workdir / "checkpoints" / "ckpt-1")
    np.testing.assert_array_equal(restored.head.weights[0].numpy(), saved[1])


def _model_and_optimizer(optimizer: str, trainable: int):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    for layer in model.layers[:-trainable]:
        layer.trainable = False
    opt = keras.optimizers.SGD(momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    return tf.train.Checkpoint(model=model, step=tf.Variable(7, dtype=tf.int64), opt=opt)


def test_layout_of_a_save_is_known_before_it_and_tells_which_object_differs(tmp_path, caplog):
    from job.checkpoints import layout_differences, needed_layout, restore_newest, saved_layout

    saved = _model_and_optimizer("adam", trainable=2)
    tf.train.CheckpointManager(saved, str(tmp_path), max_to_keep=3).save(checkpoint_number=7)
    layout, step = saved_layout(str(tmp_path / "ckpt-7"))
    assert step == 7 and layout == needed_layout(saved)
    # Another optimizer, or another set of trained variables: only the optimizer differs.
    for optimizer, trainable in (("sgd", 2), ("adam", 1)):
        other = _model_and_optimizer(optimizer, trainable)
        assert set(layout_differences(layout, needed_layout(other))) == {"opt"}
        # Restored without it: the weights come back, nothing is called unreadable, no TF warning.
        with caplog.at_level(logging.WARNING):
            assert restore_newest(other, str(tmp_path), fresh=frozenset({"opt"})) == str(tmp_path / "ckpt-7")
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        for mine, theirs in zip(other.model.weights, saved.model.weights):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
