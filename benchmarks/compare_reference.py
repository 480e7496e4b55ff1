"""The quick recipe against the classic Keras MobileNetV2 CIFAR-10 tutorial, one after the other.

    TFDS_DATA_DIR=../shared/datasets KERAS_HOME=../shared/keras \\
      .venv/bin/python benchmarks/compare_reference.py REFERENCE_SCRIPT [CONFIG] [key=value ...] [--workdir DIR]

REFERENCE_SCRIPT is the tutorial as written (32 px into the frozen backbone, Dense(128) head,
10 epochs; then the whole backbone at Adam 1e-5 for 5 epochs with BatchNorm in training
mode), taking `DATA_DIR WEIGHTS_H5 [--train-split S --eval-split S]` and printing
`reference phase 2 (fine-tune): accuracy=A total_wall_s=T`. Both run as commands on the same
machine, the reference first, each timed from its start to its end (start-up, data, training,
evaluation; the job's export included); both train on train[:90%] and are scored on
train[90%:]. Prints both accuracies and wall times and the job's share of the reference's
time, and writes <workdir>/compare_reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(command: list[str], log_path: str) -> tuple[float, str]:
    """Run `command` (its output into `log_path`); (wall seconds, its output)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    output = open(log_path).read()
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({result.returncode}); see {log_path}:\n{output[-3000:]}")
    return seconds, output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the tutorial script (e.g. ../shared/reference/seed_tutorial.py)")
    parser.add_argument("config", nargs="?", default="configs/cifar10_quick.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--workdir", default="runs/compare_reference")
    args = parser.parse_intermixed_args(argv)
    data_dir = os.environ.get("TFDS_DATA_DIR")
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    weights = os.path.join(keras_home, "models", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    if not data_dir or not os.path.isfile(weights):
        raise SystemExit("set TFDS_DATA_DIR (a data_dir with cifar10) and KERAS_HOME (with the MobileNetV2 weights)")
    os.makedirs(args.workdir, exist_ok=True)
    workdir = os.path.abspath(args.workdir)

    ref_seconds, ref_out = timed([sys.executable, os.path.abspath(args.reference), data_dir, weights,
                                  "--train-split", "train[:90%]", "--eval-split", "train[90%:]"],
                                 os.path.join(workdir, "reference.log"))
    ref_accuracy = float(re.search(r"phase 2 \(fine-tune\): accuracy=([0-9.]+)", ref_out)[1])
    ref_frozen = float(re.search(r"phase 1 \(frozen\): accuracy=([0-9.]+)", ref_out)[1])
    run_dir = os.path.join(workdir, "job")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    job_seconds, job_out = timed([sys.executable, "-m", "job", "train", args.config, f"workdir={run_dir}",
                                  "telemetry.progress_bar=false", *args.overrides], os.path.join(workdir, "job.log"))
    final = json.loads([line for line in job_out.splitlines() if line.startswith("{")][-1])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    result = {"reference": {"seconds": round(ref_seconds, 1), "val_accuracy": ref_accuracy,
                            "val_accuracy_after_frozen_phase": ref_frozen},
              "job": {"seconds": round(job_seconds, 1), "val_accuracy": final["final_val_accuracy"],
                      "config": args.config, "overrides": args.overrides, "time_to_accuracy": summary["time_to_accuracy"]},
              "time_ratio": job_seconds / ref_seconds, "load_average_after": os.getloadavg()}
    print(f"reference (tutorial as written)  {ref_seconds:7.1f} s   val accuracy {100 * ref_accuracy:.2f}% "
          f"(after its frozen phase {100 * ref_frozen:.2f}%)")
    print(f"job ({args.config})  {job_seconds:7.1f} s   val accuracy {100 * final['final_val_accuracy']:.2f}%")
    print(f"job / reference wall time: {result['time_ratio']:.3f}")
    for row in summary["time_to_accuracy"]:
        print(f"  time to {100 * row['threshold']:.0f}%: {row['wall_seconds']:.1f} s, {row['images_seen']} images, {row['phase']}")
    with open(os.path.join(workdir, "compare_reference.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.join(workdir, 'compare_reference.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
