"""Where a run's files live: a local or NFS path, or an object-store URI (s3://, gs://).

TensorFlow 2.21 writes checkpoints, summaries and profiles to local paths only (its gfile
has gs:// but no s3://, and its gs:// ignores STORAGE_EMULATOR_HOST), so with a URI every
process writes into node-local scratch and mirrors what it wrote to the URI through
pyarrow.fs (shipped with Ray; it honours the standard AWS variables, AWS_ENDPOINT_URL
included, so MinIO, Ceph and R2 work too; gs:// goes to the endpoint STORAGE_EMULATOR_HOST
names when it is set). With a local path, `Workdir.local` is the path itself and every push
and pull does nothing: one code path for both.

A URI never goes through os.path (`os.path.abspath("s3://b/x")` is `<cwd>/s3:/b/x`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Optional

from job.errors import StorageUnavailable, WorkdirBusy, WorkdirError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_SCHEME.match(location))


def join(location: str, *parts: str) -> str:
    """os.path.join for paths, '/'-joining for URIs."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _gcs_emulator(uri: str):
    """(GcsFileSystem, path) on the endpoint STORAGE_EMULATOR_HOST names, or None.

    STORAGE_EMULATOR_HOST (`http://host:port`, or `host:port`) is the variable Google's own
    client libraries honour for an emulator (fake-gcs-server) or a private GCS-compatible
    endpoint; requests then go there anonymously, over its scheme (http when none is given).
    """
    from urllib.parse import urlsplit

    from pyarrow import fs

    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host or not uri.startswith("gs://"):
        return None
    endpoint = urlsplit(host if "://" in host else f"http://{host}")
    if not endpoint.netloc:
        raise ValueError(f"STORAGE_EMULATOR_HOST={host!r} is not http(s)://host:port")
    store = fs.GcsFileSystem(anonymous=True, scheme=endpoint.scheme, endpoint_override=endpoint.netloc,
                             retry_time_limit=datetime.timedelta(seconds=15))
    return store, uri[len("gs://"):].rstrip("/")


# Every S3 request is bounded, so a store that stops answering fails a request instead of
# hanging it: connecting, and then receiving nothing for REQUEST_TIMEOUT_S (curl's low-speed
# limit: a transfer that makes progress is never cut), each retried by the AWS SDK
# S3_ATTEMPTS times. Longer outages are job.uploads' to ride out (storage.outage_timeout_s).
CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, S3_ATTEMPTS = 5, 10, 3


@functools.lru_cache(maxsize=32)
def _s3(bucket: str, endpoint: str, region: str):
    from pyarrow import fs

    if not region and not endpoint:
        region = fs.resolve_s3_region(bucket)
    return fs.S3FileSystem(region=region or None, endpoint_override=endpoint or None,
                           connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                           retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


def filesystem(uri: str):
    """(pyarrow FileSystem, path within it) for a URI; gs:// goes to STORAGE_EMULATOR_HOST when it is set.

    s3:// honours the standard AWS variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for MinIO,
    Ceph, R2 or a local server; AWS_REGION / AWS_DEFAULT_REGION, else the bucket's own region)
    and bounds every request (CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S)."""
    from pyarrow import fs

    try:
        if uri.startswith("s3://"):
            path = uri[len("s3://"):].rstrip("/")
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
            return _s3(path.split("/", 1)[0], endpoint, region), path
        return _gcs_emulator(uri) or fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - unknown scheme, bad URI, missing credentials...
        raise WorkdirError(f"{uri!r}: cannot open ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


def uri_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot be used (no such bucket, no access), checked without writing; None if fine."""
    from pyarrow import fs

    try:
        store, path = filesystem(uri)
        bucket = path.split("/", 1)[0]
        if store.get_file_info(bucket).type == fs.FileType.NotFound:
            return f"bucket {bucket!r} does not exist (or is not visible with these credentials)"
    except WorkdirError as err:
        return str(err)
    except OSError as err:
        return f"cannot reach it ({str(err).splitlines()[0][:160]})"
    return None


def _remote_files(store, root: str) -> dict[str, int]:
    """{path relative to root: size} of the files under `root` in `store`."""
    from pyarrow import fs

    if store.get_file_info(root).type != fs.FileType.Directory:
        return {}
    return {info.path[len(root):].lstrip("/"): info.size
            for info in store.get_file_info(fs.FileSelector(root, recursive=True)) if info.type == fs.FileType.File}


def _upload(local_path: str, store, remote_path: str, progress=None) -> None:
    """Copy a local file to the store; `progress()` after every MB handed over (a store that
    takes them is answering)."""
    with open(local_path, "rb") as source, store.open_output_stream(remote_path) as sink:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
            if progress:
                progress()


def local_files(local: str) -> dict[str, str]:
    """{path relative to `local`: path} of the file `local` ("": itself) or of the files under it,
    leaving out the ones being written (.part, .tmp, TensorFlow's <checkpoint>_temp folders)."""
    if os.path.isfile(local):
        return {"": local}
    return {os.path.relpath(os.path.join(root, f), local): os.path.join(root, f)
            for root, _, names in os.walk(local) if not root.endswith("_temp")
            for f in names if not f.endswith((".part", ".tmp"))}


def _download(store, remote_path: str, local_path: str) -> None:
    os.makedirs(os.path.dirname(local_path), exist_ok=True)
    tmp = local_path + ".part"
    with store.open_input_stream(remote_path) as source, open(tmp, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    os.replace(tmp, local_path)


def node_cache(*parts: str) -> str:
    """A folder on this node shared by the runs on it (data mirrored from URIs): JOB_CACHE_DIR, else ~/.cache/mobilenet-transfer."""
    root = os.environ.get("JOB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mobilenet-transfer")
    return os.path.join(root, *parts)


def fetch_tree(uri: str, local: str, metadata_only: bool = False) -> bool:
    """Mirror the files under `uri` into `local` once per node; False if `uri` holds none.

    Under a file lock, so two processes on a node never write the same file; a `.complete`
    marker, written last, makes later calls free. `metadata_only` fetches only the small
    files (not the record shards), for checks that read a dataset's description.
    """
    from filelock import FileLock

    marker = os.path.join(local, ".complete")
    if os.path.exists(marker):
        return True
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with FileLock(local + ".lock"):
        if os.path.exists(marker):
            return True
        store, root = filesystem(uri)
        files = _remote_files(store, root)
        for rel in files:
            is_shard = "tfrecord" in rel or "array_record" in rel
            if not (metadata_only and is_shard) and not os.path.exists(os.path.join(local, rel)):
                _download(store, f"{root}/{rel}", os.path.join(local, rel))
        if files and not metadata_only:
            open(marker, "w").close()
        return bool(files)


@dataclasses.dataclass
class Workdir:
    """A run's workdir: `location` as configured (absolute path or URI) and `local`, the
    directory this process writes into (the path itself, or node-local scratch for a URI)."""

    location: str
    local: str
    # (size, mtime) of each file as last pushed or pulled, by its path in the store: only what changed is sent again.
    _pushed: dict = dataclasses.field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return is_uri(self.location)

    @classmethod
    def open(cls, location: str) -> "Workdir":
        """A local path resolved against the current directory, or a URI with fresh scratch."""
        if not is_uri(location):
            path = os.path.abspath(location)
            return cls(path, path)
        scratch = tempfile.mkdtemp(prefix="workdir-")
        return cls(location.rstrip("/"), scratch)

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def uri(self, *parts: str) -> str:
        return join(self.location, *parts)

    def push(self, name: str, mirror: bool = False, last: tuple[str, ...] = (), files: Optional[dict] = None,
             progress=None, sent=None) -> None:
        """Send local file or folder `name` to the workdir (changed files only). `mirror` also
        deletes what is no longer here (rotated checkpoints); files named in `last` go last
        (an index that names the others). `files`: {relative path: local file} to send instead
        of what `name` holds now (job.uploads' snapshot of it); `progress()` as data goes out;
        `sent()` once every file is in the store, before the deletions."""
        if not self.remote:
            return
        files = local_files(self.path(name)) if files is None else files
        store, root = filesystem(self.uri(name))
        order = sorted(files, key=lambda rel: os.path.basename(rel) in last)
        for rel in order:
            path, remote = files[rel], f"{root}/{rel}" if rel else root
            stat = os.stat(path)
            if self._pushed.get(remote) != (stat.st_size, stat.st_mtime_ns):
                _upload(path, store, remote, progress)
                self._pushed[remote] = (stat.st_size, stat.st_mtime_ns)
            if progress:
                progress()
        if sent:
            sent()
        if mirror and "" not in files:
            for rel in set(_remote_files(store, root)) - set(files):
                store.delete_file(f"{root}/{rel}")
                self._pushed.pop(f"{root}/{rel}", None)
                if progress:
                    progress()

    def pull(self, name: str, grown_only: bool = False) -> bool:
        """Fetch file or folder `name` from the workdir into local scratch; False if it has none.
        `grown_only` skips files whose local copy has the remote size (append-only event files)."""
        if not self.remote:
            return os.path.exists(self.path(name))
        from pyarrow import fs

        store, root = filesystem(self.uri(name))
        info = store.get_file_info(root)
        if info.type == fs.FileType.File:
            _download(store, root, self.path(name))
            return True
        files = _remote_files(store, root)
        for rel, size in files.items():
            local = self.path(name, rel)
            if grown_only and os.path.exists(local) and os.path.getsize(local) == size:
                continue
            _download(store, f"{root}/{rel}", local)
            stat = os.stat(local)
            self._pushed[f"{root}/{rel}"] = (stat.st_size, stat.st_mtime_ns)
        return bool(files)

    def claimed(self, owner: bool):
        """Create the workdir and, if `owner`, hold it for this run: an flock on a path, a lease on a URI.

        Called once settings, data and weights are known good, so bad input never leaves files behind.
        """
        try:
            os.makedirs(self.local, exist_ok=True)
        except OSError as err:
            raise WorkdirError(f"workdir={self.location!r}: cannot create or write it ({err.strerror}: {err.filename})") from None
        if not owner:
            return contextlib.nullcontext()
        return RemoteLease(self) if self.remote else WorkdirLock(self.local)

    def close(self) -> None:
        """Free the scratch of a URI workdir (what mattered has been pushed)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class WorkdirLock:
    """An advisory lock on <workdir>/.lock (filelock's, an flock underneath: released on exit or
    crash), the file holding the owner's pid for the message a second run gets."""

    def __init__(self, workdir: str):
        from filelock import FileLock

        self._path = os.path.join(workdir, ".lock")
        # Not a singleton: a second WorkdirLock, even in this process, is refused like another
        # run's. The file stays on release (it names the last owner; another run reads it).
        self._lock = FileLock(self._path, blocking=False, is_singleton=False, thread_local=False,
                              preserve_lock_file=True, on_acquired=self._write_owner)

    @staticmethod
    def _write_owner(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def __enter__(self):
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            try:
                with open(self._path) as f:
                    owner = f.read().strip() or "unknown"
            except OSError:
                owner = "unknown"
            raise WorkdirBusy(f"workdir {os.path.dirname(self._path)!r} is in use by a live run (pid {owner}); "
                              "wait for it, stop it, or choose another workdir") from None
        except OSError as err:
            raise WorkdirError(f"workdir={os.path.dirname(self._path)!r}: cannot create or write it "
                               f"({err.strerror}: {err.filename})") from None
        return self

    def __exit__(self, *exc):
        if self._lock.is_locked:
            self._lock.release()


class LeaseTaken(Exception):
    """A conditional write of the lease found another run's lease there (S3 412 / 409)."""


class RemoteLease:
    """Object stores have no flock: the run writes `<workdir>/.lock.json` (run id, host, pid)
    and rewrites it every HEARTBEAT_SECONDS while it lives; another run refuses the workdir
    while that lease is fresh, unless it names a process on this host that is gone.

    On s3:// every write of the lease is conditional (PutObject If-None-Match: * to create it,
    If-Match: <the ETag last seen> to renew or take over a stale one), so of two runs that
    start together, or take over the same stale lease together, exactly one gets it. Other
    stores (gs:// through pyarrow, which has no preconditions) write, then read back: two
    runs that start within the same moment can both get past that check.
    """

    NAME = ".lock.json"
    HEARTBEAT_SECONDS = 60
    STALE_SECONDS = 300

    def __init__(self, workdir: Workdir):
        self.workdir = workdir
        self.record = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                       "started": _now()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.conditional = self.workdir.uri(self.NAME).startswith("s3://")
        self._etag: Optional[str] = None

    # --- s3://: conditional writes (boto3) ----------------------------------------------------
    def _s3(self):
        import boto3
        from botocore.config import Config

        logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines (credentials found...) are noise
        bucket, key = self.workdir.uri(self.NAME)[len("s3://"):].split("/", 1)
        client = boto3.client("s3", config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                                                  retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}))
        return client, bucket, key

    def _put(self, **condition) -> str:
        """Write the lease under `condition` (IfNoneMatch="*" or IfMatch=etag); its new ETag.
        LeaseTaken if the condition does not hold; OSError for anything else."""
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket, key = self._s3()
        body = json.dumps({**self.record, "heartbeat": _now()}).encode()
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                raise LeaseTaken() from None
            raise OSError(str(err)) from None
        except BotoCoreError as err:
            raise OSError(str(err)) from None

    def _get(self) -> tuple[Optional[dict], Optional[str]]:
        """(the lease in the store, its ETag), or (None, None)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket, key = self._s3()
        try:
            found = client.get_object(Bucket=bucket, Key=key)
            body, etag = found["Body"].read(), found["ETag"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise OSError(str(err)) from None
        except BotoCoreError as err:
            raise OSError(str(err)) from None
        try:
            return json.loads(body), etag
        except ValueError:
            return None, etag

    # --- any store ------------------------------------------------------------------------------
    def _read(self) -> Optional[dict]:
        store, path = filesystem(self.workdir.uri(self.NAME))
        try:
            with store.open_input_stream(path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "NoSuchKey" in str(err):
                return None
            raise

    def _write(self) -> None:
        """An unconditional write (the lease of a store without preconditions)."""
        store, path = filesystem(self.workdir.uri(self.NAME))
        with store.open_output_stream(path) as f:
            f.write(json.dumps({**self.record, "heartbeat": _now()}).encode())

    def _alive(self, other: dict) -> bool:
        if other["host"] == socket.gethostname():
            try:
                os.kill(other["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        age = time.time() - datetime.datetime.fromisoformat(other["heartbeat"]).timestamp()
        return age < self.STALE_SECONDS

    def _busy(self, other: dict) -> WorkdirBusy:
        return WorkdirBusy(
            f"workdir {self.workdir.location!r} is in use by run {other['run']} (host {other['host']}, pid "
            f"{other['pid']}, last seen {other['heartbeat']}); wait for it, stop it, or, if it is dead, delete "
            f"{self.workdir.uri(self.NAME)}")

    def _claim_conditionally(self) -> None:
        try:
            self._etag = self._put(IfNoneMatch="*")
            return
        except LeaseTaken:
            pass
        other, etag = self._get()
        if other and other.get("run") != self.record["run"] and self._alive(other):
            raise self._busy(other)
        try:  # a stale or unreadable lease: taken over only if nobody else took it since we read it
            self._etag = self._put(IfMatch=etag) if etag else self._put(IfNoneMatch="*")
        except LeaseTaken:
            raise WorkdirBusy(f"workdir {self.workdir.location!r} was claimed by another run at the same moment") from None

    def __enter__(self):
        if self.conditional:
            self._claim_conditionally()
        else:
            other = self._read()
            if other and other["run"] != self.record["run"] and self._alive(other):
                raise self._busy(other)
            self._write()
            # No preconditions here: two runs that start within the same moment both write;
            # the later one wins, and the earlier one finds out here if it reads after that.
            if (self._read() or {}).get("run") != self.record["run"]:
                raise WorkdirBusy(f"workdir {self.workdir.location!r} was claimed by another run at the same moment")
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                if self.conditional:
                    self._etag = self._put(IfMatch=self._etag)
                else:
                    self._write()
            except LeaseTaken:
                other = self._read() or {}
                log.error("the workdir lease %s was taken over by run %s (host %s, pid %s): it had not been renewed "
                          "for %ds; two runs may now write this workdir", self.workdir.uri(self.NAME),
                          other.get("run"), other.get("host"), other.get("pid"), self.STALE_SECONDS)
                return
            except OSError as err:  # a passing network fault: the next beat tries again
                log.warning("could not renew the workdir lease %s: %s", self.workdir.uri(self.NAME), err)

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if isinstance(exc, StorageUnavailable):
            # The store is away: no request to it (each would wait out its timeouts). The lease
            # names this process, so a rerun on this host takes it over at once; elsewhere it
            # goes stale after STALE_SECONDS.
            return
        if self._thread:
            self._thread.join()
        store, path = filesystem(self.workdir.uri(self.NAME))
        try:
            if (self._read() or {}).get("run") == self.record["run"]:
                store.delete_file(path)
        except OSError as err:  # the run's own outcome matters more than the lease's release
            log.warning("could not release the workdir lease %s (%s); it goes stale in %ds",
                        self.workdir.uri(self.NAME), " ".join(str(err).split())[:160], self.STALE_SECONDS)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
