"""The distributed train and eval steps, their optimizers, and the global batch.

One code path for one device, MirroredStrategy and MultiWorkerMirroredStrategy: a
`tf.function` runs `strategy.run(replica_step)` (Keras 3 `fit` breaks under
MultiWorkerMirroredStrategy). Each replica computes gradients on its share of the global
batch; then ONE all-reduce per step sums the gradients together with the step's loss,
correct predictions and two flags (non-finite gradients, a stop request). So every replica
applies the same update, every replica agrees whether the loss scaler skips it, every
worker learns the metrics and whether anyone asked to stop, and no other collective runs.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import keras
import numpy as np
import tensorflow as tf

from job.config import PhaseConfig, TrainConfig
from job.errors import ConfigError

# Positions in the vector a train step returns (summed over the steps of a chunk).
LOSS, CORRECT, SKIPPED, STOP = range(4)


def global_batch_size(train: TrainConfig, replicas: int) -> int:
    if train.per_replica_batch_size:
        return train.per_replica_batch_size * replicas
    if train.batch_size % replicas:
        raise ConfigError(
            f"train.batch_size={train.batch_size}: must be divisible by the {replicas} replicas in sync "
            "(or set train.per_replica_batch_size)"
        )
    return train.batch_size


def learning_rate_scale(train: TrainConfig, global_batch: int) -> float:
    """What the configured learning rates are multiplied by at this global batch (train.lr_scaling)."""
    ratio = global_batch / train.base_batch_size
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[train.lr_scaling]


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    config: PhaseConfig
    first_step: int  # global step at which the phase starts
    steps: int
    steps_per_epoch: int  # of the phase's share of the train split (its config.subset)

    @property
    def end(self) -> int:
        return self.first_step + self.steps


def make_optimizer(phase: Phase, steps_per_epoch: int, lr_scale: float, precision: str):
    cfg = phase.config
    peak = cfg.learning_rate * lr_scale
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(phase.steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(phase.steps - warmup, 1),
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )
    if cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, name=f"{phase.name}_sgd")
    elif cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, name=f"{phase.name}_adamw")
    else:
        optimizer = keras.optimizers.Adam(schedule, name=f"{phase.name}_adam")
    if precision == "mixed_float16":
        # float16 gradients underflow without it; bfloat16 has float32's range and needs none.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, name=f"{phase.name}_loss_scale")
    return optimizer


# Keras's (private) TensorFlow-backend hook that all-reduces gradients inside `apply`.
KERAS_ALL_REDUCE = "_all_reduce_sum_gradients"


class _AlreadyReduced:
    """Stands in for Keras's all-reduce: gradients pass unchanged, and each call is counted so
    the step can check, when it is traced, that Keras really went through it. One count for
    all threads: MirroredStrategy traces replicas in threads, and LossScaleOptimizer may apply
    them in threads of a merge_call, so a replica's own apply may be counted in another thread;
    a Keras that stopped calling the hook leaves the count unchanged in every one."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self, grads_and_vars):
        with self._lock:
            self.calls += 1
        return list(grads_and_vars)


def _apply_reduced_gradients(optimizer) -> _AlreadyReduced:
    """Let `optimizer` take gradients already summed over replicas.

    Keras all-reduces inside `apply`, after LossScaleOptimizer has decided from its own
    replica's gradients alone whether to skip the step (replicas that disagree would then
    run different collectives and hang). The step sums them itself, with the metrics in the
    same collective, so Keras's own all-reduce becomes the identity. That hook is private:
    if a Keras upgrade renamed it, gradients would be summed twice (the learning rate
    silently multiplied by the replica count). So it must exist here, and every traced
    `apply` must have called it (`StepFunctions._replica_step` checks, at trace time).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(installed := vars(inner).get(KERAS_ALL_REDUCE), _AlreadyReduced):
        return installed  # another StepFunctions on the same optimizer: one hook, one count
    if not callable(getattr(type(inner), KERAS_ALL_REDUCE, None)):
        raise RuntimeError(f"Keras {keras.__version__}: {type(inner).__name__} has no {KERAS_ALL_REDUCE}, which "
                           "job/step.py replaces so that gradients are all-reduced once; see _apply_reduced_gradients")
    hook = _AlreadyReduced()
    setattr(inner, KERAS_ALL_REDUCE, hook)
    return hook


class StepFunctions:
    """The distributed train and eval steps for `forward(inputs, training) -> logits`
    (the whole model on images, or the head alone on cached features)."""

    def __init__(self, strategy, forward, variables: list, optimizer, preprocess, global_batch: int,
                 label_smoothing: float, step_counter: tf.Variable, jit_compile: bool, flip_tta: bool = False):
        self.strategy, self.forward, self.optimizer = strategy, forward, optimizer
        self.preprocess, self.global_batch = preprocess, global_batch
        self.label_smoothing, self.step_counter = label_smoothing, step_counter
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.flip_tta = flip_tta
        self.variables = variables
        self._reduced = _apply_reduced_gradients(optimizer)
        # XLA compiles the forward and backward pass; the all-reduce and the optimizer update stay outside.
        self._gradients = tf.function(self._compute_gradients, jit_compile=jit_compile, reduce_retracing=True)
        # `steps` steps in one call: fewer host round trips per step.
        self.train_chunk = tf.function(self._train_chunk)
        # One step per call, with no loop inside: what the profiler needs to see step times.
        self.train_step = tf.function(self._one_step)
        # Built by evaluate() for the dataset's element_spec (batch dimension unknown), so a
        # partial last batch does not trace the forward pass a second time.
        self._eval_fn, self._eval_spec = None, None

    def _per_example_loss(self, labels, logits):
        one_hot = tf.one_hot(labels, tf.shape(logits)[-1])
        return keras.losses.categorical_crossentropy(
            one_hot, logits, from_logits=True, label_smoothing=self.label_smoothing
        )

    def _compute_gradients(self, inputs, labels):
        inputs = self.preprocess(inputs)
        with tf.GradientTape() as tape:
            logits = self.forward(inputs, training=True)
            # Averaged over the global batch: summed across replicas it is the global mean.
            loss = tf.nn.compute_average_loss(self._per_example_loss(labels, logits), global_batch_size=self.global_batch)
            scaled = self.optimizer.scale_loss(loss) if self.loss_scaled else loss
        grads = tape.gradient(scaled, self.variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return grads, loss, correct

    def _replica_step(self, inputs, labels, stop):
        grads, loss, correct = self._gradients(inputs, labels)
        non_finite = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.float32)
        # One collective: the gradients and [loss, correct, non-finite replicas, stop votes].
        *grads, sums = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [*grads, tf.stack([loss, correct, non_finite, stop])])
        skipped = tf.cast(sums[2] > 0, tf.float32) if self.loss_scaled else tf.constant(0.0)
        # The loss scaler sees the summed gradients: non-finite on every replica or on none.
        calls = self._reduced.calls
        self.optimizer.apply(grads, self.variables)
        if self._reduced.calls == calls:  # Python, at trace time: costs nothing per step
            raise RuntimeError(f"Keras {keras.__version__} applied gradients without calling {KERAS_ALL_REDUCE}: it may "
                               "all-reduce them a second time; see job/step.py _apply_reduced_gradients")
        # A skipped step's loss is often inf/NaN: keep it out of the logged mean. (In float32
        # a non-finite loss stays, and the host stops the run.)
        loss_sum = tf.where(skipped > 0, 0.0, sums[0])
        return tf.stack([loss_sum, sums[1], skipped, tf.cast(sums[3] > 0, tf.float32)])

    def _one_step(self, iterator, stop):
        inputs, labels = next(iterator)
        per_replica = self.strategy.run(self._replica_step, args=(inputs, labels, stop))
        self.step_counter.assign_add(1)
        # Reduced inside the step, so identical on every replica: take this worker's first.
        return self.strategy.experimental_local_results(per_replica)[0]

    def _train_chunk(self, iterator, steps, stop):
        """[sum of mean losses, correct predictions, skipped steps, steps with a stop vote] over `steps` steps."""
        totals = tf.zeros([4])
        for _ in tf.range(steps):
            totals += self._one_step(iterator, stop)
        return totals

    def _eval_logits(self, inputs):
        """Logits; with flip test-time augmentation, the log of the mean of the image's and its
        mirror image's probabilities (cached inputs come as (plain, mirrored) pairs; images are
        mirrored here, before upscaling)."""
        if not self.flip_tta:
            return self.forward(self.preprocess(inputs), training=False)
        plain, mirrored = inputs if isinstance(inputs, tuple) else (inputs, tf.reverse(inputs, axis=[2]))
        probabilities = [tf.nn.softmax(self.forward(self.preprocess(x), training=False)) for x in (plain, mirrored)]
        return tf.math.log(tf.maximum((probabilities[0] + probabilities[1]) / 2, 1e-12))

    def _replica_eval(self, inputs, labels):
        logits = self._eval_logits(inputs)
        predicted = tf.argmax(logits, -1, output_type=tf.int32)
        sums = tf.stack([tf.reduce_sum(self._per_example_loss(labels, logits)),
                         tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)),
                         tf.cast(tf.shape(labels)[0], tf.float32)])
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)

    def _eval_batch(self, inputs, labels):
        return self.strategy.experimental_local_results(self.strategy.run(self._replica_eval, args=(inputs, labels)))[0]

    def evaluate(self, dist_dataset) -> dict:
        spec = dist_dataset.element_spec
        if self._eval_fn is None or spec != self._eval_spec:
            self._eval_fn = tf.function(self._eval_batch, input_signature=list(spec))
            self._eval_spec = spec
        total = np.zeros(3)
        for inputs, labels in dist_dataset:
            total += self._eval_fn(inputs, labels).numpy()
        loss_sum, correct, count = total
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "examples": int(count)}
