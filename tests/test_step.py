"""The train step's one all-reduce: Keras's own must stay the identity, or the step refuses to trace."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.step import KERAS_ALL_REDUCE, StepFunctions, _apply_reduced_gradients
from tests.conftest import REPO, job_env


def _steps(optimizer, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        optimizer.build(model.trainable_variables)
        counter = tf.Variable(0, dtype=tf.int64)
    steps = StepFunctions(strategy, lambda x, training: model(x, training=training), model.trainable_variables,
                          optimizer, lambda x: x, 4, 0.0, counter, jit_compile=False)
    data = tf.data.Dataset.from_tensors((tf.ones([4, 3]), tf.constant([0, 1, 0, 1]))).repeat()
    return steps, iter(strategy.experimental_distribute_dataset(data)), model


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_the_step_applies_gradients_through_the_replaced_keras_all_reduce(loss_scaled):
    optimizer = keras.optimizers.SGD(0.1)
    if loss_scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    steps, iterator, model = _steps(optimizer)
    before = model.get_weights()[0].copy()
    steps.train_step(iterator, tf.constant(0.0)).numpy()
    assert steps._reduced.calls >= 1 and not np.allclose(model.get_weights()[0], before)


def test_a_keras_without_the_all_reduce_hook_is_refused(monkeypatch):
    optimizer = keras.optimizers.SGD(0.1)
    monkeypatch.setattr(type(optimizer), KERAS_ALL_REDUCE, None, raising=False)
    with pytest.raises(RuntimeError, match=KERAS_ALL_REDUCE):
        _apply_reduced_gradients(optimizer)


def test_a_keras_that_no_longer_calls_the_hook_fails_at_trace_time(monkeypatch):
    """As if an upgrade all-reduced under another name: the step must not train (twice-summed gradients)."""
    optimizer = keras.optimizers.SGD(0.1)
    steps, iterator, _ = _steps(optimizer)
    cls = type(optimizer)
    original = cls._backend_update_step

    def renamed(self, grads, variables, learning_rate):
        saved = self.__dict__.pop(KERAS_ALL_REDUCE)
        try:
            return original(self, grads, variables, learning_rate)
        finally:
            self.__dict__[KERAS_ALL_REDUCE] = saved

    monkeypatch.setattr(cls, "_backend_update_step", renamed)
    with pytest.raises(RuntimeError, match="without calling"):
        steps.train_step(iterator, tf.constant(0.0))


def test_two_step_functions_on_one_optimizer_share_the_hook():
    optimizer = keras.optimizers.SGD(0.1)
    first, iterator, _ = _steps(optimizer)
    second, _, _ = _steps(optimizer)
    assert first._reduced is second._reduced
    first.train_step(iterator, tf.constant(0.0)).numpy()  # traced after the second was built


MIRRORED = """
import keras, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.test_step import _steps
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
steps, iterator, model = _steps(optimizer, strategy)
before = model.get_weights()[0].copy()
steps.train_step(iterator, tf.constant(0.0)).numpy()
assert strategy.num_replicas_in_sync == 2 and steps._reduced.calls >= 2
assert not np.allclose(model.get_weights()[0], before)
"""


def test_loss_scaling_under_mirrored_strategy_applies_through_the_hook():
    """LossScaleOptimizer over 2 replicas applies through a merge_call, in threads other than the
    replicas' own: the trace-time check must still see Keras call the hook (a fresh process:
    logical CPU devices are set before TensorFlow starts)."""
    result = subprocess.run([sys.executable, "-c", MIRRORED], cwd=REPO, env=job_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
