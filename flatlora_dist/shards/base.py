"""What a sharding backend must tell the engine about each LoRA target.

A backend answers, for the current rank: which writable tensors hold which global flat elements of
the frozen base weight (``regions``), which elements this rank contributes to the row norms — each
element by exactly one rank of the reduction group (``norm_chunks``), the process group that the
partial norms are summed over (``reduce_group``), and the full LoRA factors (``lora_factors``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..noise import NOISE_BLOCK
from ..targets import LoraTarget

NORM_CHUNK = NOISE_BLOCK
"""Elements per chunk when streaming a weight for its row norms (same bound as one noise chunk)."""

Factors = list[tuple[torch.Tensor, torch.Tensor, float]]


@dataclass
class Region:
    """A writable 1-D tensor whose element ``k`` is global flat element ``start + k`` of the weight.

    Padding is never part of a region.  A backend may return several regions for one weight (a
    ZeRO-3 partition plus a persistent gathered copy); each gets the same noise for the same index.
    """

    tensor: torch.Tensor
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.tensor.numel()


class ShardBackend(ABC):
    """One sharding scheme (plain, DeepSpeed ZeRO-3, FSDP2, FSDP1, bitsandbytes)."""

    name: str = "base"

    def __init__(self, model=None) -> None:
        self.model = model

    def check(self, targets: list[LoraTarget]) -> None:  # noqa: B027 - optional hook
        """Raise a clear error at start-up for configurations the backend cannot perturb correctly."""

    @abstractmethod
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's writable storage of the base weight (``[]`` when it holds none)."""

    def norm_spans(self, target: LoraTarget) -> list[tuple[int, torch.Tensor]]:
        """``(global_start, values)`` spans holding the elements this rank contributes to the row norms
        (each element by exactly one rank of the reduction group).  Default: the first region whole.
        """
        regions = self.regions(target)
        return [(regions[0].start, regions[0].tensor)] if regions else []

    def norm_chunks(self, target: LoraTarget) -> Iterator[tuple[int, torch.Tensor]]:
        """The ``norm_spans``, ``NORM_CHUNK`` elements at a time (bounded transient memory)."""
        for start, values in self.norm_spans(target):
            for lo in range(0, values.numel(), NORM_CHUNK):
                yield start + lo, values[lo : lo + NORM_CHUNK]

    def reduce_group(self):
        """Process group over which partial row norms are summed; ``None``: this rank holds whole rows."""
        return None

    @contextmanager
    def lora_factors(self, targets: list[LoraTarget]) -> Iterator[dict[int, Factors]]:
        """Full ``(A, B, scaling)`` per active adapter for every target, keyed by ``id(target)``.

        Collective on sharded backends: every rank must enter with the same targets in the same order.
        """
        yield {id(t): [(a, b, s) for a, b, s in t.local_factors()] for t in targets}

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The full base weight as a dense float tensor in storage layout (functional mode; inside forward)."""
        return target.weight

    def after_write(self, target: LoraTarget) -> None:  # noqa: B027 - optional hook
        """Called after the engine wrote into this target's regions (perturb or restore)."""
