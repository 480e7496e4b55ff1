"""The memory this process may use: its container's limit, as Docker and Kubernetes set it.

A container's limit is the memory controller of the process's own cgroup (found through
/proc/self/cgroup), or of an ancestor: cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`.
Outside a container the limit is the machine's memory. Caches (decoded images, backbone
features, activations of a frozen bottom) are sized against a share of it (job.caches),
because a pod that exceeds its limit is killed without a Python traceback.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

CGROUP_ROOT = "/sys/fs/cgroup"
# v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages): anything above this is none.
_UNLIMITED = 1 << 60


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
    bytes: int
    source: str  # where it came from, for the log: "cgroup v2 memory.max", "physical memory", ...


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return value if 0 < value < _UNLIMITED else None


def _own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> tuple[Optional[str], Optional[str]]:
    """(v2 path, v1 memory-controller path) of this process's cgroup, each None if absent."""
    v2 = v1 = None
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _lowest_limit(root: str, path: str, filename: str) -> Optional[int]:
    """The smallest limit on `path` and its ancestors under `root` (a parent's limit binds its children).

    Inside a container the cgroup namespace makes the own cgroup "/" (the container's own
    mount at `root`), so the walk ends at the root file in both cases."""
    limits = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        value = _read_int(os.path.join(root, *parts[:depth], filename))
        if value is not None:
            limits.append(value)
    return min(limits) if limits else None


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = CGROUP_ROOT) -> MemoryLimit:
    """This process's memory limit: its cgroup's (v2, else v1), if below the machine's memory."""
    physical = physical_memory()
    v2, v1 = _own_cgroups(proc_cgroup)
    candidates = []
    if v2 is not None:
        candidates.append((_lowest_limit(cgroup_root, v2, "memory.max"), "cgroup v2 memory.max"))
    if v1 is not None:
        candidates.append((_lowest_limit(os.path.join(cgroup_root, "memory"), v1, "memory.limit_in_bytes"),
                           "cgroup v1 memory.limit_in_bytes"))
    found = [(value, source) for value, source in candidates if value is not None and value < physical]
    if found:
        return MemoryLimit(*min(found))
    return MemoryLimit(physical, "physical memory")
