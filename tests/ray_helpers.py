"""Helpers for the tests that run the job on Ray: a two-node local cluster started with
`ray start`, waiting on conditions, and reading what the workers record in the workdir.

The cluster is stopped by ending the `ray start --block` processes it started (and whatever
they left), never with `ray stop`, which ends every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import DATASETS, KERAS_HOME, WEIGHTS, job_env, tiny

RAY = str(Path(sys.executable).with_name("ray"))

# A few steps: 128 images = 4 steps an epoch at batch 32, each phase one epoch, 32 px,
# random weights (the point is distribution, not accuracy).
TINY_RAY = tiny("data.train_split=train[:128]", "data.val_split=train[49936:]", "checkpoint.every_steps=1000",
                "ray.num_workers=2", "ray.cpus_per_worker=1")


def data_env() -> dict:
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {DATASETS.parent}")
    return {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}


def wait_for(condition, timeout: float, what: str, interval: float = 0.5, alive=None):
    """Poll `condition()` until it returns something truthy; fail after `timeout` s or if `alive()` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"the process ended while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def digests(workdir: Path) -> dict:
    """{step: {rank: weights sha256}} from the replica records each worker adds to the workdir at each checkpoint."""
    found: dict = {}
    for entry in local_replica_records(workdir):
        found.setdefault(entry["step"], {})[entry["rank"]] = entry["weights_sha256"]
    return found


class LocalCluster:
    """A head and a second node, each a `ray start --block` with 1 CPU, on loopback.

    The nodes are 127.0.0.2 and 127.0.0.3: Ray swaps 127.0.0.1 for the host's routable IP
    (services.resolve_ip_for_localhost), other loopback addresses it keeps, and two node IPs
    make them two nodes to Ray Train as well (node_rank).
    """

    def __init__(self, env: dict):
        self.tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.head_ip = "127.0.0.2"
        (self.gcs, self.dashboard, client, *self._ports) = free_ports(11)
        # Our own token: independent of ~/.ray/auth_token, which other Ray users on the box share.
        self.env = job_env({**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.processes: list[subprocess.Popen] = []
        head = ["--head", f"--port={self.gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={client}"]
        try:
            self._start("head", "127.0.0.2", head + self._agent_ports(0))
            wait_for(self._job_server_up, 120, "the head's job server")
            self._start("node2", "127.0.0.3", [f"--address={self.head_ip}:{self.gcs}"] + self._agent_ports(4))
            wait_for(lambda: self._alive_nodes() == 2, 120, "2 alive nodes")
        except BaseException:
            self.stop()  # no fixture will: leave no Ray processes behind
            raise

    def _agent_ports(self, first: int) -> list[str]:
        # Every node on this host needs its own agent ports, or the second collides with the first.
        p = self._ports[first:first + 4]
        return [f"--dashboard-agent-listen-port={p[0]}", f"--dashboard-agent-grpc-port={p[1]}",
                f"--runtime-env-agent-port={p[2]}", f"--metrics-export-port={p[3]}"]

    def _start(self, name: str, ip: str, args: list[str]) -> None:
        # Each node its own temp dir: sharing one, each node's log monitor would forward both nodes' logs.
        temp_dir = os.path.join(self.tmp, name)
        with open(os.path.join(self.tmp, f"{name}.log"), "w") as log:
            self.processes.append(subprocess.Popen(
                [RAY, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                 "--disable-usage-stats", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _ray(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def _job_server_up(self) -> bool:
        return self._ray("job", "list", "--address", self.address).returncode == 0

    def _alive_nodes(self) -> int:
        listed = self._ray("list", "nodes", "--address", self.address, "--format", "json")
        try:
            nodes = json.loads(listed.stdout) if listed.returncode == 0 else []
        except ValueError:  # before any node registers, it prints "No resource in the cluster"
            nodes = []
        return sum(node.get("state") == "ALIVE" for node in nodes)

    def actors(self, class_name: str) -> int:
        """How many actors of `class_name` the cluster has had (alive or dead), from Ray's state API."""
        listed = self._ray("list", "actors", "--address", self.address, "--filter", f"class_name={class_name}",
                           "--limit", "10000", "--format", "json")
        assert listed.returncode == 0, listed.stderr[-2000:]
        if listed.stdout.startswith("No resource"):  # what it prints for none
            return 0
        return len(json.loads(listed.stdout))

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{self.gcs}"

    def log(self, name: str) -> str:
        return Path(self.tmp, f"{name}.log").read_text()

    def stop(self) -> None:
        """SIGTERM to our `ray start --block` processes and everything they started, all at
        once (one by one, Ray's graceful shutdown takes half a minute); SIGKILL what is left."""
        ours = []
        for process in self.processes:
            try:
                parent = psutil.Process(process.pid)
                ours += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in ours:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(ours, timeout=15)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        for process in self.processes:
            process.wait(timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def store_has_checkpoint(workdir: Path):
    """The newest checkpoint complete in a local workdir (its `checkpoint` index names it), or None."""
    try:
        return (workdir / "checkpoints" / "checkpoint").read_text().split('"')[1]
    except (OSError, IndexError):
        return None


def s3_store_has_checkpoint(s3, bucket: str, workdir: str):
    """The newest checkpoint complete in an s3:// workdir (its `checkpoint` index names it), or None."""
    if f"{workdir}/checkpoints/checkpoint" not in s3.keys(bucket, f"{workdir}/checkpoints/"):
        return None
    body = s3.client().get_object(Bucket=bucket, Key=f"{workdir}/checkpoints/checkpoint")["Body"].read().decode()
    return body.split('"')[1]


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def replica_records(s3, bucket: str, workdir: str) -> list[dict]:
    """The replica records every worker adds to an s3:// workdir at each checkpoint (replicas/rank-<k>-<pid>.jsonl)."""
    client = s3.client()
    return [record for key in s3.keys(bucket, f"{workdir}/replicas/") if re.search(r"/rank-\d+-\d+\.jsonl$", key)
            for record in _records(client.get_object(Bucket=bucket, Key=key)["Body"].read().decode())]


def local_replica_records(workdir: Path) -> list[dict]:
    """The replica records every worker adds to a local workdir at each checkpoint."""
    return [record for p in sorted(workdir.glob("replicas/rank-*.jsonl")) for record in _records(p.read_text())]


def start_job(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """`python -m job ARGS` in the background, its output into `log_path`."""
    from tests.conftest import REPO

    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "job", *args], cwd=REPO, env=job_env(env), stdout=log,
                                stderr=subprocess.STDOUT)
