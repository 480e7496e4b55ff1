"""python -m job tensorboard WORKDIR: TensorBoard on a workdir, local or remote, while it runs.

A local path (or NFS) goes to TensorBoard as it is. A URI's tensorboard/ folder is mirrored
into a local folder every `every` seconds (new and grown files only) through the job's own
storage (job.storage) while TensorBoard serves that folder: TensorBoard cannot read s3://
(TensorFlow 2.21 has no S3 filesystem), and its gs:// reader (TensorFlow's) knows neither
STORAGE_EMULATOR_HOST nor a private endpoint, so gs:// is mirrored the same way.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from job import storage

log = logging.getLogger(__name__)


def _sync(workdir: storage.Workdir, every: float, stop: threading.Event) -> None:
    while True:
        try:
            workdir.pull("tensorboard", grown_only=True)
        except OSError as err:  # a passing network fault: try again at the next round
            log.warning("could not read %s: %s", workdir.uri("tensorboard"), err)
        if stop.wait(every):
            return


def follow(location: str, host: str, port: int, every: float) -> int:
    """Run TensorBoard on `location`'s tensorboard/ folder until interrupted; its exit status."""
    tensorboard = [os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--host", host, "--port", str(port)]
    if not storage.is_uri(location):
        return subprocess.call([*tensorboard, "--logdir", storage.join(location, "tensorboard")])
    workdir = storage.Workdir.open(location)
    stop = threading.Event()
    os.makedirs(workdir.path("tensorboard"), exist_ok=True)
    workdir.pull("tensorboard")  # once before TensorBoard starts, so its first scan sees the runs
    syncer = threading.Thread(target=_sync, args=(workdir, every, stop), name="tensorboard-sync", daemon=True)
    syncer.start()
    log.info("mirroring %s into %s every %gs", workdir.uri("tensorboard"), workdir.path("tensorboard"), every)
    try:
        return subprocess.call([*tensorboard, "--logdir", workdir.path("tensorboard")])
    finally:
        stop.set()
        syncer.join()
        workdir.close()
