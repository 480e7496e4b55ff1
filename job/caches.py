"""Where each cache of a run goes: memory only when it fits the container's limit.

A worker may cache decoded images, their encoded bytes, backbone features and activations of a
frozen bottom. Each is put in memory only if it fits in what is left of this worker's share of
the memory limit (job.container: data.memory_share of it, split over the node's workers);
otherwise the images stream from their files (decoded each epoch) and the features or
activations are not cached (the phase trains on images). One log line says where each went.
"""

from __future__ import annotations

import logging
import math

from job import data as data_lib
from job.config import DataConfig
from job.container import MemoryLimit, memory_limit
from job.sources import DatasetInfo

log = logging.getLogger(__name__)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MB"


class CacheBudget:
    """This worker's share of the memory limit, spent cache by cache."""

    def __init__(self, share: float, workers_on_node: int = 1, limit: MemoryLimit = None):
        self.limit = limit or memory_limit()
        self.total = int(self.limit.bytes * share / max(workers_on_node, 1))
        self.left = self.total
        self.placed: list[str] = []

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.left

    def take(self, what: str, nbytes: int, where: str = "memory") -> None:
        if where == "memory":
            self.left -= nbytes
        self.placed.append(f"{what} {_mb(nbytes)} -> {where}")

    def refuse(self, what: str, nbytes: int, instead: str) -> None:
        self.placed.append(f"{what} {_mb(nbytes)} -> not cached ({instead})")

    def statement(self) -> str:
        return (f"caches (budget {_mb(self.total)} of this worker, the {self.limit.source} "
                f"{_mb(self.limit.bytes)}): " + "; ".join(self.placed))


def image_cache(data: DataConfig, info: DatasetInfo, splits: list[str], image_size: int, budget: CacheBudget,
                pipelines: int = 1) -> DataConfig:
    """`data` with data.cache decided: "auto" becomes memory (decoded images fit), raw (their
    encoded bytes fit) or none (stream from the files); an explicit setting is kept and counted."""
    counts = {split: info.split_sizes[split] for split in splits if split}
    size = data_lib.cache_size(data, info.image_shape, image_size)
    decoded = data_lib.cache_bytes(sum(counts.values()), info.image_shape, size) // max(pipelines, 1)
    encoded = sum(info.split_bytes.get(split, 0) for split in counts) // max(pipelines, 1)
    form = f"{size}x{size}" if size else "x".join(str(n) for n in info.image_shape[:2])
    what = f"decoded images (uint8 {form}, {', '.join(f'{s}: {n}' for s, n in counts.items())})"
    choice = data.cache
    if choice == "auto":
        if budget.fits(decoded):
            choice = "memory"
        elif encoded and budget.fits(encoded):
            choice = "raw"
        else:
            choice = "none"
    if choice == "memory":
        budget.take(what, decoded)
    elif choice == "raw":
        budget.refuse(what, decoded, "decoded as read")
        budget.take("encoded images", encoded)
    elif choice == "none":
        budget.refuse(what, decoded, "streamed from the files and decoded every epoch")
    else:
        budget.take(what, decoded, f"disk {choice}")
    return data.model_copy(update={"cache": choice})


def activation_bytes_per_image(model) -> int:
    """Inference working set of one image through `model` (float32): its two largest consecutive
    layer outputs, the input and output a layer holds at once."""
    sizes = [4 * math.prod(d for d in layer.output.shape[1:] if d) for layer in model.layers
             if getattr(layer, "output", None) is not None and hasattr(layer.output, "shape")]
    return sum(sorted(sizes)[-2:]) if sizes else 0


def inference_batch(budget: CacheBudget, share: float, workers_on_node: int, per_image: int, cap: int) -> int:
    """The largest batch (at most `cap`) whose activations fit in half the memory the caches do not
    claim: feature extraction at 224 px and batch 256 needs gigabytes, more than a small container has."""
    free = budget.limit.bytes * (1 - share) / max(workers_on_node, 1) / 2
    return max(1, min(cap, int(free // max(per_image, 1))))
