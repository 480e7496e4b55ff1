"""train_on_ray(config): the same two-phase run on a Ray cluster through Ray Train.

`ray.train.tensorflow.TensorflowTrainer` starts `ray.num_workers` actors and sets TF_CONFIG
on each; inside, `train.strategy=auto` picks MultiWorkerMirroredStrategy (mirrored over a
worker's own GPUs, all-reduce across workers) and `job.train.train_and_evaluate` runs its
usual custom step. The global batch is train.per_replica_batch_size x replicas when set,
and train.lr_scaling=linear scales the learning rates by global_batch / base_batch_size.

Where things live (docs/ray.md says why):
  workdir       an s3:// or gs:// URI, or an absolute path (a relative one is made absolute
                where the command is typed, and refused where that cannot be right). The
                driver holds it for the run; only the chief (Ray rank 0 = TF worker 0) writes
                it: checkpoints (the one copy), TensorBoard, profiles, summary.json (with a
                URI from node-local scratch, uploaded in the background by job.uploads); each
                worker adds its replica record under replicas/; the driver exports into it.
                Every worker of a (re)started group restores from <workdir>/checkpoints (the
                newest checkpoint complete there); never from another node's disk.
  storage_path  ray.storage_path, else <workdir>/ray: Ray Train's own run state (small files;
                no checkpoint goes through Ray: reports carry metrics only).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Optional

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.collective import broadcast_from_rank_zero
from ray.train.tensorflow import TensorflowTrainer

from job import COMMAND_START
from job import shards, storage
from job.checkpoints import checkpoint_step
from job.config import Config, RayConfig
from job.errors import ConfigError, DeviceError, JobError, Preempted, WorkdirError
from job.preflight import workdir_problem
from job.ray_control import ConsolePrinter, ConsoleRelay, DriverStopPoll, FailFast, RunControl
from job.storage import Workdir
from job.uploads import Uploads

log = logging.getLogger(__name__)

# Set on the driver, needed by the workers wherever Ray starts them (offline data and weights).
FORWARDED_ENV = ("TFDS_DATA_DIR", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")


# This worker's attempt (its scratch, where it restored from), added to its replica records;
# and where those go (_REPLICAS: the uploads, the file name, the records so far).
_ATTEMPT: dict = {}
_REPLICAS: dict = {}


class ReplicasDiverged(RuntimeError):
    """A worker's weights differ from rank 0's after the same step: the all-reduce is broken."""


# --- inside each Ray worker ------------------------------------------------------
def _report(metrics: dict, saved: Optional[str]) -> None:
    """job.train's reporter under Ray: every worker calls it at the same step (ray.train.report
    is a barrier), with the checkpoint it saved at this step if any (rank 0's is the one in the
    workdir; the others' are scratch).

    Each worker checks its weights against rank 0's and, at a checkpoint, adds a record (its
    step and weights digest, pid, node, scratch and where it restored from) to its own
    `<workdir>/replicas/rank-<k>-<pid>.jsonl`, so the replicas' agreement is on record beside
    the checkpoints. Ray gets metrics only: the checkpoint itself is in the workdir already
    (job.uploads), and every restart restores from there.
    """
    rank = ray.train.get_context().get_world_rank()
    reference = broadcast_from_rank_zero(metrics["weights_sha256"])
    if metrics["weights_sha256"] != reference:
        raise ReplicasDiverged(f"step {metrics['step']}: rank {rank} weights sha256 {metrics['weights_sha256'][:12]} "
                               f"!= rank 0's {reference[:12]}")
    if saved is not None and _REPLICAS:
        record = {**_ATTEMPT, "rank": rank, "step": metrics["step"], "weights_sha256": metrics["weights_sha256"],
                  "stopped": metrics.get("stopped"), "record_files": sorted(os.path.basename(p) for p in shards.OPENED)}
        workdir, name = _REPLICAS["workdir"], _REPLICAS["name"]
        os.makedirs(os.path.dirname(workdir.path(name)), exist_ok=True)
        with open(workdir.path(name), "a") as f:
            f.write(json.dumps(record) + "\n")
        _REPLICAS["uploads"].push(name)
    if rank == 0 and _REPLICAS:  # what the driver learns of the run (Ray's Result has no checkpoint's metrics)
        ray.get(_REPLICAS["control"].set_report.remote(metrics))
    ray.train.report(metrics)


def _restore_source(workdir: Workdir) -> tuple[Optional[str], Optional[str]]:
    """(local directory to restore from, the checkpoint there it starts from), or (None, None)
    for a fresh start: the workdir's checkpoints, fetched into this worker's scratch for a URI.
    Every rank takes the same one; none reads another node's disk."""
    if workdir.pull("checkpoints") and (step := checkpoint_step(workdir.path("checkpoints"))) is not None:
        return workdir.path("checkpoints"), workdir.uri("checkpoints", f"ckpt-{step}")
    return None, None


def _unshared_path_warning(workdir: Workdir, owner: Optional[str], rank: int) -> None:
    """One line, before training, when a local-path workdir is not the driver's: this node does
    not see the lock file the driver holds there (another node's disk, not a shared mount)."""
    if workdir.remote or owner is None:
        return
    try:
        with open(os.path.join(workdir.local, ".lock")) as f:
            seen = f.read().strip()
    except OSError:
        seen = None
    if seen != owner:
        log.warning("workdir=%r is a local path this node does not share with the driver's: checkpoints written "
                    "here are invisible to a worker restarted on another node and to the driver's export; use an "
                    "s3:// or gs:// URI or a path every node mounts (rank %d)", workdir.location, rank)


def _worker_loop(payload: dict) -> None:
    """train_loop_per_worker: one MultiWorkerMirroredStrategy worker."""
    # Ray's TF backend sets this for legacy tf.keras (Keras 2); the job is Keras 3 throughout.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from job.distribute import WorkerShare
    from job.train import train_and_evaluate

    config = Config.model_validate(payload["config"])
    rank = ray.train.get_context().get_world_rank()
    relay = None
    if not config.telemetry.verbose:
        # The driver's console: rank 0's lines, and only what goes wrong on the others.
        relay = ConsoleRelay(payload["control"], "" if rank == 0 else f"rank {rank}: ",
                             logging.INFO if rank == 0 else logging.WARNING)
        logging.getLogger("job").addHandler(relay)
    # The driver holds the workdir (lease or lock) for the whole run; workers only write into
    # it (the chief) or into scratch, node-local and this worker's own.
    workdir = Workdir.open(config.workdir)
    _unshared_path_warning(workdir, payload.get("workdir_owner"), rank)
    uploads = Uploads(workdir, config.storage.outage_timeout_s)
    _REPLICAS.update(workdir=workdir, uploads=uploads, name=f"replicas/rank-{rank}-{os.getpid()}.jsonl",
                     control=payload["control"])
    with tempfile.TemporaryDirectory(prefix=f"rank{rank}-") as scratch:
        # On record in the replica files: a retried worker starts from nothing of its predecessor's.
        local = workdir.local if workdir.remote else scratch
        _ATTEMPT.update(rank=rank, pid=os.getpid(), node=ray.get_runtime_context().get_node_id(), scratch=local,
                        scratch_was_empty=not any(os.scandir(local)))
        source, _ATTEMPT["restored_from"] = _restore_source(workdir)
        # Replicas must start from the same weights: a workdir path that is not shared could
        # show each node a different checkpoint.
        step = checkpoint_step(source) if source else None
        if step != broadcast_from_rank_zero(step):
            raise ConfigError(f"workdir={config.workdir!r}: rank {rank} would resume from step {step}, rank 0 from "
                              "another; on a multi-node cluster the workdir must be a URI or a path every node "
                              "mounts (docs/ray.md)")
        # Rank 0 asks the driver; its vote reaches every rank in the step's all-reduce.
        sources = (DriverStopPoll(payload["control"]),) if rank == 0 else ()
        try:
            share = WorkerShare(config.ray.cpus_per_worker, "ray.cpus_per_worker", config.ray.hang_timeout_s)
            summary = train_and_evaluate(config, workdir, _report, restore_from=source, stop_sources=sources,
                                         share=share, uploads=uploads)
        except Preempted as stopped:
            # The checkpoint is saved and reported (with "stopped" in its metrics): the driver decides what next.
            log.info("rank %d: %s", rank, stopped)
            return
        finally:
            uploads.close()
            _REPLICAS.clear()
            workdir.close()
            if relay:
                logging.getLogger("job").removeHandler(relay)
                relay.close()
    log.info("rank %d done: step %d, %s over %d replicas", rank, summary["step"], summary["strategy"], summary["replicas"])


# --- on the driver ---------------------------------------------------------------
def scaling_config(ray_config: RayConfig) -> ScalingConfig:
    resources = {"CPU": ray_config.cpus_per_worker, **ray_config.resources_per_worker}
    if ray_config.use_gpu:
        resources["GPU"] = ray_config.gpus_per_worker
    # A (min, max) tuple makes Ray Train elastic (a list is refused by Ray).
    workers = ray_config.num_workers if isinstance(ray_config.num_workers, int) else tuple(ray_config.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=ray_config.use_gpu,
                         resources_per_worker=resources, placement_strategy=ray_config.placement_strategy)


def storage_path(config: Config) -> str:
    """Ray Train's run state: ray.storage_path, else <workdir>/ray (config.workdir already resolved)."""
    return config.ray.storage_path or storage.join(config.workdir, "ray")


def resolve_location(setting: str, location: str, nodes: int) -> str:
    """A URI or absolute path as given; a relative path made absolute here, where the command
    is typed, unless it cannot mean the same on every node: under `ray job submit` (it would land in
    Ray's temporary copy of the working directory, which Ray deletes) or on a multi-node cluster."""
    if storage.is_uri(location) or os.path.isabs(location):
        return location
    where = ("under `ray job submit` it would be inside Ray's temporary copy of the working directory"
             if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else
             f"the cluster has {nodes} nodes" if nodes > 1 else None)
    if where:
        raise ConfigError(f"{setting}={location!r} is a relative path and {where}: use an s3:// or gs:// URI, "
                          "or an absolute path on storage every node mounts")
    return os.path.abspath(location)


def worker_runtime_env() -> dict:
    """The driver's data and weights locations, log level and NCCL settings (NCCL_SOCKET_IFNAME,
    NCCL_DEBUG, ...: docs/ray.md), for the workers wherever Ray starts them."""
    return {"env_vars": {name: value for name, value in os.environ.items()
                         if name in FORWARDED_ENV or name.startswith("NCCL_")}}


def run_config(config: Config, control=None, callbacks: tuple = ()) -> RunConfig:
    """No CheckpointConfig: no checkpoint goes through Ray. A URI storage path goes through the
    job's own filesystem (bounded requests; STORAGE_EMULATOR_HOST for gs://). `callbacks`: more
    Ray Train callbacks (job.tune's report to Tune)."""
    path, filesystem = storage_path(config), None
    if storage.is_uri(path):
        filesystem, path = storage.filesystem(path)
    return RunConfig(
        name=config.ray.name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.ray.max_failures),
        worker_runtime_env=worker_runtime_env(),
        callbacks=[FailFast(control), *callbacks],
    )


def _connect(config: Config) -> bool:
    """Connect to ray.address / RAY_ADDRESS, else start Ray in this process; True if we started it.

    Workers' own output stays in Ray's log files (the console gets the job's lines through
    job.ray_control) unless telemetry.verbose. An embedded Ray runs its dashboard on
    127.0.0.1: Ray Train's placement-group cleaner asks its state API whether the run's
    controller is alive, and without it fails (and says so) every second.
    """
    if ray.is_initialized():
        return False
    verbose = config.telemetry.verbose
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:  # "local": a new single-node Ray, never one found some other way
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
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
        resources=ray_config.resources_per_worker, runtime_env=worker_runtime_env(), max_retries=0,
        scheduling_strategy="DEFAULT")  # not inside the caller's placement group (a Tune trial's)
    problem = ray.get(task.remote(config.model_dump(mode="json")))
    if problem is not None:
        raise problem


def _user_error(err: Exception) -> Exception:
    """The JobError behind a failed run (bad input, a non-finite loss), so the CLI reports it as such."""
    failures = [getattr(err, "controller_failure", None), *getattr(err, "worker_failures", {}).values()]
    for failure in failures:
        cause = getattr(failure, "cause", failure)  # Ray may wrap it in a RayTaskError
        if isinstance(cause, JobError):
            return cause
    return err


def wait_for_gpus(config: Config, embedded: bool) -> None:
    """With ray.use_gpu: DeviceError unless the cluster has the GPUs the smallest worker group
    needs. An embedded Ray has what this machine has; a running cluster's autoscaler is asked
    for them and given ray.gpu_wait_s (Ray itself would wait for ever)."""
    if not config.ray.use_gpu:
        return
    workers, per_worker = min(config.ray.worker_counts()), config.ray.gpus_per_worker
    needed = workers * per_worker
    have = lambda: ray.cluster_resources().get("GPU", 0)  # noqa: E731
    what = f"ray.use_gpu=true: the run needs {needed} GPUs (ray.num_workers={config.ray.num_workers} x " \
           f"ray.gpus_per_worker={per_worker})"
    if have() >= needed:
        return
    if embedded or not config.ray.gpu_wait_s:
        raise DeviceError(f"{what} and the Ray this job started on this machine has {have():g}")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": per_worker, "CPU": config.ray.cpus_per_worker}] * workers)
    log.info("%s; the cluster has %g: waiting up to %gs (ray.gpu_wait_s) for the autoscaler", what, have(),
             config.ray.gpu_wait_s)
    deadline = time.monotonic() + config.ray.gpu_wait_s
    while have() < needed:
        if time.monotonic() > deadline:
            raise DeviceError(f"{what} and the cluster has {have():g} after {config.ray.gpu_wait_s:g}s "
                              "(ray.gpu_wait_s): its autoscaler could not add them")
        time.sleep(5)  # the autoscaler adds nodes in minutes: polling is enough


def check_global_batch(config: Config) -> int:
    """The global batch, the same for every worker count the run may have; ConfigError if one
    of them cannot split it evenly. Checked before any worker starts."""
    from job.step import global_batch_size

    rpw = config.ray.replicas_per_worker
    batches = {global_batch_size(config.train, workers * rpw) for workers in config.ray.worker_counts()}
    return batches.pop()  # one value: per_replica_batch_size is refused with a range (job.config)


def _merge_summary(workdir: Workdir, config: Config, metrics: Optional[dict], export_location: Optional[str],
                   status: str) -> dict:
    """The chief's summary.json plus what only the driver knows (Ray's view, the newest checkpoint
    in the workdir, the command's wall time)."""
    workdir.pull("summary.json")
    workdir.pull("checkpoints/checkpoint")  # the index alone names the newest checkpoint
    step = checkpoint_step(workdir.path("checkpoints"))
    try:
        with open(workdir.path("summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {}
    metrics = metrics or {}
    if summary.get("step", -1) < metrics.get("step", -1):  # the chief's summary.json is not visible here
        summary = {"step": metrics["step"], "final_val_accuracy": metrics.get("val_accuracy")}
    summary.update(status=status, wall_seconds=round(time.time() - COMMAND_START, 1), export=export_location,
                   ray={"workers": config.ray.num_workers, "storage_path": storage_path(config), "name": config.ray.name,
                        "checkpoint": workdir.uri("checkpoints", f"ckpt-{step}") if step is not None else None,
                        "last_report": metrics})
    tmp = workdir.path("summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, workdir.path("summary.json"))
    workdir.push("summary.json")
    return summary


def train_on_ray(config: Config, callbacks: tuple = ()) -> dict:
    """Train on Ray workers, then (export.after_train) export from the final checkpoint; returns
    the run summary. `callbacks`: more Ray Train callbacks (job.tune_trial passes its reports on to Ray Tune)."""
    from job.export import export
    from job.resume import check_resume

    config = config.model_copy(deep=True)
    started_ray = _connect(config)
    try:
        nodes = sum(node["Alive"] for node in ray.nodes())
        config.workdir = resolve_location("workdir", config.workdir, nodes)
        config.ray.storage_path = resolve_location("ray.storage_path", storage_path(config), nodes)
        global_batch = check_global_batch(config)
        wait_for_gpus(config, embedded=started_ray and not (config.ray.address or os.environ.get("RAY_ADDRESS")))
        preflight(config)
        if problem := workdir_problem(config.workdir):
            raise WorkdirError(problem)
        workdir = Workdir.open(config.workdir)
        try:
            with workdir.claimed(owner=True):  # only now that the inputs are known good
                owner = None if workdir.remote else str(os.getpid())  # what the workers see in <workdir>/.lock
                for change in check_resume(workdir, config, global_batch):
                    log.info("resuming with a changed setting: %s", change)
                metrics, stopped_by = _fit_until_done(config, owner, callbacks)
                if stopped_by:
                    summary = _merge_summary(workdir, config, metrics, None, "preempted")
                    raise Preempted(f"stopped by {stopped_by} at step {summary['step']}; checkpoint "
                                    f"{summary['ray']['checkpoint']}; rerun the same command to resume")
                # The chief has uploaded its last checkpoint before its worker ended: export reads it there.
                exported = export(config, workdir) if config.export.after_train else None
                return _merge_summary(workdir, config, metrics, exported, "finished")
        finally:
            workdir.close()
    finally:
        if started_ray:
            ray.shutdown()


def _fit_until_done(config: Config, owner: Optional[str] = None, callbacks: tuple = ()):
    """(rank 0's last reported metrics, why the driver was asked to stop or None). A SIGTERM to this process
    asks the workers to stop at the next step boundary (they save and report one checkpoint);
    a second one aborts. A run whose workers stopped because one of them was preempted
    (SIGTERM) is started again from that checkpoint, up to ray.max_failures times."""
    # Bounds on a silent worker, for Ray Train's report barrier and health checks (passed on
    # by Ray to its controller and workers; TF's collectives get the same in job.distribute).
    for variable in ("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"):
        os.environ[variable] = str(config.ray.hang_timeout_s)
    control, asked = RunControl.remote(), {}
    printer = None if config.telemetry.verbose else ConsolePrinter(control)

    def on_sigterm(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked["reason"] = f"signal {signum} to the driver"
        log.warning("%s: the workers stop at the next step boundary and save a checkpoint (again to abort)",
                    asked["reason"])
        control.request_stop.remote(asked["reason"])

    # A Ray Tune trial runs this on a thread, where no signal handler can be set: Tune stops it.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if on_main_thread else None
    try:
        restarts = 0
        while True:
            ray.get(control.set_report.remote(None))
            _fit(config, control, owner, callbacks)
            metrics = ray.get(control.get_report.remote()) or {}
            stopped = metrics.get("stopped")
            if not stopped or asked:
                return metrics, asked.get("reason")
            restarts += 1
            if 0 <= config.ray.max_failures < restarts:
                return metrics, f"{stopped} (more than ray.max_failures={config.ray.max_failures} times)"
            log.warning("workers stopped at step %s by %s: starting them again from that checkpoint (%d of %s)",
                        metrics.get("step"), stopped, restarts, config.ray.max_failures)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if printer:
            printer.close()


def _fit(config: Config, control, owner: Optional[str] = None, callbacks: tuple = ()):
    trainer = TensorflowTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "control": control, "workdir_owner": owner},
        scaling_config=scaling_config(config.ray),
        run_config=run_config(config, control, callbacks),
    )
    log.info("Ray Train: %s workers x (%s CPU, %s GPU), workdir %s, storage %s", config.ray.num_workers,
             config.ray.cpus_per_worker, config.ray.gpus_per_worker if config.ray.use_gpu else 0, config.workdir,
             storage_path(config))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _user_error(err) from err
