"""Plain parameters: a single process, DDP, or DeepSpeed ZeRO-1/2 (weights are replicated whole).

Every rank holds the whole weight, so norms need no reduction and the noise, keyed by global index,
is identical on every rank.
"""

from __future__ import annotations

from ..targets import LoraTarget
from .base import Region, ShardBackend


class PlainBackend(ShardBackend):
    name = "plain"

    def regions(self, target: LoraTarget) -> list[Region]:
        w = target.weight.data
        if not w.is_contiguous():
            raise ValueError(f"base weight of {target.name!r} is not contiguous; cannot perturb it in place")
        return [Region(w.view(-1), 0)]
