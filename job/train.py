"""train_and_evaluate(config, workdir): the two-phase transfer-learning run.

Phase `head` trains a new classifier on the frozen backbone (on cached features when that
is exactly equivalent); phase `finetune` unfreezes the backbone, or its top layers, at a
low learning rate with warmup and cosine decay. Both run the same distributed step
(job.step). The global step lives in the checkpoint, so rerunning the same command resumes
at the right phase, step and batch.

`Run` is what every process builds before it writes anything (strategy, data sizes, model,
optimizers); `Trainer` runs a phase in chunks of steps and fires the periodic work (log,
checkpoint, validate, report) after each chunk; `train_and_evaluate` is the recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from job import COMMAND_START
from job import data as data_lib
from job.checkpoints import INDEX, Checkpoints
from job.config import Config, ConfigError
from job.distribute import (BARRIER_TIMEOUT_S, WorkerShare, check_gpus, configure_threads, devices_in_use, is_chief,
                            local_share, make_strategy, wait_for_all_workers, worker_index)
from job.errors import JobError, NonFiniteLoss, Preempted, StorageUnavailable
from job.phase_inputs import PhaseInputs, subset_examples
from job.model import TransferModel, build_model, set_backbone_trainable
from job.periodic import Every, chunk_length
from job.preemption import StopRequests, TfPreemptionNotice
from job.preprocess import model_input_fn
from job.resume import check_resume, check_saved_state, read_previous, start_fresh, write_run_files
from job.storage import Workdir
from job.uploads import Uploads
from job.step import (CORRECT, LOSS, SKIPPED, STOP, Phase, StepFunctions, global_batch_size, learning_rate_scale,
                      make_optimizer)
from job.telemetry import History, ProfilerWindow, Progress, Scalars, Throughput, unreachable_window

log = logging.getLogger(__name__)

# A head step on cached features is a small matmul, far cheaper than a host round trip:
# at least this many of them per tf.function call (calls still end at each validation).
CACHED_STEPS_PER_CALL = 100

# Called on every worker at each validation point (each epoch by default) and after each
# checkpoint: (metrics, the checkpoint this worker saved at this step, its local prefix, else
# None). job.launch builds Ray's reporting on it.
Reporter = Callable[[dict, Optional[str]], None]


def weights_digest(model: keras.Model) -> str:
    """sha256 of a model's weights: the same on every worker exactly when replicas are in sync."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def plan_phases(config: Config, train_size: int, global_batch: int) -> list[Phase]:
    """The two phases in global steps: epochs of each phase's share (its subset) of `train_size` examples."""
    phases, first = [], 0
    for name in ("head", "finetune"):
        phase_config = getattr(config.train, name)
        examples = subset_examples(train_size, phase_config.subset)
        steps_per_epoch = examples // global_batch
        if steps_per_epoch == 0 and phase_config.subset < 1:
            raise ConfigError(f"train.{name}.subset={phase_config.subset}: {examples} of the {train_size} examples "
                              f"of data.train_split {config.data.train_split!r}, fewer than a global batch "
                              f"({global_batch}); allowed: a share of at least {global_batch / train_size:.3g}")
        if steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={global_batch}: larger than data.train_split "
                              f"{config.data.train_split!r} ({examples} examples)")
        steps = int(round(phase_config.epochs * steps_per_epoch))
        phases.append(Phase(name, phase_config, first, steps, steps_per_epoch))
        first += steps
    return phases


class Run:
    """What every process builds before it trains, writing nothing: the strategy, the data
    sizes and phases, the model, the optimizers and the global step."""

    def __init__(self, config: Config, share: Optional[WorkerShare] = None):
        self.config = config
        # The launcher's grant (a Ray worker's CPUs and collective timeout); else the container's quota.
        self.share = share or local_share()
        self.threads = configure_threads(self.share.cpus, self.share.cpus_from)
        self.strategy = make_strategy(config.train, self.share.collective_timeout_s)
        check_gpus(config)
        self.devices = devices_in_use(self.strategy)
        self.chief = is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = global_batch_size(config.train, self.replicas)

        data = config.data
        self.info = data_lib.dataset_info(data, [data.train_split] + ([data.val_split] if data.val_split else []))
        self.phases = plan_phases(config, self.info.split_sizes[data.train_split], self.global_batch)
        # Same initial head (and, with weights=none, backbone) on every run and worker.
        keras.utils.set_random_seed(config.train.seed)
        lr_scale = learning_rate_scale(config.train, self.global_batch)
        with self.strategy.scope():
            self.model: TransferModel = build_model(config.model, self.info.num_classes, config.train.precision)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.optimizers = {}
            for phase in self.phases:
                optimizer = make_optimizer(phase, phase.steps_per_epoch, lr_scale, config.train.precision)
                # Built now so a restore fills its slots immediately rather than lazily.
                optimizer.build(self.trainable(phase))
                self.optimizers[phase.name] = optimizer
        self.inputs = PhaseInputs(config, self.strategy, self.info, self.phases, self.model, self.global_batch,
                                  self.preprocess)
    def record(self) -> dict:
        """The run's record (job.resume.RUN_RECORD): the global batch in use and what the model was trained on."""
        return {"global_batch": self.global_batch, "replicas": self.replicas, "dataset": self.config.data.name,
                "num_classes": self.info.num_classes, "class_names": list(self.info.class_names),
                "image_shape": list(self.info.image_shape), "input_pipelines": self.inputs.pipelines}

    @property
    def global_step(self) -> int:
        return int(self.step.numpy())

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model.classifier, step=self.step, **self.optimizers)

    def trainable(self, phase: Phase) -> list:
        if phase.name == "head":
            set_backbone_trainable(self.model, False)
            return self.model.head.trainable_variables
        set_backbone_trainable(self.model, phase.config.unfreeze)
        return self.model.classifier.trainable_variables

    def steps_per_call(self, phase: Phase) -> int:
        """Train steps per tf.function call: the setting, or at least CACHED_STEPS_PER_CALL on cached features."""
        per_call = self.config.train.steps_per_call
        return max(per_call, CACHED_STEPS_PER_CALL) if self.inputs.use_feature_cache(phase) else per_call

    def preprocess(self, images):
        """What the step does to a batch before the model: resize and scale when data.resize_on=device."""
        if self.config.data.resize_on == "device":
            return model_input_fn(self.config.data, self.config.model.image_size)(images)
        return images

    def step_functions(self, phase: Phase) -> StepFunctions:
        """The steps of `phase`: the head alone on cached features, else the whole classifier."""
        preprocess = lambda x: x  # noqa: E731 - cached inputs are ready
        if self.inputs.use_feature_cache(phase):
            forward = self.model.head
        elif self.inputs.use_frozen_cache(phase):
            top, head = self.inputs.split.top_features, self.model.head
            forward = lambda activations, training: head(top(activations), training=training)  # noqa: E731
        else:
            forward, preprocess = self.model.logits, self.preprocess
        return StepFunctions(self.strategy, forward, self.trainable(phase), self.optimizers[phase.name], preprocess,
                             self.global_batch, self.config.train.label_smoothing, self.step,
                             self.config.train.jit_compile, self.config.model.flip_tta)

class TrainWindow:
    """Step totals since the last log line."""

    def __init__(self):
        self.totals, self.steps, self.meter = np.zeros(4), 0, Throughput()

    def add(self, totals: np.ndarray, steps: int) -> None:
        self.totals += totals
        self.steps += steps
        self.meter.add(steps)

    def scalars(self, phase: str, global_batch: int) -> tuple[dict, float]:
        """The window's TensorBoard scalars and its count of skipped steps; starts a new window."""
        rate, step_ms = self.meter.read(global_batch)
        skipped = self.totals[SKIPPED]
        values = {f"{phase}/loss": self.totals[LOSS] / max(self.steps - skipped, 1),
                  f"{phase}/accuracy": self.totals[CORRECT] / (self.steps * global_batch),
                  f"{phase}/images_per_sec": rate, f"{phase}/step_time_ms": step_ms}
        self.totals, self.steps = np.zeros(4), 0
        return values, skipped


class Trainer:
    """One process's training: a `Run` plus the workdir's checkpoints, TensorBoard files,
    validation history and stop requests. Only the chief writes shared files."""

    def __init__(self, run: Run, workdir: Workdir, checkpoints: Checkpoints, stop: StopRequests,
                 reporter: Optional[Reporter] = None, uploads: Optional[Uploads] = None):
        self.run, self.workdir, self.checkpoints, self.stop, self.reporter = run, workdir, checkpoints, stop, reporter
        # The chief's uploads of a URI workdir, in the background (job.uploads).
        self.uploads = uploads or Uploads(workdir, run.config.storage.outage_timeout_s)
        self._holds = _test_holds()
        tel = run.config.telemetry
        self.scalars = Scalars(workdir.path("tensorboard") if run.chief else None)
        # Under <tensorboard>/<run>/plugins/profile, so the Profile tab lists it as that run.
        self.profile_run = "tensorboard/train" if run.chief else (
            f"tensorboard/worker_{worker_index(run.strategy)}" if tel.profile_all_workers else None)
        self.summary_path = workdir.path("summary.json")
        self.history = History(tel.accuracy_thresholds, self._previous_summary())

    def _previous_summary(self) -> dict:
        try:
            with open(self.summary_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # --- one phase -------------------------------------------------------------------
    def run_phase(self, phase: Phase) -> None:
        run, tel = self.run, self.run.config.telemetry
        position = run.global_step - phase.first_step
        cached = run.inputs.use_feature_cache(phase)
        steps = run.step_functions(phase)
        train_data, val_data = run.inputs.datasets(phase, position)
        iterator = iter(train_data)
        profiled = self.profile_run if tel.profile_phase == phase.name else None
        window = tel.profile_steps if tel.profile_phase == phase.name else None
        profiler = ProfilerWindow(profiled and self.workdir.path(profiled), window)
        log_every, eval_every = Every(tel.log_every_steps), Every(max(1, round(tel.eval_every_epochs * phase.steps_per_epoch)))
        save_every = Every(run.config.checkpoint.every_steps, origin=-phase.first_step)  # global steps
        per_call, window = run.steps_per_call(phase), TrainWindow()
        bar = Progress(phase.name, phase.steps, position, run.chief and tel.progress_bar, tel.progress_every_s)
        log.info("phase %s: steps %d..%d (%d per epoch), global batch %d, %d replicas, %s%s", phase.name, position,
                 phase.steps, phase.steps_per_epoch, run.global_batch, run.replicas,
                 "cached features" if cached else (
                     f"cached activations at {run.inputs.split.first_trainable} ({run.config.model.image_size}px)"
                     if run.inputs.use_frozen_cache(phase) else f"images at {run.config.model.image_size}px"),
                 "" if position == 0 else " (resumed)")
        try:
            while position < phase.steps:
                stop_vote = tf.constant(float(self.stop.requested()))
                if profiler.covers(position):
                    n = 1
                    totals = profiler.run_step(position, run.global_step,
                                               lambda: steps.train_step(iterator, stop_vote).numpy())
                else:
                    n = chunk_length(position, phase.steps, per_call,
                                     [eval_every.next_after(position), profiler.next_start(position)])
                    totals = steps.train_chunk(iterator, tf.constant(n), stop_vote).numpy()
                before, position = position, position + n
                profiler.after(position)
                bar.advance(n)
                window.add(totals, n)
                end = position == phase.steps
                # Steps the loss scaler skipped count their loss as 0: a non-finite sum means a
                # step whose update was applied diverged.
                if not math.isfinite(totals[LOSS]):
                    raise NonFiniteLoss(f"non-finite loss in phase {phase.name} at step {run.global_step}; stopped "
                                        f"without saving, last good checkpoint: {self.checkpoints.latest or 'none'}")
                if log_every.due(before, position) or end:
                    self._log(phase, steps, window, bar)
                stopping = bool(totals[STOP])
                eval_due = (eval_every.due(before, position) or end) and not stopping
                # Each validation checkpoints too, except on cached features: there an epoch takes
                # less time than a save, and resuming re-extracts the features anyway.
                saved = None
                if stopping or save_every.due(before, position) or end or (eval_due and not cached):
                    saved = self._save(phase)
                metrics = self._validate(phase, steps, val_data) if eval_due else None
                if saved or eval_due:
                    self._publish(phase, metrics, saved, stopping)
                if run.chief:  # a store away past storage.outage_timeout_s ends the run here
                    self.uploads.check()
                if run.global_step in self._holds and run.chief:
                    _hold(run.global_step)
                if stopping:
                    raise Preempted(self._stop_message(saved))
        finally:
            profiler.stop()
            bar.close()
            self.scalars.flush()
            if profiled and not self.run.chief:  # the chief's goes with the rest of tensorboard/
                self.workdir.push(profiled)

    def _stop_message(self, saved: str) -> str:
        why = self.stop.reason() or "another worker's stop request"
        return f"stopped by {why} at step {self.run.global_step}; checkpoint {saved}; rerun the same command to resume"

    def _log(self, phase: Phase, steps: StepFunctions, window: TrainWindow, bar) -> None:
        values, skipped = window.scalars(phase.name, self.run.global_batch)
        values[f"{phase.name}/learning_rate"] = float(keras.ops.convert_to_numpy(steps.optimizer.learning_rate))
        if steps.loss_scaled:
            values[f"{phase.name}/loss_scale"] = float(steps.optimizer.dynamic_scale.numpy())
            values[f"{phase.name}/skipped_steps"] = skipped
            if skipped and self.run.chief:
                log.warning("phase %s: %d of the last steps up to %d skipped by the loss scaler (non-finite gradients); "
                            "loss scale now %g", phase.name, skipped, self.run.global_step,
                            values[f"{phase.name}/loss_scale"])
        self.scalars.write("train", self.run.global_step, values)
        step_ms = values[f"{phase.name}/step_time_ms"]
        bar.report(values[f"{phase.name}/loss"], values[f"{phase.name}/images_per_sec"], 1000 / step_ms if step_ms else 0.0)

    def _save(self, phase: Phase) -> str:
        """Save a checkpoint (every worker takes part); the chief's path, or the worker's scratch one."""
        # A finite loss can come with an update that overflowed: never checkpoint such weights.
        if not all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in self.run.model.classifier.trainable_weights):
            raise NonFiniteLoss(f"non-finite weights in phase {phase.name} after step {self.run.global_step}; "
                                f"stopped without saving, last good checkpoint: {self.checkpoints.latest or 'none'}")
        return self.checkpoints.save(self.run.global_step)

    def _validate(self, phase: Phase, steps: StepFunctions, val_data) -> Optional[dict]:
        if val_data is None:
            return None
        metrics = steps.evaluate(val_data)
        self._record_validation(phase, metrics)
        return metrics

    def _publish(self, phase: Phase, metrics: Optional[dict], saved: Optional[str], stopping: bool = False) -> None:
        """After a validation point or a checkpoint: persist the checkpoint (Ray's reporter on
        Ray, else the workdir) and, after a validation, the TensorBoard files, so that a remote
        workdir can be followed while the run goes on."""
        if saved and self.run.chief:
            if self.workdir.remote:
                log.info("checkpoint of step %d saved, uploading to %s", self.run.global_step,
                         self.workdir.uri("checkpoints"))
            else:
                log.info("checkpoint of step %d saved in %s", self.run.global_step, self.workdir.path("checkpoints"))
            # The one copy in durable storage, Ray or not: the checkpoints folder of the workdir.
            self.uploads.push("checkpoints", mirror=True, last=(INDEX,), snapshot=True, step=self.run.global_step)
        if self.reporter:
            # Every worker: Ray's report is a barrier. Every validation point reports, validated
            # or not, so a Ray run has checkpoints even without a val split.
            report = {"phase": phase.name, "step": self.run.global_step, "total_steps": self.run.phases[-1].end,
                      "weights_sha256": weights_digest(self.run.model.classifier)}
            if metrics:
                report.update(val_accuracy=metrics["accuracy"], val_loss=metrics["loss"])
            if stopping:  # tells the launcher why the run ends here
                report["stopped"] = self.stop.reason() or "another worker's stop request"
            self.reporter(report, saved)
        if metrics and self.run.chief:
            self.uploads.push("tensorboard")

    def _record_validation(self, phase: Phase, metrics: dict) -> None:
        run, step = self.run, self.run.global_step
        elapsed = time.time() - COMMAND_START
        row = {"phase": phase.name, "step": step, "epoch": round((step - phase.first_step) / phase.steps_per_epoch, 3),
               "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"],
               "wall_seconds": round(elapsed, 1), "images_seen": step * run.global_batch}
        self.scalars.write("validation", step, {f"{phase.name}/accuracy": metrics["accuracy"],
                                                f"{phase.name}/loss": metrics["loss"]})
        for reached in self.history.record(row):
            percent = int(reached["threshold"] * 100)
            self.scalars.write("validation", step, {f"time_to_accuracy/{percent}pct_seconds": elapsed,
                                                    f"time_to_accuracy/{percent}pct_images": reached["images_seen"]})
        self.scalars.flush()
        if run.chief:
            log.info("validation %s step %d: accuracy %.4f loss %.4f (%.0fs since start)",
                     phase.name, step, metrics["accuracy"], metrics["loss"], elapsed)

    def finish(self, status: str) -> dict:
        """Once every worker is done with the run's collectives: write summary.json and persist
        what the workdir still lacks; the summary."""
        wait_for_all_workers(self.run.strategy, f"run {status}", self.run.share.collective_timeout_s or BARRIER_TIMEOUT_S)
        summary = self.write_summary(status)
        if self.run.chief:
            self.uploads.push("tensorboard")
            self.uploads.push("summary.json")
        self.uploads.wait()  # the end of a run, or a preemption, waits for the last upload
        return summary

    def write_summary(self, status: str) -> dict:
        run, rows = self.run, self.history.rows
        summary = {
            "status": status,
            "step": run.global_step,
            "total_steps": run.phases[-1].end,
            "global_batch": run.global_batch,
            "replicas": run.replicas,
            "strategy": type(run.strategy).__name__,
            "chief": run.chief,
            "devices": run.devices,
            "threads": run.threads,
            "images_seen": run.global_step * run.global_batch,
            "wall_seconds": round(time.time() - COMMAND_START, 1),
            "final_val_accuracy": rows[-1]["val_accuracy"] if rows else None,
            "time_to_accuracy": self.history.time_to_accuracy,
            "validation_history": rows,
        }
        if run.chief:
            tmp = self.summary_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, self.summary_path)
        return summary


def train_and_evaluate(config: Config, workdir: Optional[Workdir] = None, reporter: Optional[Reporter] = None,
                       restore_from: Optional[str] = None, stop_sources: tuple = (),
                       share: Optional[WorkerShare] = None, uploads: Optional[Uploads] = None) -> dict:
    """Train both phases, resuming from the newest checkpoint of `restore_from` (default: the
    workdir's); return the run summary.

    Without `workdir` this process opens config.workdir and, as the chief, holds it for the
    run; a launcher that passes one (job.launch) holds it itself.
    """
    run = Run(config, share)  # settings, data and weights are checked before anything is written
    own = workdir is None
    workdir = workdir or Workdir.open(config.workdir)
    with contextlib.ExitStack() as stack:
        if own:
            stack.callback(workdir.close)
        stack.enter_context(workdir.claimed(own and run.chief))
        if own:  # a remote workdir's checkpoints and history into local scratch (no-op for a path)
            workdir.pull("checkpoints")
            workdir.pull("summary.json")
        previous, changes = None, []
        if own:  # a launcher (job.launch) checks these before any worker starts
            previous = read_previous(workdir)[0]
            changes = check_resume(workdir, config, run.global_batch)
        # What the checkpoint holds against what these settings need: refused (one line) or
        # named before anything is written or restored (job.resume).
        source = restore_from or workdir.path("checkpoints")
        fresh = check_saved_state(run, source, previous, workdir.location)
        for change in changes:
            log.info("resuming with a changed setting: %s", change)
        checkpoints = stack.enter_context(Checkpoints(
            run.checkpoint(), workdir.path("checkpoints"), config.checkpoint.keep, run.chief))
        if isinstance(run.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            stop_sources = (*stop_sources, TfPreemptionNotice())
        stop = stack.enter_context(StopRequests(stop_sources))
        if uploads is None:
            uploads = Uploads(workdir, config.storage.outage_timeout_s)
            stack.callback(uploads.close)
        trainer = Trainer(run, workdir, checkpoints, stop, reporter, uploads)
        record_before = None
        if run.chief:
            record_before = read_previous(workdir)[1]  # before run.json is rewritten
            _write_config(config, run, workdir)
            t = run.threads
            log.info("devices: %s (%s, %d replicas); threads: %d intra-op, %d inter-op, %d tf.data (%s)",
                     ", ".join(run.devices), type(run.strategy).__name__, run.replicas, t["intra_op"], t["inter_op"],
                     t["tf_data"], t["from"])
            log.info("%s", run.inputs.statement())
        restored = checkpoints.restore_latest(source, fresh)
        if restored:
            if workdir.remote and source == workdir.path("checkpoints"):
                uploads.saved = workdir.uri("checkpoints", os.path.basename(restored))
            start_fresh(run, fresh)
            log.info("resumed from %s at step %d", restored, run.global_step)
            if note := _order_changed(record_before, run):
                log.warning("%s", note)
        try:
            for phase in run.phases:
                if run.global_step < phase.end:
                    trainer.run_phase(phase)
        except Preempted:
            trainer.finish("preempted")
            raise
        except JobError as err:
            if not isinstance(err, StorageUnavailable):  # e.g. a non-finite loss: what was saved before is good
                with contextlib.suppress(StorageUnavailable):
                    uploads.wait()
            raise
        return trainer.finish("finished")


def _test_holds() -> frozenset:
    """Steps at which the chief pauses (JOB_TEST_HOLD_STEPS=4,12, for tests that act on the
    store at a known point of a run: see _hold); none unless set."""
    steps = os.environ.get("JOB_TEST_HOLD_STEPS", "")
    return frozenset(int(s) for s in steps.split(",") if s.strip())


def _hold(step: int) -> None:
    """Write <JOB_TEST_HOLD_DIR>/held-<step>, then wait for <JOB_TEST_HOLD_DIR>/go-<step> (a test's cue)."""
    folder = os.environ["JOB_TEST_HOLD_DIR"]
    open(os.path.join(folder, f"held-{step}"), "w").close()
    while not os.path.exists(os.path.join(folder, f"go-{step}")):
        time.sleep(0.05)


def _order_changed(previous: Optional[dict], run: Run) -> Optional[str]:
    """Why a resume cannot continue exactly where the last run stopped, in examples; None if it can.

    Resume is exact when the examples are dealt to as many input pipelines as before (the same
    files, order and seeds). With another count (an elastic Ray restart) each pipeline reads
    other files, so the rest of the epoch under way is drawn anew."""
    before = (previous or {}).get("input_pipelines")
    if not before or before == run.inputs.pipelines:
        return None
    step = int(run.step.numpy())
    phase = next((p for p in run.phases if p.first_step <= step < p.end), None)
    if phase is None:
        return None
    seen = (step - phase.first_step) % phase.steps_per_epoch * run.global_batch
    return (f"resuming with {run.inputs.pipelines} input pipeline(s) where the interrupted run had {before}: the "
            f"examples are dealt to workers anew, so the rest of this {phase.name} epoch is a new draw: up to {seen} "
            f"examples (those seen before the interruption) may be seen twice in it and as many not at all; "
            "later epochs are whole")


def _write_config(config: Config, run: Run, workdir: Workdir) -> None:
    """The resolved config and the run's record into the workdir; a warning if the profile
    window lies beyond its phase."""
    write_run_files(workdir, config, run.record())
    tel = config.telemetry
    profiled = next(p for p in run.phases if p.name == tel.profile_phase)
    if problem := unreachable_window(tel.profile_steps, profiled.name, profiled.steps):
        log.warning("%s", problem)
