"""Choosing the tf.distribute strategy; who is the chief.

One code path serves 1 CPU, N GPUs in one process (MirroredStrategy) and N workers
(MultiWorkerMirroredStrategy, TF_CONFIG set by Ray Train or by hand).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import tensorflow as tf

from job.config import TrainConfig

log = logging.getLogger(__name__)


def _tf_config_workers() -> int:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def split_cpu(devices: int) -> None:
    """Present the host CPU as `devices` logical devices (must run before TF initialises)."""
    if devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == devices:
        return
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


def make_strategy(train: TrainConfig, collective_timeout_s: Optional[float] = None) -> tf.distribute.Strategy:
    """The strategy `train.strategy` names (auto: from TF_CONFIG and the devices). A multi-worker
    collective that waits longer than `collective_timeout_s` fails the step (a stopped worker)."""
    split_cpu(train.cpu_devices)
    name = train.strategy
    if name == "auto" and _tf_config_workers() > 1:
        name = "multi_worker_mirrored"
    if name == "multi_worker_mirrored":
        # Physical devices only: listing logical ones starts TF's runtime, after which
        # MultiWorkerMirroredStrategy can no longer configure its collectives.
        # NCCL is the fast path between GPUs; ring all-reduce over gRPC otherwise.
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if tf.config.list_physical_devices("GPU")
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation, timeout_seconds=collective_timeout_s)
        )
    gpus = tf.config.list_logical_devices("GPU")
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "auto":
        if len(gpus) > 1 or (not gpus and len(cpus) > 1):
            name = "mirrored"
        elif gpus:
            name = "one_device"
        else:
            name = "default"
    if name == "mirrored":
        # GPUs: NCCL all-reduce (MirroredStrategy's default); logical CPU devices: a plain reduction.
        devices = [d.name for d in gpus] if gpus else cpus
        cross_device = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0])
    return tf.distribute.get_strategy()


def check_gpus(config) -> None:
    """DeviceError if the config expects GPUs (train.require_gpu, or ray.use_gpu on a worker) and
    TensorFlow sees none: a TensorFlow that cannot load CUDA falls back to the CPU silently."""
    from job.errors import DeviceError

    wanted = "train.require_gpu=true" if config.train.require_gpu else (
        "ray.use_gpu=true" if config.ray.enabled and config.ray.use_gpu else None)
    if wanted and not tf.config.list_physical_devices("GPU"):
        raise DeviceError(f"{wanted} but TensorFlow sees no GPU here (no GPU, or CUDA did not load: "
                          "pip install -e '.[gpu]'); set train.require_gpu=false to run on the CPU")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def worker_index(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None and resolver.task_type else 0


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This process's place among the strategy's input pipelines (one per worker), as
    `distribute_datasets_from_function` gives it to the dataset function."""
    workers = max(1, _tf_config_workers()) if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1
    return tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker_index(strategy))


def wait_for_all_workers(strategy: tf.distribute.Strategy, barrier: str, timeout_s: float) -> None:
    """Under a multi-worker strategy, return once every worker has called this with `barrier`.

    A worker whose part of the last all-reduce is done may not exit yet: a peer can still be
    fetching that step's buffers from it (gRPC RecvBuf) and fails with "Connection refused" once
    it is gone. TensorFlow configures no shutdown barrier for MultiWorkerMirroredStrategy, so
    the run ends on this one (TensorFlow's coordination service, led by worker 0). A worker that
    never arrives costs a warning after `timeout_s`, not the run: this worker's part is done.
    """
    from tensorflow.python.eager import context

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or context.context().coordination_service is None:
        return
    try:
        context.context().wait_at_barrier(barrier, int(timeout_s * 1000))
    except tf.errors.OpError as error:
        log.warning("not every worker reached the end of the run (%s): %s", barrier,
                    (str(error).strip().splitlines() or [type(error).__name__])[0])


def container_cpus() -> Optional[float]:
    """The CPU quota of this process's container (cgroup v2 or v1) or affinity mask, if below the host's cores."""
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            limit, period = f.read().split()
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
                limit, period = int(f.read()), int(g.read())
            quota = limit / period if limit > 0 else None
        except (OSError, ValueError):
            pass
    allowed = len(os.sched_getaffinity(0))
    share = min(quota or allowed, allowed)
    return share if share < (os.cpu_count() or 1) else None


# How long the end-of-run barrier waits for a worker when the launcher gives no collective timeout.
BARRIER_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class WorkerShare:
    """What the launcher grants this process: its CPUs (None: the whole host) and how long a
    collective may wait for a peer (None: TensorFlow's default, forever). A Ray worker gets
    them from job.launch; a process on its own from its container (`local_share`)."""

    cpus: Optional[float]
    cpus_from: str
    collective_timeout_s: Optional[float] = None


def local_share() -> WorkerShare:
    return WorkerShare(container_cpus(), "container quota")


def configure_threads(cpus: Optional[float], source: str) -> dict:
    """Size TensorFlow's op pools and tf.data's pool to `cpus` (None: TF's defaults, one thread per
    core). Must run before TensorFlow's runtime starts. Returns what is in effect."""
    from job import data as data_lib

    if cpus:
        threads = max(1, int(cpus))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            # At least 2: independent ops (a collective waiting on a peer, the input pipeline's
            # GetNext) must not wait for one another.
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        except RuntimeError:  # TF already started (a second Run in one process): keep its pools
            pass
        data_lib.set_pipeline_threads(threads)
    cores = os.cpu_count() or 1
    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads() or cores,
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads() or cores,
            "tf_data": data_lib._PIPELINE_THREADS or cores, "cpu_share": cpus, "from": source if cpus else "host cores"}


def devices_in_use(strategy: tf.distribute.Strategy) -> list[str]:
    """The devices this process's replicas run on (a multi-worker strategy: this worker's)."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: TensorFlow places ops on the first GPU, else the CPU
        return [(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name]
