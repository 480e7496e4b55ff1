"""train_and_evaluate(config, workdir): the two-phase transfer-learning run.

Phase `head` trains a new classifier on the frozen backbone (on cached features when that
is exactly equivalent); phase `finetune` unfreezes the backbone, or its top layers, at a
low learning rate with warmup and cosine decay. Both run the same custom distributed step
(`tf.function` + `strategy.run`), because Keras 3 `fit` breaks under
MultiWorkerMirroredStrategy. The global step lives in the checkpoint, so rerunning the
same command resumes at the right phase, step and batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from job import COMMAND_START
from job import data as data_lib
from job.checkpoints import Checkpoints, claim_workdir
from job.config import Config, ConfigError, PhaseConfig, dump_config
from job.distribute import is_chief, make_strategy, set_precision, worker_index
from job.model import TransferModel, build_model, set_backbone_trainable
from job.telemetry import ProfilerWindow, Scalars, Throughput, progress

log = logging.getLogger(__name__)

# Feature extraction is inference only: batches of at least this many images.
EXTRACT_BATCH = 256
# A head step on cached features is a small matmul, far cheaper than a host round trip:
# at least this many of them per tf.function call (calls still end at each validation).
CACHED_STEPS_PER_CALL = 100
# Per replica, when evaluating cached features.
FEATURE_EVAL_BATCH = 1024


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops without overwriting good checkpoints."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary."""


# A hook called on every worker at each epoch end, after validation if any:
# (metrics, checkpoint_dir on the chief or None). job.launch builds Ray's on it.
Reporter = Callable[[dict, Optional[str]], None]


def weights_digest(model: keras.Model) -> str:
    """sha256 of a model's weights: the same on every worker exactly when replicas are in sync."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    config: PhaseConfig
    first_step: int  # global step at which the phase starts
    steps: int

    @property
    def end(self) -> int:
        return self.first_step + self.steps


def plan_phases(config: Config, steps_per_epoch: int) -> list[Phase]:
    phases, first = [], 0
    for name in ("head", "finetune"):
        phase_config = getattr(config.train, name)
        steps = int(round(phase_config.epochs * steps_per_epoch))
        phases.append(Phase(name, phase_config, first, steps))
        first += steps
    return phases


def global_batch_size(config: Config, replicas: int) -> int:
    train = config.train
    if train.per_replica_batch_size:
        return train.per_replica_batch_size * replicas
    if train.batch_size % replicas:
        raise ConfigError(
            f"train.batch_size={train.batch_size}: must be divisible by the {replicas} replicas in sync "
            "(or set train.per_replica_batch_size)"
        )
    return train.batch_size


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


def _agree_on_finite(grads):
    """Make every replica see non-finite gradients if any replica has them.

    LossScaleOptimizer decides to skip a step from its own replica's gradients; replicas
    that disagree would run different collectives and hang. Returns (grads, skipped).
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    # ReduceOp has only SUM and MEAN: count the replicas with non-finite gradients.
    non_finite = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32)
    )
    # Every replica returns its share, so the SUM over replicas counts a skipped step once.
    skipped = tf.cast(non_finite > 0, tf.float32) / tf.distribute.get_replica_context().num_replicas_in_sync
    poison = tf.where(non_finite > 0, float("nan"), 0.0)
    return [g + tf.cast(poison, g.dtype) for g in grads], skipped


class StepFunctions:
    """The distributed train and eval steps for `forward(inputs, training) -> logits`
    (the whole model on images, or the head alone on cached features)."""

    def __init__(self, strategy, forward, variables: list, optimizer, preprocess, global_batch: int,
                 label_smoothing: float, step_counter: tf.Variable, jit_compile: bool):
        self.strategy, self.forward, self.optimizer = strategy, forward, optimizer
        self.preprocess, self.global_batch = preprocess, global_batch
        self.label_smoothing, self.step_counter = label_smoothing, step_counter
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.variables = variables
        # XLA compiles the forward and backward pass; the optimizer update, with its
        # cross-replica all-reduce, stays outside the cluster.
        self._gradients = tf.function(self._compute_gradients, jit_compile=jit_compile, reduce_retracing=True)
        self.train_chunk = tf.function(self._train_chunk)
        self.eval_batch = tf.function(self._eval_batch)

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

    def _replica_step(self, inputs, labels):
        grads, loss, correct = self._gradients(inputs, labels)
        skipped = tf.constant(0.0)
        if self.loss_scaled:
            grads, skipped = _agree_on_finite(grads)
            # A skipped step's loss is often inf/NaN: keep it out of the logged mean.
            loss = tf.where(skipped > 0, tf.zeros_like(loss), loss)
        self.optimizer.apply(grads, self.variables)
        return loss, correct, skipped

    def _train_chunk(self, iterator, steps):
        """`steps` train steps in one call: fewer host round trips per step."""
        total = tf.zeros([3])
        for _ in tf.range(steps):
            inputs, labels = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(inputs, labels))
            total += tf.stack([self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica])
        self.step_counter.assign_add(tf.cast(steps, tf.int64))
        return total  # [sum of mean losses, correct predictions, skipped steps]

    def _replica_eval(self, inputs, labels):
        logits = self.forward(self.preprocess(inputs), training=False)
        predicted = tf.argmax(logits, -1, output_type=tf.int32)
        return (
            tf.reduce_sum(self._per_example_loss(labels, logits)),
            tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)),
            tf.cast(tf.shape(labels)[0], tf.float32),
        )

    def _eval_batch(self, inputs, labels):
        per_replica = self.strategy.run(self._replica_eval, args=(inputs, labels))
        return tf.stack([self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica])

    def evaluate(self, dist_dataset) -> dict:
        total = np.zeros(3)
        for inputs, labels in dist_dataset:
            total += self.eval_batch(inputs, labels).numpy()
        loss_sum, correct, count = total
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "examples": int(count)}


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries (main thread only)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. inside a Ray worker): Ray handles it
            pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Run:
    """State of one train_and_evaluate call: strategy, model, data, checkpoints, telemetry."""

    def __init__(self, config: Config, workdir: str, reporter: Optional[Reporter]):
        self.config, self.workdir, self.reporter = config, workdir, reporter
        self.strategy = make_strategy(config.train)
        set_precision(config.train.precision)
        self.chief = is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = global_batch_size(config, self.replicas)
        self.lr_scale = self.global_batch / config.train.base_batch_size if config.train.lr_scaling == "linear" else 1.0

        data = config.data
        splits = [data.train_split] + ([data.val_split] if data.val_split else [])
        self.info = data_lib.dataset_info(data, splits)
        train_size = self.info.split_sizes[data.train_split]
        self.steps_per_epoch = train_size // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={self.global_batch}: larger than data.train_split "
                              f"{data.train_split!r} ({train_size} examples)")
        self.phases = plan_phases(config, self.steps_per_epoch)

        # Same initial head (and, with weights=none, backbone) on every run and worker.
        keras.utils.set_random_seed(config.train.seed)
        with self.strategy.scope():
            m = config.model
            self.model: TransferModel = build_model(m.image_size, m.alpha, m.weights, self.info.num_classes, m.dropout,
                                                          m.fold_batchnorm)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.optimizers = {}
            for phase in self.phases:
                optimizer = make_optimizer(phase, self.steps_per_epoch, self.lr_scale, config.train.precision)
                # Built now so a restore fills its slots immediately rather than lazily.
                optimizer.build(self._trainable(phase))
                self.optimizers[phase.name] = optimizer
        # Settings, data and weights are good: only now is the workdir created (and locked).
        self.lock = claim_workdir(workdir, self.chief)
        checkpoint = tf.train.Checkpoint(model=self.model.classifier, step=self.step, **self.optimizers)
        self.checkpoints = Checkpoints(checkpoint, os.path.join(workdir, "checkpoints"), config.checkpoint.keep, self.chief)
        tb_dir = os.path.join(workdir, "tensorboard")
        self.scalars = Scalars(tb_dir if self.chief else None)
        profile_all = config.telemetry.profile_all_workers
        # Under <tensorboard>/<run>/plugins/profile, so the Profile tab lists it as that run.
        self.profile_dir = os.path.join(tb_dir, "train") if self.chief else (
            os.path.join(tb_dir, f"worker_{worker_index(self.strategy)}") if profile_all else None)
        self.summary_path = os.path.join(workdir, "summary.json")
        self.time_to_accuracy = self._load_summary().get("time_to_accuracy", [])
        self.history: list[dict] = []
        self._extract = None  # the traced feature-extraction step, built on first use

    # --- phases -----------------------------------------------------------------
    def _trainable(self, phase: Phase) -> list:
        if phase.name == "head":
            set_backbone_trainable(self.model, False)
            return self.model.head.trainable_variables
        set_backbone_trainable(self.model, phase.config.unfreeze)
        return self.model.classifier.trainable_variables

    def use_feature_cache(self, phase: Phase) -> bool:
        setting = self.config.train.cache_features
        return phase.name == "head" and (setting is True or (setting == "auto" and self.config.augment_for("head") == "none"))

    def steps_per_call(self, phase: Phase) -> int:
        """Train steps per tf.function call: the setting, or at least CACHED_STEPS_PER_CALL on cached features."""
        per_call = self.config.train.steps_per_call
        return max(per_call, CACHED_STEPS_PER_CALL) if self.use_feature_cache(phase) else per_call

    def _device_preprocess(self):
        if self.config.data.resize_on == "device":
            size = self.config.model.image_size
            return lambda images: data_lib.to_model_input(images, size)
        return lambda images: images

    # --- data -------------------------------------------------------------------
    def _distribute(self, make_dataset):
        """make_dataset(per_replica_batch, input_context) -> tf.data.Dataset, per input pipeline."""
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: make_dataset(ctx.get_per_replica_batch_size(self.global_batch), ctx)
        )

    @staticmethod
    def _skip_batches(phase_step: int, ctx: tf.distribute.InputContext) -> int:
        # Each input pipeline hands one per-replica batch to each of its local replicas per step.
        return phase_step * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)

    def image_datasets(self, phase: Phase, phase_step: int):
        d, m, seed = self.config.data, self.config.model, self.config.train.seed
        augment = self.config.augment_for(phase.name)
        train = self._distribute(lambda b, ctx: data_lib.train_dataset(
            d, d.train_split, b, m.image_size, seed, self._skip_batches(phase_step, ctx), ctx, augment))
        val = self._distribute(lambda b, ctx: data_lib.eval_dataset(d, d.val_split, b, m.image_size, ctx)) if d.val_split else None
        return train, val

    def _extract_features(self, split: str):
        """Pooled backbone features of this worker's shard of `split`, computed once."""
        d, size = self.config.data, self.config.model.image_size
        # Inference only, so batches larger than training's are cheap in memory and amortise
        # per-call overhead; a multiple of the replica count so every replica gets the same share.
        batch = self.replicas * max(self.global_batch // self.replicas, EXTRACT_BATCH // self.replicas, 1)
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: data_lib.eval_dataset(d, split, ctx.get_per_replica_batch_size(batch), size, ctx))
        if self._extract is None:
            preprocess, features = self._device_preprocess(), self.model.features
            self._extract = tf.function(lambda images, labels: self.strategy.run(
                lambda x, y: (features(preprocess(x)), y), args=(images, labels)))
            # Traced once, for any batch size (the element spec's batch dimension is None):
            # every split and its partial last batch reuse it. A trace costs a second or so.
            self._extract.get_concrete_function(*dataset.element_spec)

        features, labels = [], []
        for images, batch_labels in dataset:
            f, y = self._extract(images, batch_labels)
            features += [tf.cast(t, tf.float32) for t in self.strategy.experimental_local_results(f)]
            labels += list(self.strategy.experimental_local_results(y))
        return tf.concat(features, 0), tf.concat(labels, 0)

    def feature_datasets(self, phase_step: int):
        d, seed = self.config.data, self.config.train.seed
        started = time.perf_counter()
        train_features = self._extract_features(d.train_split)
        val_features = self._extract_features(d.val_split) if d.val_split else None
        log.info("cached backbone features of %d training images in %.1fs",
                 int(train_features[0].shape[0]), time.perf_counter() - started)

        def train_fn(batch, ctx):
            # Shuffle indices, not 5 KB feature rows, and gather a whole batch at once. Same
            # seed, buffer and count as the image pipeline, so the same order as images.
            count = int(train_features[1].shape[0])
            ds = tf.data.Dataset.range(count).shuffle(d.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
            ds = ds.batch(batch, drop_remainder=True).skip(self._skip_batches(phase_step, ctx))
            ds = ds.map(lambda index: (tf.gather(train_features[0], index), tf.gather(train_features[1], index)),
                        num_parallel_calls=data_lib.AUTOTUNE)
            return data_lib.without_autotune_model(ds.prefetch(data_lib.AUTOTUNE))

        train = self._distribute(train_fn)
        # Evaluating cached features is a matmul: one large batch per replica, not many small ones.
        val = self.strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensor_slices(val_features).batch(FEATURE_EVAL_BATCH)) if val_features else None
        return train, val

    def phase_datasets(self, phase: Phase, phase_step: int):
        """(train, val) distributed datasets of `phase`: cached features or images."""
        return self.feature_datasets(phase_step) if self.use_feature_cache(phase) else self.image_datasets(phase, phase_step)

    def step_functions(self, phase: Phase) -> StepFunctions:
        """The steps of `phase`: the head alone on cached features, else the whole classifier."""
        cached = self.use_feature_cache(phase)
        variables = self._trainable(phase)
        forward = self.model.head if cached else self.model.logits
        preprocess = (lambda x: x) if cached else self._device_preprocess()
        return StepFunctions(self.strategy, forward, variables, self.optimizers[phase.name], preprocess, self.global_batch,
                             self.config.train.label_smoothing, self.step, self.config.train.jit_compile)

    # --- bookkeeping ----------------------------------------------------------------
    def _load_summary(self) -> dict:
        try:
            with open(self.summary_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _record_validation(self, phase: Phase, metrics: dict) -> None:
        step = int(self.step.numpy())
        elapsed = time.time() - COMMAND_START
        images_seen = step * self.global_batch
        row = {"phase": phase.name, "step": step, "epoch": round((step - phase.first_step) / self.steps_per_epoch, 3),
               "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"],
               "wall_seconds": round(elapsed, 1), "images_seen": images_seen}
        self.history.append(row)
        self.scalars.write("validation", step, {f"{phase.name}/accuracy": metrics["accuracy"], f"{phase.name}/loss": metrics["loss"]})
        reached = {r["threshold"] for r in self.time_to_accuracy}
        for threshold in self.config.telemetry.accuracy_thresholds:
            if threshold not in reached and metrics["accuracy"] >= threshold:
                self.time_to_accuracy.append({"threshold": threshold, "wall_seconds": round(elapsed, 1),
                                              "images_seen": images_seen, "step": step, "phase": phase.name})
                self.scalars.write("validation", step, {f"time_to_accuracy/{int(threshold * 100)}pct_seconds": elapsed,
                                                        f"time_to_accuracy/{int(threshold * 100)}pct_images": images_seen})
        self.scalars.flush()
        if self.chief:
            log.info("validation %s step %d: accuracy %.4f loss %.4f (%.0fs since start)",
                     phase.name, step, metrics["accuracy"], metrics["loss"], elapsed)

    def _save(self, phase: Phase) -> Optional[str]:
        # A finite loss can come with an update that overflowed: never checkpoint such weights.
        if not all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in self.model.classifier.trainable_weights):
            raise NonFiniteLoss(f"non-finite weights in phase {phase.name} after step {int(self.step.numpy())}; "
                                f"stopped without saving, last good checkpoint: {self.checkpoints.latest or 'none'}")
        path = self.checkpoints.save(int(self.step.numpy()))
        return path if self.chief else None

    # --- the loop ---------------------------------------------------------------
    def run_phase(self, phase: Phase, stop: _StopSignals) -> None:
        cfg, tel = self.config, self.config.telemetry
        phase_step = int(self.step.numpy()) - phase.first_step
        cached = self.use_feature_cache(phase)
        steps = self.step_functions(phase)
        train_data, val_data = self.phase_datasets(phase, phase_step)
        iterator = iter(train_data)
        profiler = ProfilerWindow(self.profile_dir if tel.profile_phase == phase.name else None, tel.profile_steps)
        meter, bar = Throughput(), progress(phase.name, phase.steps, phase_step, self.chief and tel.progress_bar)
        log.info("phase %s: steps %d..%d (%d per epoch), global batch %d, %d replicas, %s%s", phase.name, phase_step,
                 phase.steps, self.steps_per_epoch, self.global_batch, self.replicas,
                 "cached features" if cached else f"images at {cfg.model.image_size}px", "" if phase_step == 0 else " (resumed)")
        eval_every = max(1, int(round(tel.eval_every_epochs * self.steps_per_epoch)))
        per_call = self.steps_per_call(phase)
        window = np.zeros(3)
        window_steps = 0
        try:
            while phase_step < phase.steps:
                to_eval = eval_every - phase_step % eval_every
                n = min(per_call, to_eval, phase.steps - phase_step)
                profiler.before(phase_step)
                with profiler.trace(int(self.step.numpy())) if profiler.active else contextlib.nullcontext():
                    totals = steps.train_chunk(iterator, tf.constant(n)).numpy()
                before, phase_step = phase_step, phase_step + n
                profiler.after(phase_step)
                meter.add(n)
                bar.update(n)
                window += totals
                window_steps += n
                # Steps the loss scaler skipped count their loss as 0 (and are counted below): a
                # non-finite sum means a step whose update was applied diverged.
                if not math.isfinite(totals[0]):
                    raise NonFiniteLoss(
                        f"non-finite loss in phase {phase.name} at step {int(self.step.numpy())}; stopped without saving, "
                        f"last good checkpoint: {self.checkpoints.latest or 'none'}")
                if phase_step // tel.log_every_steps > before // tel.log_every_steps or phase_step == phase.steps:
                    rate, step_ms = meter.read(self.global_batch)
                    lr = float(keras.ops.convert_to_numpy(steps.optimizer.learning_rate))
                    skipped = window[2]
                    scalars = {f"{phase.name}/loss": window[0] / max(window_steps - skipped, 1),
                               f"{phase.name}/accuracy": window[1] / (window_steps * self.global_batch),
                               f"{phase.name}/learning_rate": lr, f"{phase.name}/images_per_sec": rate,
                               f"{phase.name}/step_time_ms": step_ms}
                    if steps.loss_scaled:
                        scalars[f"{phase.name}/loss_scale"] = float(steps.optimizer.dynamic_scale.numpy())
                        scalars[f"{phase.name}/skipped_steps"] = skipped
                        if skipped and self.chief:
                            log.warning("phase %s: %d of steps %d..%d skipped by the loss scaler (non-finite gradients); "
                                        "loss scale now %g", phase.name, skipped, int(self.step.numpy()) - window_steps + 1,
                                        int(self.step.numpy()), scalars[f"{phase.name}/loss_scale"])
                    self.scalars.write("train", int(self.step.numpy()), scalars)
                    bar.set_postfix(loss=f"{scalars[f'{phase.name}/loss']:.3f}", img_s=f"{rate:.0f}", refresh=False)
                    window, window_steps = np.zeros(3), 0
                eval_due = phase_step % eval_every == 0 or phase_step == phase.steps
                checkpoint_due = self.step.numpy() // cfg.checkpoint.every_steps > (self.step.numpy() - n) // cfg.checkpoint.every_steps
                # Each validation checkpoints too, except on cached features: there an epoch takes
                # less time than a save, and resuming re-extracts the features anyway.
                saved = eval_due and not cached or checkpoint_due or stop.received or phase_step == phase.steps
                if saved:
                    path = self._save(phase)
                    if stop.received:
                        raise Preempted(f"stopped by signal {stop.received} at step {int(self.step.numpy())}; "
                                        f"checkpoint {path or self.checkpoints.latest}; rerun the same command to resume")
                metrics = None
                if eval_due and val_data is not None:
                    metrics = steps.evaluate(val_data)
                    self._record_validation(phase, metrics)
                if eval_due and self.reporter:
                    # Every epoch, validated or not, so a Ray run has checkpoints even without a val split.
                    report = {"phase": phase.name, "step": int(self.step.numpy()),
                              "weights_sha256": weights_digest(self.model.classifier)}
                    if metrics:
                        report.update(val_accuracy=metrics["accuracy"], val_loss=metrics["loss"])
                    self.reporter(report, self.checkpoints.directory if self.chief and saved else None)
        finally:
            profiler.stop()
            bar.close()
            self.scalars.flush()

    def write_summary(self, status: str) -> dict:
        history = self._load_summary().get("validation_history", []) + self.history
        summary = {
            "status": status,
            "step": int(self.step.numpy()),
            "total_steps": self.phases[-1].end,
            "global_batch": self.global_batch,
            "replicas": self.replicas,
            "strategy": type(self.strategy).__name__,
            "images_seen": int(self.step.numpy()) * self.global_batch,
            "wall_seconds": round(time.time() - COMMAND_START, 1),
            "final_val_accuracy": history[-1]["val_accuracy"] if history else None,
            "time_to_accuracy": self.time_to_accuracy,
            "validation_history": history,
        }
        if self.chief:
            tmp = self.summary_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, self.summary_path)
        return summary


def train_and_evaluate(config: Config, workdir: Optional[str] = None, reporter: Optional[Reporter] = None) -> dict:
    """Train both phases (resuming from the workdir's checkpoint if any); return the run summary."""
    workdir = workdir or config.workdir
    run = Run(config, workdir, reporter)  # checks everything before it writes to the workdir
    with run.lock, _StopSignals() as stop:
        if run.chief:
            with open(os.path.join(workdir, "config.yaml"), "w") as f:
                f.write(dump_config(config))
        restored = run.checkpoints.restore_latest()
        if restored:
            log.info("resumed from %s at step %d", restored, int(run.step.numpy()))
        try:
            for phase in run.phases:
                if int(run.step.numpy()) < phase.end:
                    run.run_phase(phase, stop)
        except Preempted:
            run.write_summary("preempted")
            run.checkpoints.close()
            raise
        summary = run.write_summary("finished")
        run.checkpoints.close()
    return summary
