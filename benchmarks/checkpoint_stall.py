"""The train-step stall per checkpoint on an s3:// workdir (a local moto_server).

    python benchmarks/checkpoint_stall.py [key=value ...]

Starts moto_server on 127.0.0.1 (pip install -e '.[test]'), runs `python -m job train
configs/tiny.yaml` into a bucket on it, one process, one step per call and a step-time scalar
every step, then reads the run's TensorBoard `<phase>/step_time_ms` back from the bucket.
Each scalar is the wall time since the previous one, so the step after a checkpoint carries
the save and whatever the checkpoint made the training thread wait for (the upload, before
job.uploads). Prints, per checkpoint step, that step time minus the median of the steps of
its phase that follow neither a checkpoint nor a validation, and the mean of those stalls.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = ["train.finetune.epochs=2", "checkpoint.every_steps=4", "telemetry.log_every_steps=1",
            "train.steps_per_call=1", "telemetry.profile_steps=null", "telemetry.progress_bar=false",
            "telemetry.eval_every_epochs=1"]


def main(overrides: list[str]) -> None:
    import tensorflow as tf

    from tests.conftest import S3

    tmp = Path(tempfile.mkdtemp(prefix="stall-"))
    server = S3(tmp)
    try:
        bucket = server.bucket()
        env = dict(os.environ, **server.env, TF_CPP_MIN_LOG_LEVEL="2")
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "job", "train", "configs/tiny.yaml", *SETTINGS, *overrides,
                              f"workdir=s3://{bucket}/run"], cwd=REPO, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"the run failed ({run.returncode}):\n{run.stderr[-3000:]}")
        print(f"run: {time.time() - started:.1f} s wall, load average {os.getloadavg()[0]:.1f}")
        client = server.client()
        keys = [k for k in server.keys(bucket, "run/tensorboard/train/") if "tfevents" in k]
        times: dict[str, dict[int, float]] = {}
        for key in keys:
            local = tmp / key.replace("/", "_")
            client.download_file(bucket, key, str(local))
            for event in tf.compat.v1.train.summary_iterator(str(local)):
                for value in event.summary.value:
                    if value.tag.endswith("/step_time_ms"):
                        phase = value.tag.split("/")[0]
                        times.setdefault(phase, {})[event.step] = float(tf.make_ndarray(value.tensor))
        checkpoints = sorted(int(k.rsplit("ckpt-", 1)[1].split(".")[0]) for k in server.keys(bucket, "run/checkpoints/")
                             if k.endswith(".index"))
        every, epoch = 4, 16  # checkpoint.every_steps above; configs/tiny.yaml: 512 images / batch 32
        stalls = []
        for phase, by_step in times.items():
            steps = sorted(by_step)
            after_checkpoint = {s for s in steps if (s - 1) % every == 0}
            # The first step of a phase (tracing) and those after a validation carry more than a checkpoint.
            validations = {steps[0]} | {s for s in steps if (s - 1) % epoch == 0}
            plain = [by_step[s] for s in steps if s not in after_checkpoint and s not in validations]
            median = statistics.median(plain)
            print(f"{phase}: median step {median:.0f} ms over {len(plain)} steps")
            for s in sorted(after_checkpoint - validations):
                stalls.append(by_step[s] - median)
                print(f"  step {s} (after the checkpoint of step {s - 1}): {by_step[s]:.0f} ms, stall {by_step[s] - median:+.0f} ms")
        print(f"mean stall per checkpoint: {statistics.mean(stalls):.0f} ms over {len(stalls)} checkpoints "
              f"(checkpoints kept in the bucket: {checkpoints})")
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
