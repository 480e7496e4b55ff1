"""The frozen phase on cached features against running the frozen backbone every step.

    TFDS_DATA_DIR=../shared/datasets KERAS_HOME=../shared/keras \\
      .venv/bin/python benchmarks/compare_cache.py configs/benchmark_cache.yaml [key=value ...]

Trains the head phase twice in one process from the same initial weights, with
train.cache_features=false then =true, and prints for each the phase's wall time (feature
extraction included for the cached run), its CPU seconds (much less moved than wall time
by other load on a shared machine) and the final validation accuracy, then the speed-up and
the accuracy difference. Writes <workdir>/compare_cache.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from job.benchmark import scratch_trainer, write_json
from job.config import load_config


def head_phase(config, cache: bool) -> dict:
    config = config.model_copy(update={"train": config.train.model_copy(update={"cache_features": cache})})
    with scratch_trainer(config) as trainer:
        run, phase = trainer.run, trainer.run.phases[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.run_phase(phase)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        last = trainer.history.rows[-1]
        return {"cache_features": cache, "feature_cache_used": run.inputs.use_feature_cache(phase), "seconds": seconds, "cpu_seconds": cpu_seconds,
                "steps": phase.steps, "epochs": phase.config.epochs,
                "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    config = load_config(args.config, args.overrides)
    runs = [head_phase(config, False), head_phase(config, True)]
    for r in runs:
        print(f"cache_features={str(r['cache_features']).lower():5s}  {r['epochs']:g} head epochs, {r['steps']} steps in "
              f"{r['seconds']:7.1f} s ({r['cpu_seconds']:7.1f} CPU-s)   val accuracy {100 * r['val_accuracy']:.2f}%")
    uncached, cached = runs
    result = {"runs": runs, "speedup": uncached["seconds"] / cached["seconds"],
              "speedup_cpu_seconds": uncached["cpu_seconds"] / cached["cpu_seconds"],
              "accuracy_difference_points": 100 * (cached["val_accuracy"] - uncached["val_accuracy"])}
    print(f"feature caching: {result['speedup']:.1f}x faster ({result['speedup_cpu_seconds']:.1f}x in CPU time), accuracy difference "
          f"{result['accuracy_difference_points']:+.2f} points")
    print(f"wrote {write_json(config.workdir, 'compare_cache.json', result)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
