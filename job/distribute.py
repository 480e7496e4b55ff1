"""Choosing the tf.distribute strategy; who is the chief.

One code path serves 1 CPU, N GPUs in one process (MirroredStrategy) and N workers
(MultiWorkerMirroredStrategy, TF_CONFIG set by Ray Train or by hand).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import tensorflow as tf

from job.config import TrainConfig


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


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def worker_index(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None and resolver.task_type else 0

