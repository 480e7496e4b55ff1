"""The job's fine-tune step against a plain Keras `model.fit` of the same model, in one run.

    TFDS_DATA_DIR=../shared/datasets KERAS_HOME=../shared/keras \\
      .venv/bin/python benchmarks/compare_fit.py configs/benchmark.yaml [key=value ...] [--rounds 9 --steps 4]

Two references train the way TensorFlow's transfer-learning tutorial does: numpy arrays
into `fit`, resizing and scaling as layers at the model's input, Keras defaults otherwise
(on a CPU-only machine `jit_compile="auto"` means no XLA). Both are the job's network
(job.model.build_model: same weights, dropout, image size), batch size and precision:
  fit_same      unfrozen like the job (BatchNorm frozen, so in inference mode): the same math;
  fit_tutorial  unfrozen as the tutorial's code does (`base_model.trainable = True`). Its
                `base_model(x, training=False)` does not survive Keras 3, which passes fit's
                training=True down into nested models: BatchNorm then trains on batch statistics.
Short rounds alternate all sides, so load from other processes on a shared machine hits
each alike; images per CPU-second of this process are reported next to images per wall
second, being much less moved by that load. Prints medians and ratios and writes
<workdir>/compare_fit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import keras
import numpy as np

from job import data as data_lib
from job.benchmark import run_steps, scratch_trainer, synthetic_dataset, write_json
from job.config import Config, load_config
from job.model import build_model, set_backbone_trainable


def clocks() -> tuple[float, float]:
    """(wall, CPU seconds of this process). On a shared machine wall time moves with other
    processes' load; CPU time much less, so rates per CPU-second are reported too."""
    return time.perf_counter(), time.process_time()


def rates(images: int, start: tuple, stop: tuple) -> tuple[float, float]:
    """Images per wall second and per CPU second between two clocks()."""
    return images / (stop[0] - start[0]), images / (stop[1] - start[1])


class BatchTimes(keras.callbacks.Callback):
    """clocks() at the end of every train batch."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, float]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(clocks())


def tutorial_model(config: Config, num_classes: int, native_shape: tuple, as_written: bool) -> keras.Model:
    """numpy images in, resized and scaled inside the model, fine-tune layers unfrozen, compiled."""
    m, phase = config.model, config.train.finetune
    model = build_model(m, num_classes, config.train.precision)
    if as_written:
        model.backbone.trainable = True
        if phase.unfreeze != "all":
            for layer in model.backbone.layers[:-phase.unfreeze]:
                layer.trainable = False
    else:
        set_backbone_trainable(model, phase.unfreeze)
    inputs = keras.Input(native_shape)
    x = keras.layers.Resizing(m.image_size, m.image_size, interpolation="bilinear")(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(x)
    reference = keras.Model(inputs, model.classifier(x))
    reference.compile(optimizer=keras.optimizers.Adam(phase.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return reference


def numpy_split(config: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split as numpy arrays, the way the tutorial feeds `fit`: float32 images, integer labels."""
    batches = [(x.numpy(), y.numpy()) for x, y in data_lib.load_images(config.data, split).batch(1024)]
    return np.concatenate([x for x, _ in batches]).astype("float32"), np.concatenate([y for _, y in batches])


def compare(config: Config, rounds: int, steps: int) -> dict:
    with scratch_trainer(config) as trainer:
        run = trainer.run
        batch, per_call = run.global_batch, config.train.steps_per_call
        phase = next(p for p in run.phases if p.name == "finetune")
        job_steps = run.step_functions(phase)
        job_data = iter(run.inputs.datasets(phase, 0)[0])
        job_synthetic = iter(synthetic_dataset(run, phase))

        x, y = numpy_split(config, config.data.train_split)
        if len(x) < (steps + 1) * batch:
            raise SystemExit(f"data.train_split has {len(x)} images; --steps {steps} needs {(steps + 1) * batch}")
        references = {name: tutorial_model(config, run.info.num_classes, x.shape[1:], as_written)
                      for name, as_written in (("fit_same", False), ("fit_tutorial", True))}

        def fit_rate(reference) -> tuple[float, float]:
            timer = BatchTimes()
            reference.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps + 1, shuffle=True, verbose=0,
                          callbacks=[timer])
            # From the end of the first batch: fit's own set-up per call is not a train step.
            return rates(steps * batch, timer.times[0], timer.times[-1])

        def job_rate(iterator) -> tuple[float, float]:
            start = clocks()
            run_steps(job_steps, iterator, steps, per_call)
            return rates(steps * batch, start, clocks())

        # Warm-up: tracing, the shuffle buffer, XLA compilation if on.
        for reference in references.values():
            fit_rate(reference)
        run_steps(job_steps, job_data, 2 * per_call, per_call)
        run_steps(job_steps, job_synthetic, 2 * per_call, per_call)
        rows, cpu_rows = [], []
        for index in range(rounds):
            row = {name: fit_rate(reference) for name, reference in references.items()}
            row.update(job_e2e=job_rate(job_data), job_step=job_rate(job_synthetic))
            rows.append({k: wall for k, (wall, _) in row.items()})
            cpu_rows.append({k: cpu for k, (_, cpu) in row.items()})
            print(f"round {index + 1}: " + ", ".join(f"{k} {w:.1f} img/s ({c:.1f}/CPU-s)" for k, (w, c) in row.items()),
                  flush=True)
        medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        cpu_medians = {k: statistics.median(r[k] for r in cpu_rows) for k in cpu_rows[0]}
        fit = references["fit_same"]
        return {
            "settings": {"image_size": config.model.image_size, "batch": batch, "precision": config.train.precision,
                         "unfreeze": config.train.finetune.unfreeze, "job_jit_compile": config.train.jit_compile,
                         "job_steps_per_call": per_call, "job_resize_on": config.data.resize_on,
                         "fit_jit_compile": fit.jit_compile, "fit_steps_per_execution": fit.steps_per_execution,
                         "strategy": type(run.strategy).__name__, "replicas": run.replicas},
            "rounds": rows,
            "rounds_per_cpu_second": cpu_rows,
            "median_images_per_sec": medians,
            "median_images_per_cpu_second": cpu_medians,
            "ratios": {f"{job}_vs_{ref}": medians[job] / medians[ref]
                       for job in ("job_e2e", "job_step") for ref in references},
            "ratios_per_cpu_second": {f"{job}_vs_{ref}": cpu_medians[job] / cpu_medians[ref]
                                      for job in ("job_e2e", "job_step") for ref in references},
            "per_round_ratio_job_e2e_vs_fit_same": statistics.median(r["job_e2e"] / r["fit_same"] for r in rows),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4, help="train steps per round and side (short: load changes fast)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    config = load_config(args.config, args.overrides)
    result = compare(config, args.rounds, args.steps)
    s, m = result["settings"], result["median_images_per_sec"]
    print(f"settings: {json.dumps(s)}")
    ratios, cpu, cpu_ratios = result["ratios"], result["median_images_per_cpu_second"], result["ratios_per_cpu_second"]
    print("                           img/s (wall)  img/CPU-s   ratio to fit same model / fit tutorial's code (wall; CPU)")
    print(f"model.fit, same model      {m['fit_same']:8.1f}   {cpu['fit_same']:8.1f}")
    print(f"model.fit, tutorial's code {m['fit_tutorial']:8.1f}   {cpu['fit_tutorial']:8.1f}     (BatchNorm on batch statistics)")
    for job, text in (("job_e2e", "job train step, end to end"), ("job_step", "job train step alone      ")):
        print(f"{text} {m[job]:8.1f}   {cpu[job]:8.1f}     {ratios[f'{job}_vs_fit_same']:.2f}x / "
              f"{ratios[f'{job}_vs_fit_tutorial']:.2f}x;  {cpu_ratios[f'{job}_vs_fit_same']:.2f}x / "
              f"{cpu_ratios[f'{job}_vs_fit_tutorial']:.2f}x")
    print(f"wrote {write_json(config.workdir, 'compare_fit.json', result)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
