""""Every N steps" for a loop that advances in chunks of several steps.

The train loop runs several steps per call. A periodic action (log, validate, checkpoint)
fires after the call whose steps cross one of its multiples; actions that must see the
exact step (validation) also end the chunk there.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional


@dataclasses.dataclass(frozen=True)
class Every:
    """Multiples of `steps`, counted from `origin` (e.g. -phase.first_step for global steps)."""

    steps: int
    origin: int = 0

    def due(self, before: int, after: int) -> bool:
        """Whether the steps (before, after] cross a multiple."""
        return (after - self.origin) // self.steps > (before - self.origin) // self.steps

    def next_after(self, position: int) -> int:
        return position + self.steps - (position - self.origin) % self.steps


def chunk_length(position: int, end: int, per_call: int, boundaries: Iterable[Optional[int]]) -> int:
    """Steps for the next call: at most `per_call`, stopping at `end` and at the first boundary ahead."""
    stop = min([end, *(b for b in boundaries if b is not None and b > position)])
    return max(1, min(per_call, stop - position))
