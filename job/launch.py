"""train_on_ray(config): the same two-phase run on a Ray cluster through Ray Train.

`ray.train.tensorflow.TensorflowTrainer` starts `ray.num_workers` actors and sets TF_CONFIG
on each; inside, `train.strategy=auto` picks MultiWorkerMirroredStrategy (mirrored over a
worker's own GPUs, all-reduce across workers) and `job.train.train_and_evaluate` runs its
usual custom step. The global batch is train.per_replica_batch_size x replicas when set,
and train.lr_scaling=linear scales the learning rates by global_batch / base_batch_size.

Where things live (docs/ray.md says why):
  workdir       config.workdir made absolute. Only the chief (Ray rank 0 = TF worker 0)
                writes it: TensorBoard, profiles, checkpoints, summary.json; the driver
                exports into it at the end. On a multi-node cluster it belongs on storage
                every node mounts at the same path (as does data.data_dir).
  storage_path  ray.storage_path, else <workdir>/ray: Ray's copy of each reported
                checkpoint (the newest ray.keep_checkpoints kept). A restarted worker
                group resumes from the newest one, even on a node whose local workdir is empty.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Optional

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.collective import broadcast_from_rank_zero
from ray.train.tensorflow import TensorflowTrainer

from job import COMMAND_START
from job.checkpoints import adopt_checkpoint, checkpoint_step, copy_latest_checkpoint
from job.config import Config, RayConfig
from job.errors import ConfigError, JobError

log = logging.getLogger(__name__)

# Set on the driver, needed by the workers wherever Ray starts them (offline data and weights).
FORWARDED_ENV = ("TFDS_DATA_DIR", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")


class ReplicasDiverged(RuntimeError):
    """A worker's weights differ from rank 0's after the same step: the all-reduce is broken."""


# --- inside each Ray worker ------------------------------------------------------
def _report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
    """job.train's reporter under Ray: every worker calls it at the same step (ray.train.report
    is a barrier), with its own checkpoint directory when a checkpoint was saved at this step.

    Each worker checks its weights against rank 0's and, with a checkpoint, adds
    `replicas/rank-<k>.json` (its step and weights digest) to it: Ray merges every worker's
    files into one checkpoint directory, so the replicas' agreement is on record beside the
    weights (rank 0 alone adds the TF checkpoint).
    """
    rank = ray.train.get_context().get_world_rank()
    reference = broadcast_from_rank_zero(metrics["weights_sha256"])
    if metrics["weights_sha256"] != reference:
        raise ReplicasDiverged(f"step {metrics['step']}: rank {rank} weights sha256 {metrics['weights_sha256'][:12]} "
                               f"!= rank 0's {reference[:12]}")
    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ray-report-") as snapshot:
        if rank == 0:
            copy_latest_checkpoint(checkpoint_dir, snapshot)
        os.makedirs(os.path.join(snapshot, "replicas"))
        with open(os.path.join(snapshot, "replicas", f"rank-{rank}.json"), "w") as f:
            json.dump({"rank": rank, "step": metrics["step"], "weights_sha256": metrics["weights_sha256"]}, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(snapshot),
                         checkpoint_dir_name=f"checkpoint_step{metrics['step']:07d}")


def _resume_from_ray(checkpoints_dir: str) -> None:
    """Before training on the chief: take Ray's newest reported checkpoint if the workdir lacks it."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        ray_step, local_step = checkpoint_step(directory), checkpoint_step(checkpoints_dir)
        if adopt_checkpoint(directory, checkpoints_dir):
            log.info("restored Ray checkpoint %s (step %s) into %s", checkpoint.path, ray_step, checkpoints_dir)
        else:
            log.info("Ray checkpoint %s is at step %s; the workdir's own, at step %s, is at least as new: resuming from it",
                     checkpoint.path, ray_step, local_step)


def _worker_loop(payload: dict) -> None:
    """train_loop_per_worker: one MultiWorkerMirroredStrategy worker."""
    # Ray's TF backend sets this for legacy tf.keras (Keras 2); the job is Keras 3 throughout.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import tensorflow as tf

    from job.train import train_and_evaluate

    config = Config.model_validate(payload["config"])
    if not config.ray.use_gpu:
        # Size TF's op pool to the CPUs Ray gave this worker, not to the whole machine.
        tf.config.threading.set_intra_op_parallelism_threads(max(1, round(config.ray.cpus_per_worker)))
    context = ray.train.get_context()
    checkpoints_dir = os.path.join(config.workdir, "checkpoints")
    if context.get_world_rank() == 0:
        _resume_from_ray(checkpoints_dir)
    # Every worker restores the chief's checkpoint from the workdir (job.checkpoints), so all
    # must see the same one: after rank 0 has put Ray's there, on storage they all share.
    chief_step = broadcast_from_rank_zero(checkpoint_step(checkpoints_dir))
    if checkpoint_step(checkpoints_dir) != chief_step:
        raise ConfigError(f"workdir={config.workdir!r}: rank {context.get_world_rank()} sees checkpoint step "
                          f"{checkpoint_step(checkpoints_dir)}, rank 0 step {chief_step}; on a multi-node cluster "
                          "the workdir must be on storage every node mounts at the same path (docs/ray.md)")
    summary = train_and_evaluate(config, config.workdir, _report)
    log.info("rank %d done: step %d, %s over %d replicas", context.get_world_rank(), summary["step"],
             summary["strategy"], summary["replicas"])


# --- on the driver ---------------------------------------------------------------
def scaling_config(ray_config: RayConfig) -> ScalingConfig:
    resources = {"CPU": ray_config.cpus_per_worker, **ray_config.resources_per_worker}
    if ray_config.use_gpu:
        resources["GPU"] = ray_config.gpus_per_worker
    return ScalingConfig(num_workers=ray_config.num_workers, use_gpu=ray_config.use_gpu,
                         resources_per_worker=resources, placement_strategy=ray_config.placement_strategy)


def storage_path(config: Config) -> str:
    return os.path.abspath(config.ray.storage_path or os.path.join(config.workdir, "ray"))


def worker_runtime_env() -> dict:
    return {"env_vars": {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}}


def run_config(config: Config) -> RunConfig:
    return RunConfig(
        name=config.ray.name,
        storage_path=storage_path(config),
        failure_config=FailureConfig(max_failures=config.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.ray.keep_checkpoints),
        worker_runtime_env=worker_runtime_env(),
    )


def _connect(ray_config: RayConfig) -> bool:
    """Connect to ray.address / RAY_ADDRESS, else start Ray in this process; True if we started it."""
    if ray.is_initialized():
        return False
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    # An embedded single-node Ray ("local": never one found some other way): no dashboard.
    ray.init(address="local", include_dashboard=False)
    return True


def _check_inputs(payload: dict) -> Optional[Exception]:
    """On a node where workers run: the error of job.preflight.check_inputs, returned (not raised,
    which Ray would wrap in its own traceback) so the driver raises it as itself."""
    from job.preflight import check_inputs

    try:
        check_inputs(Config.model_validate(payload), "train")
    except JobError as err:
        return err
    return None


def preflight(config: Config) -> None:
    """Check data and weights in one task shaped like a worker, before the worker group starts:
    Ray Train restarts a failed group ray.max_failures times whatever the error, so bad input
    would otherwise fail that many times over, each after every worker has started TensorFlow."""
    ray_config = config.ray
    task = ray.remote(_check_inputs).options(
        num_cpus=ray_config.cpus_per_worker, num_gpus=ray_config.gpus_per_worker if ray_config.use_gpu else 0,
        resources=ray_config.resources_per_worker, runtime_env=worker_runtime_env(), max_retries=0)
    problem = ray.get(task.remote(config.model_dump(mode="json")))
    if problem is not None:
        raise problem


def _user_error(err: Exception) -> Exception:
    """The first worker failure that is a JobError (bad input, a non-finite loss), so the CLI reports it as such."""
    for failure in getattr(err, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)  # Ray may wrap it in a RayTaskError
        if isinstance(cause, JobError):
            return cause
    return err


def _read_summary(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_summary(workdir: str, summary: dict) -> None:
    tmp = os.path.join(workdir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, os.path.join(workdir, "summary.json"))


def train_on_ray(config: Config) -> dict:
    """Train on Ray workers, then export from the final checkpoint; returns the run summary."""
    from job.export import export

    config = config.model_copy(deep=True)
    config.workdir = os.path.abspath(config.workdir)
    os.makedirs(config.workdir, exist_ok=True)
    started_ray = _connect(config.ray)
    try:
        preflight(config)
        trainer = TensorflowTrainer(
            _worker_loop,
            train_loop_config={"config": config.model_dump(mode="json")},
            scaling_config=scaling_config(config.ray),
            run_config=run_config(config),
        )
        log.info("Ray Train: %d workers x (%s CPU, %s GPU), storage %s", config.ray.num_workers,
                 config.ray.cpus_per_worker, config.ray.gpus_per_worker if config.ray.use_gpu else 0, storage_path(config))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise _user_error(err) from err
    finally:
        if started_ray:
            ray.shutdown()

    checkpoints_dir = os.path.join(config.workdir, "checkpoints")
    if result.checkpoint is not None:
        # A no-op when the workdir is shared with the chief; otherwise the export needs it here.
        with result.checkpoint.as_directory() as directory:
            adopt_checkpoint(directory, checkpoints_dir)
    export_path = export(config, config.workdir)

    metrics = result.metrics or {}
    summary = _read_summary(config.workdir)
    if summary.get("step", -1) < metrics.get("step", -1):  # the chief's summary.json is not visible here
        summary = {"step": metrics["step"], "final_val_accuracy": metrics.get("val_accuracy")}
    summary.update(status="finished", wall_seconds=round(time.time() - COMMAND_START, 1), export=export_path,
                   ray={"workers": config.ray.num_workers, "storage_path": storage_path(config), "name": config.ray.name,
                        "checkpoint": result.checkpoint.path if result.checkpoint else None,
                        "last_report": metrics})
    # The chief has finished: the driver adds what only it knows (Ray's view, the driver's wall time).
    _write_summary(config.workdir, summary)
    return summary
