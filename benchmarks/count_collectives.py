"""Collectives per train step under MultiWorkerMirroredStrategy: two processes on loopback.

    .venv/bin/python benchmarks/count_collectives.py [float32|mixed_float16] [--steps 200]

Starts two workers (TF_CONFIG on 127.0.0.1), builds the job's distributed step
(job.step.StepFunctions) on a small model under each, and prints, from worker 0: the
collective ops that run per step (counted in a profiler trace of 10 steps), those in the
step's graph, and the wall time of `--steps` steps. Each collective is a network round trip
between workers on a real cluster. Runs against an older checkout too (PYTHONPATH=<it>).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import socket
import sys
import time


def collectives_run(run) -> int:
    """How many collective ops `run()` executes, counted in a profiler trace of it."""
    import glob
    import tempfile

    import tensorflow as tf
    from xprof.convert import raw_to_tool_data

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        run()
        tf.profiler.experimental.stop()
        trace, _ = raw_to_tool_data.xspace_to_tool_data(glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb"),
                                                       "trace_viewer", {})
    events = json.loads(trace)["traceEvents"]
    # The ops themselves (CollectiveReduceV2, ...), not the executor's own events around them.
    return sum(1 for e in events if e.get("ph") == "X" and re.fullmatch(r"Collective(Reduce|Gather|Bcast|AllToAll)\w*",
                                                                        e.get("name", "")))


def worker(index: int, ports: list[int], precision: str, steps: int, finished) -> None:
    """One worker's run; worker 0 prints the report once both are done."""
    try:
        report = measure(index, ports, precision, steps)
    except BaseException:
        finished.abort()  # the peer stops waiting for this one
        raise
    # A worker whose part of the last all-reduce is done may not exit yet: its peer can still be
    # fetching that step's buffers from it (gRPC RecvBuf), and fails with "Connection refused"
    # if it is gone. The barrier lives in the parent process, outside TensorFlow's network.
    finished.wait(timeout=300)
    if index == 0:
        print(json.dumps(report))


def measure(index: int, ports: list[int], precision: str, steps: int) -> dict:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    import keras
    import tensorflow as tf

    try:
        from job.step import StepFunctions
    except ImportError:  # before job/step.py existed (to measure the old step)
        from job.train import StepFunctions

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64), keras.layers.Dense(10)])
        optimizer = keras.optimizers.Adam(1e-3)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        counter = tf.Variable(0, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    functions = StepFunctions(strategy, lambda x, training: model(x, training=training), model.trainable_variables,
                              optimizer, lambda x: x, 16, 0.0, counter, False)
    data = strategy.distribute_datasets_from_function(lambda ctx: tf.data.Dataset.from_tensors(
        (tf.random.stateless_normal([8, 32], [1, 2]), tf.zeros([8], tf.int32))).repeat())
    iterator = iter(data)
    # The chunk's signature gained a stop vote; count either way, one step per call.
    extra = [tf.constant(0.0)] if len(inspect.signature(functions._train_chunk).parameters) == 3 else []
    chunk = functions.train_chunk.get_concrete_function(iterator, tf.constant(1), *extra)
    library = chunk.graph.as_graph_def().library.function
    ops = [n.op for f in library for n in f.node_def] + [op.type for op in chunk.graph.get_operations()]
    collectives = sorted(op for op in ops if op.startswith("Collective"))
    functions.train_chunk(iterator, tf.constant(5), *extra).numpy()  # warm up
    def ten_steps():
        functions.train_chunk(iterator, tf.constant(10), *extra).numpy()

    executed = collectives_run(ten_steps) / 10 if index == 0 else ten_steps()  # the same steps, traced on worker 0
    start = time.perf_counter()
    for _ in range(steps):
        functions.train_chunk(iterator, tf.constant(1), *extra).numpy()
    seconds = time.perf_counter() - start
    return {"precision": precision, "collectives_run_per_step": executed, "collective_ops_in_step_graph": len(collectives),
            "steps": steps, "seconds": round(seconds, 2), "ms_per_step": round(1000 * seconds / steps, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", nargs="?", default="float32", choices=["float32", "mixed_float16"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: TensorFlow reads TF_CONFIG once
    finished = spawn.Barrier(2)
    processes = [spawn.Process(target=worker, args=(i, ports, args.precision, args.steps, finished)) for i in range(2)]
    for p in processes:
        p.start()
    running = {p.sentinel: p for p in processes}
    while running:
        for ended in multiprocessing.connection.wait(list(running)):
            process = running.pop(ended)
            process.join()
            if process.exitcode != 0:
                for p in running.values():  # its peer would wait for it forever
                    p.terminate()
    return max(p.exitcode for p in processes)


if __name__ == "__main__":
    sys.exit(main())
