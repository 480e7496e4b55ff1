"""python -m job benchmark CONFIG [key=value ...]: where a train step's time goes.

For each phase, after warm-up (tracing, XLA compilation, shuffle buffer and cache fill) and
as the median of repeats, it measures:
  input  the phase's input pipeline alone (images/sec): the batches `train` really uses,
         images or, for a frozen phase on cached features, features (their extraction,
         a one-time cost, is timed separately);
  step   the train step alone, on one synthetic batch already on the device;
  e2e    the two together, exactly as `train` runs them (`Run.step_functions`, chunks of
         train.steps_per_call steps).
From these: the share of the end-to-end step spent waiting for input (1 - step/e2e time)
and a verdict; the FLOPs per image of what the phase's step computes (forward of the layers
that run, backward of what is trained and of what lies above it: job/flops.py) and the FLOP/s
achieved, next to the best of TensorFlow matmuls of several sizes in the same dtype measured
before and after the phases (with their spread; a utilization above 100% is flagged as a
failed peak measurement, never printed as a result); and the settings that took effect (strategy, replicas,
precision, XLA as compiled into the traced step, where resizing runs, feature caching).
With --profile, a few end-to-end steps are also traced with the TensorFlow profiler and the
input wait is read from that trace. Prints a table, writes <workdir>/benchmark.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import statistics
import tempfile
import time
from typing import Callable, Optional

import tensorflow as tf

from job import data as data_lib
from job.config import Config
from job.flops import load_average, matmul_rates, model_flops, peak_summary
from job.telemetry import ProfilerWindow

log = logging.getLogger(__name__)

# More than this share of the step spent waiting for input, or a pipeline slower than the
# step, and the phase is input-bound.
INPUT_BOUND_SHARE = 0.05


@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int = 20  # train steps (or batches) per timed repeat
    repeats: int = 3  # the median of these is reported
    warmup: int = 2  # untimed calls first
    # Square matmul sizes for the peak, each timed `matmul_repeats` times before and after the phases.
    matmul_sizes: tuple = (1024, 2048, 4096)
    matmul_repeats: int = 3
    # The rate one accelerator trains at, for "cores of input pipeline per accelerator": a stated
    # assumption (about what one A100 trains MobileNetV2 at 224 px in mixed precision), not a measurement.
    accelerator_images_per_sec: float = 2500.0


def images_per_sec(run_once: Callable[[], None], images: int) -> float:
    start = time.perf_counter()
    run_once()
    return images / (time.perf_counter() - start)


def summary(rates: list[float]) -> dict:
    return {"images_per_sec": statistics.median(rates), "repeats": [round(r, 1) for r in rates]}


NO_STOP = 0.0  # the stop vote every benchmarked step carries


def run_steps(steps, iterator, count: int, per_call: int) -> None:
    """`count` train steps in chunks of `per_call`, waiting for each chunk like the train loop does."""
    done = 0
    while done < count:
        n = min(per_call, count - done)
        steps.train_chunk(iterator, tf.constant(n), tf.constant(NO_STOP)).numpy()
        done += n


# --- what took effect ----------------------------------------------------------------
def xla_compiled(steps, iterator) -> bool:
    """Whether the traced train step really contains an XLA-compiled function.

    Read from the graph that runs, not from the setting: Keras 3's `jit_compile="auto"`
    silently drops XLA under tf.distribute, and we want to see such a thing.
    """
    concrete = steps.train_chunk.get_concrete_function(iterator, tf.constant(1), tf.constant(NO_STOP))
    library = concrete.graph.as_graph_def().library.function
    return any(f.attr["_XlaMustCompile"].b for f in library if "_XlaMustCompile" in f.attr)


def onednn_enabled() -> bool:
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled()) and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"


def effective_settings(run, steps, iterator, cached: bool, per_call: int, frozen_cached: bool = False) -> dict:
    config = run.config
    return {
        "strategy": type(run.strategy).__name__,
        "replicas": run.replicas,
        "global_batch": run.global_batch,
        "precision": config.train.precision,
        "compute_dtype": run.model.backbone.compute_dtype,
        "xla_requested": config.train.jit_compile,
        "xla_in_step": xla_compiled(steps, iterator),
        "steps_per_call": per_call,
        "resize_on": "none (cached features)" if cached else "none (cached activations)" if frozen_cached
        else config.data.resize_on,
        "feature_cache": cached,
        # The fine-tune top trains on cached activations of the frozen bottom: the layer they feed.
        "activation_cache": run.inputs.split.first_trainable if frozen_cached else None,
        "image_size": config.model.image_size,
        "onednn": onednn_enabled(),
        # BatchNorm layers folded into their convolutions (0: model.fold_batchnorm off).
        "batchnorm_folded": len(run.model.folds),
        "devices": run.devices,
        "intra_op_threads": run.threads["intra_op"],
        "inter_op_threads": run.threads["inter_op"],
        "tf_data_threads": run.threads["tf_data"],
        "threads_from": run.threads["from"],
    }


# --- the profiler's view ---------------------------------------------------------------
def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def input_wait_from_trace(profile_dir: str) -> Optional[dict]:
    """Share of traced step time spent in iterator GetNext ops, from the profiler's trace.

    Step events are the `train` markers the job's ProfilerWindow writes; waiting for input
    is the union of every GetNext op's time within them (replicas may wait in parallel).
    """
    from xprof.convert import raw_to_tool_data

    paths = sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb")))
    if not paths:
        return None
    trace, _ = raw_to_tool_data.xspace_to_tool_data(paths[-1:], "trace_viewer", {})
    events = json.loads(trace if isinstance(trace, str) else trace.decode())["traceEvents"]
    # "train <n>" once the profiler has grouped the step's events under its marker, else "train".
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if re.fullmatch(r"train( \d+)?", e.get("name", "")) and "dur" in e]
    waits = [(e["ts"], e["ts"] + e["dur"]) for e in events if "GetNext" in e.get("name", "") and "dur" in e]
    step_time = sum(stop - start for start, stop in steps)
    if not step_time:
        return None
    waited = sum(_union_length([(max(a, s), min(b, t)) for a, b in waits if a < t and b > s]) for s, t in steps)
    return {"trace": paths[-1], "calls_traced": len(steps), "ms_per_call": step_time / 1000 / len(steps),
            "input_wait_share": waited / step_time}


# --- one phase -----------------------------------------------------------------------
def synthetic_dataset(run, phase):
    """One random batch per replica, of what the phase's step takes, repeated: the step with no input cost."""
    config = run.config
    size = config.model.image_size
    if run.inputs.use_feature_cache(phase):
        shape, dtype = (int(run.model.head.input_shape[-1]),), tf.float32
    elif run.inputs.use_frozen_cache(phase):
        shape, dtype = run.inputs.split.shape, tf.float32
    elif config.data.resize_on == "device" and data_lib.streams(run.inputs.data) \
            and not data_lib.source_images_are_small(run.info.image_shape, size):
        shape, dtype = (size, size, 3), tf.uint8  # streamed: cropped and resized once on the host
    elif config.data.resize_on == "device":
        cached = data_lib.cache_size(config.data, run.info.image_shape, size)
        shape = (cached, cached, run.info.image_shape[2] or 3) if cached else run.info.image_shape
        dtype = tf.uint8
    else:
        shape, dtype = (size, size, 3), tf.float32

    def make(batch, ctx):
        images = tf.random.stateless_uniform((batch, *shape), seed=[0, 0], maxval=255 if dtype == tf.uint8 else 1.0,
                                             dtype=tf.int32 if dtype == tf.uint8 else tf.float32)
        labels = tf.random.stateless_uniform((batch,), seed=[0, 1], maxval=run.info.num_classes, dtype=tf.int32)
        return tf.data.Dataset.from_tensors((tf.cast(images, dtype), labels)).repeat().prefetch(2)

    return run.inputs.distribute(make)


@tf.function
def _drain(iterator, count):
    """Take `count` batches inside a tf.function, as the train step does (no Python per batch)."""
    for _ in tf.range(count):
        next(iterator)
    return count


def time_input(train_data, budget: Budget, images: int) -> dict:
    """(a) The input pipeline alone, after `budget.warmup` batches (shuffle buffer, cache fill)."""
    iterator = iter(train_data)
    started = time.perf_counter()
    _drain(iterator, tf.constant(budget.warmup)).numpy()
    first = time.perf_counter() - started
    rates = [images_per_sec(lambda: _drain(iterator, tf.constant(budget.steps)).numpy(), images)
             for _ in range(budget.repeats)]
    return {**summary(rates), "first_batches_seconds": round(first, 3)}


def input_cores(input_rate: float, threads: dict, target_rate: float) -> dict:
    """The input pipeline's images/s per core it ran on, and the cores that would feed `target_rate`.

    The pipeline ran on tf.data's pool: as many cores as it has threads, at most the process's share."""
    cores = min(threads["tf_data"], threads.get("cpu_share") or os.cpu_count() or 1)
    per_core = input_rate / cores
    return {"cores": cores, "images_per_sec_per_core": per_core, "accelerator_images_per_sec": target_rate,
            "cores_per_accelerator": target_rate / per_core}


def time_steps(steps, synthetic, real, budget: Budget, per_call: int, images: int) -> list[tuple[float, float]]:
    """(b) the step on a synthetic batch and (c) end to end, as (b, c) pairs of images/sec.

    Alternating: each pair sees the same load from whatever else runs on the machine.
    """
    run_steps(steps, synthetic, budget.warmup * per_call, per_call)
    run_steps(steps, real, budget.warmup * per_call, per_call)
    return [(images_per_sec(lambda: run_steps(steps, synthetic, budget.steps, per_call), images),
             images_per_sec(lambda: run_steps(steps, real, budget.steps, per_call), images))
            for _ in range(budget.repeats)]


def verdict(pairs: list[tuple[float, float]], input_rate: float, batch: int, profile: Optional[dict] = None) -> dict:
    """(d) Input- or compute-bound, from the pairs of (step alone, end to end) rates.

    The wait is the extra time of an end-to-end step over the step alone, pair by pair;
    with a profile, the time the traced steps spent in GetNext, which other load on the
    machine does not blur.
    """
    step_rate = statistics.median(p[0] for p in pairs)
    e2e_rate = statistics.median(p[1] for p in pairs)
    timed_wait = statistics.median(max(0.0, 1.0 - e2e / step) for step, e2e in pairs)
    wait, source = (profile["input_wait_share"], "profiler") if profile else (timed_wait, "timing")
    bound = "input-bound" if input_rate < step_rate or wait > INPUT_BOUND_SHARE else "compute-bound"
    return {"bound": bound, "input_wait_share": wait, "wait_source": source, "timed_wait_share": timed_wait,
            "input_headroom": input_rate / step_rate, "step_ms": 1000 * batch / step_rate,
            "e2e_step_ms": 1000 * batch / e2e_rate}


def flops_row(phase_flops: dict, step_rate: float, e2e_rate: float, peak: dict) -> dict:
    """(e) FLOPs per image of what the phase's step computes, and the FLOP/s achieved next to
    the measured matmul peak. A utilization above 1 means the peak was not a peak (the
    machine was busy whenever it was measured): flagged, never printed as a plain number."""
    train = phase_flops["train"]
    utilization = train * step_rate / peak["best"]
    if utilization > 1:
        log.warning("the %s train step reached %.1f%% of the measured %s matmul peak: the peak measurement failed "
                    "(machine busy while it ran: best %.3g, median %.3g, slowest %.3g FLOP/s); its utilization "
                    "is not meaningful", phase_flops.get("name", "phase"), 100 * utilization, peak["dtype"],
                    peak["best"], peak["median"], peak["min"])
    return {"forward_per_image": phase_flops["forward"], "train_per_image": train,
            "backward_weights_per_image": phase_flops["backward_weights"],
            "backward_inputs_per_image": phase_flops["backward_inputs"], "lowest_trained": phase_flops["lowest_trained"],
            "runs_from": phase_flops["runs_from"], "achieved_step": train * step_rate, "achieved_e2e": train * e2e_rate,
            "matmul_peak": peak["best"], "matmul_peak_median": peak["median"], "matmul_peak_min": peak["min"],
            "matmul_peak_runs": peak["runs"], "matmul_dtype": peak["dtype"],
            "load_average": peak.get("load_average", []), "cores": peak.get("cores"), "utilization_step": utilization, "peak_failed": utilization > 1}


def profile_steps(steps, real, profile_dir: str, count: int) -> Optional[dict]:
    """End-to-end steps under the TensorFlow profiler as training profiles them (one call and
    one `train` step marker per step), then read back."""
    window = ProfilerWindow(profile_dir, (1, count + 1))
    for index in range(count + 1):  # the first, a warm-up, untraced
        window.run_step(index, index, lambda: steps.train_step(real, tf.constant(NO_STOP)).numpy())
    window.stop()
    return input_wait_from_trace(profile_dir)


def phase_inputs(run, phase) -> tuple:
    """(name, inputs, unfreeze) of `phase` for model_flops: what its step reads and trains."""
    inputs = "features" if run.inputs.use_feature_cache(phase) else "activations" if run.inputs.use_frozen_cache(phase) else "images"
    return phase.name, inputs, False if phase.name == "head" else phase.config.unfreeze


def benchmark_phase(run, phase_name: str, budget: Budget, profile_dir: Optional[str]) -> dict:
    phase = next(p for p in run.phases if p.name == phase_name)
    cached = run.inputs.use_feature_cache(phase)
    steps = run.step_functions(phase)
    per_call, batch = run.steps_per_call(phase), run.global_batch
    images = budget.steps * batch
    result: dict = {"phase": phase_name}

    started = time.perf_counter()
    train_data, _ = run.inputs.datasets(phase, 0)  # extracts the features when cached
    if cached:
        data = run.config.data
        extracted = sum(run.info.split_sizes[split] for split in (data.train_split, data.val_split) if split)
        seconds = time.perf_counter() - started
        result["feature_extraction"] = {"images": extracted, "seconds": round(seconds, 2),
                                        "images_per_sec": extracted / seconds}

    log.info("benchmark %s: input pipeline", phase_name)
    result["input"] = time_input(train_data, budget, images)
    result["input"].update(input_cores(result["input"]["images_per_sec"], run.threads, budget.accelerator_images_per_sec))
    result["input"]["cache"] = run.inputs.data.cache
    log.info("benchmark %s: train step on a synthetic batch and end to end", phase_name)
    synthetic = iter(synthetic_dataset(run, phase))
    real = iter(train_data)
    pairs = time_steps(steps, synthetic, real, budget, per_call, images)
    result["step"], result["e2e"] = summary([p[0] for p in pairs]), summary([p[1] for p in pairs])
    if profile_dir:
        log.info("benchmark %s: profiling end-to-end steps", phase_name)
        # Two calls at most: the profiler slows every op and its trace grows with each.
        result["profile"] = profile_steps(steps, real, profile_dir, min(budget.steps, 2))
    result["verdict"] = verdict(pairs, result["input"]["images_per_sec"], batch, result.get("profile"))
    result["settings"] = effective_settings(run, steps, synthetic, cached, per_call, run.inputs.use_frozen_cache(phase))
    return result


# --- the report ----------------------------------------------------------------------
def _fmt_flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} "


def flops_lines(f: dict) -> list[str]:
    """Row (e) of the table for a flops_row; a utilization over 100% is printed as a failed peak."""
    utilization = f"{100 * f['utilization_step']:.1f}%"
    if f["peak_failed"]:
        utilization = f"!! {utilization} (over 100%: THE PEAK MEASUREMENT FAILED, machine busy?) !!"
    return [f"  (e) FLOPs per image         {_fmt_flops(f['forward_per_image'])}FLOP forward from {f['runs_from']} + "
            f"{_fmt_flops(f['backward_weights_per_image'] + f['backward_inputs_per_image'])}FLOP backward "
            f"(trained from {f['lowest_trained']}) = {_fmt_flops(f['train_per_image'])}FLOP per train step",
            f"      achieved                {_fmt_flops(f['achieved_step'])}FLOP/s (step), {_fmt_flops(f['achieved_e2e'])}FLOP/s (e2e) = "
            f"{utilization} of a {f['matmul_dtype']} matmul peak of {_fmt_flops(f['matmul_peak'])}FLOP/s "
            f"(best of {f['matmul_peak_runs']} runs; median {_fmt_flops(f['matmul_peak_median'])}FLOP/s, "
            f"slowest {_fmt_flops(f['matmul_peak_min'])}FLOP/s)"
            + (f"; machine busy: load average {'/'.join(f'{x:.1f}' for x in f['load_average'])} on {f['cores']} cores"
               if f.get("load_average") and max(f["load_average"]) > (f.get("cores") or 1) else "")]


def format_table(report: dict) -> str:
    lines = []
    for r in report["phases"]:
        s, v, f = r["settings"], r["verdict"], r["flops"]
        if s["feature_cache"]:
            what = "head on cached features"
        elif s.get("activation_cache"):
            what = f"top from {s['activation_cache']} + head on cached activations of the frozen bottom at {s['image_size']}px"
        else:
            what = f"{'classifier' if r['phase'] == 'finetune' else 'frozen backbone + head'} at {s['image_size']}px"
        lines.append(f"phase {r['phase']}: {what}, global batch {s['global_batch']}")
        if "feature_extraction" in r:
            e = r["feature_extraction"]
            lines.append(f"  feature extraction (once)   {e['images_per_sec']:10.1f} img/s   {e['images']} images in {e['seconds']} s")
        i = r["input"]
        lines.append(f"  (a) input pipeline alone    {i['images_per_sec']:10.1f} img/s   repeats {i['repeats']}, "
                     f"images cached: {i['cache']}; {i['images_per_sec_per_core']:.1f} img/s per core on {i['cores']:g} "
                     f"core(s): {i['cores_per_accelerator']:.1f} cores per accelerator at "
                     f"{i['accelerator_images_per_sec']:g} img/s (assumed)")
        lines.append(f"  (b) train step alone        {r['step']['images_per_sec']:10.1f} img/s   {v['step_ms']:.1f} ms/step, repeats {r['step']['repeats']}")
        lines.append(f"  (c) end to end              {r['e2e']['images_per_sec']:10.1f} img/s   {v['e2e_step_ms']:.1f} ms/step, repeats {r['e2e']['repeats']}")
        lines.append(f"  (d) verdict                 {v['bound']}: {100 * v['input_wait_share']:.1f}% of the step waiting for input "
                     f"({v['wait_source']}), input pipeline {v['input_headroom']:.1f}x what the step consumes")
        lines.append(f"      waiting, from timing    {100 * v['timed_wait_share']:.1f}% (end to end vs step alone, median of pairs)")
        if r.get("profile"):
            p = r["profile"]
            lines.append(f"      waiting, from profiler  {100 * p['input_wait_share']:.1f}% of {p['calls_traced']} traced train call(s) in GetNext, {p['ms_per_call']:.1f} ms/call")
        lines.extend(flops_lines(f))
        lines.append(f"  (f) in effect               {s['strategy']} x{s['replicas']}, {s['precision']}, XLA {'on' if s['xla_in_step'] else 'off'}"
                     f" (requested {'on' if s['xla_requested'] else 'off'}), steps_per_call {s['steps_per_call']}, resize on {s['resize_on']}, "
                     f"BatchNorm folded into {s['batchnorm_folded']} convolutions, oneDNN {'on' if s['onednn'] else 'off'}, "
                     f"threads {s['intra_op_threads']} intra-op / {s['inter_op_threads']} inter-op / {s['tf_data_threads']} tf.data "
                     f"({s['threads_from']}), devices {', '.join(s['devices'])}")
    return "\n".join(lines)


@contextlib.contextmanager
def scratch_trainer(config: Config):
    """A job.train.Trainer whose checkpoints and TensorBoard files go to a scratch directory, never a real run's."""
    from job.checkpoints import Checkpoints
    from job.preemption import StopRequests
    from job.storage import Workdir
    from job.train import Run, Trainer

    scratch = Workdir.open(tempfile.mkdtemp(prefix="benchmark-"))
    try:
        run = Run(config)
        with Checkpoints(run.checkpoint(), scratch.path("checkpoints"), 1, run.chief) as checkpoints:
            yield Trainer(run, scratch, checkpoints, StopRequests())
    finally:
        shutil.rmtree(scratch.local, ignore_errors=True)


def benchmark(config: Config, phases: list[str], budget: Budget = Budget(), profile: bool = False,
              workdir: Optional[str] = None) -> dict:
    """Measure `phases` under `config`; write <workdir>/benchmark.json; return the report."""
    workdir = workdir or config.workdir
    with scratch_trainer(config) as trainer:
        run = trainer.run
        selected = [p for p in run.phases if p.name in phases]
        flops = model_flops(config, run.info.num_classes, [phase_inputs(run, p) for p in selected])
        dtypes = sorted({"float32", run.model.backbone.compute_dtype})
        log.info("benchmark: matmul peak in %s", ", ".join(dtypes))
        loads = [load_average()]
        rates = {dtype: matmul_rates(dtype, budget.matmul_sizes, budget.matmul_repeats) for dtype in dtypes}
        results = []
        for phase in selected:
            profile_dir = os.path.join(workdir, "benchmark_profile", phase.name) if profile else None
            results.append(benchmark_phase(run, phase.name, budget, profile_dir))
        log.info("benchmark: matmul peak again, after the phases")
        loads.append(load_average())
        peaks = {dtype: peak_summary(dtype, rates[dtype] + matmul_rates(dtype, budget.matmul_sizes, budget.matmul_repeats),
                                     tuple(loads)) for dtype in dtypes}
        busy = max(loads) > (os.cpu_count() or 1)
        if busy:
            log.warning("the machine was busy while measuring (load average %s on %d cores): every rate is low, "
                        "the matmul peak too, so utilization may read high", "/".join(f"{x:.1f}" for x in loads),
                        os.cpu_count())
    for result in results:
        result["flops"] = flops_row({"name": result["phase"], **flops["phases"][result["phase"]]},
                                    result["step"]["images_per_sec"], result["e2e"]["images_per_sec"],
                                    peaks[result["settings"]["compute_dtype"]])
    report = {"budget": dataclasses.asdict(budget), "model_flops": flops, "matmul_peak": peaks, "phases": results}
    write_json(workdir, "benchmark.json", report)
    return report


def write_json(workdir: str, name: str, data: dict) -> str:
    """<workdir>/<name> holding `data`; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)
    return path
