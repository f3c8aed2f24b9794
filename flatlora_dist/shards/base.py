"""What a sharding backend must tell the engine about each LoRA target.

A backend answers, for the current rank: which writable tensors hold which global flat elements of
the frozen base weight (``regions``), which elements this rank contributes to the row norms — each
element by exactly one rank of the reduction group (``norm_chunks``), the process group that the
partial norms are summed over (``reduce_group``), and the full LoRA factors (``lora_factors``).

Writes are explicit phases.  The engine brackets every write of a target's regions with
``begin_write(target, phase)`` / ``end_write(target, phase)`` (or ``abort_write`` when regions taken
for a perturbation were left holding the clean weight).  The base class keeps each target's state and
refuses any other order with an error naming the call::

    clean      --begin_write(PERTURB)-->  perturbing  --end_write(PERTURB)-->  perturbed
    perturbing --abort_write-->           clean
    perturbed  --begin_write(RESTORE)-->  restoring   --end_write(RESTORE)-->  clean

Backends that need to remember something between perturb and restore (ZeRO-3: which gathered copy
was written) do it in ``_write_regions`` / ``_finish_write``, told the phase, never inferring it.

Beyond the engine, a backend answers for any parameter it manages (checkpointing, fingerprints):
``settle`` (make the stored shards the only copy), ``local_storage`` (this rank's stored elements)
and ``full_copies`` (complete values, collective).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch

from ..noise import NOISE_BLOCK
from ..targets import LoraTarget

NORM_CHUNK = NOISE_BLOCK
"""Elements per chunk when streaming a weight for its row norms (same bound as one noise chunk)."""

Factors = list[tuple[torch.Tensor, torch.Tensor, float]]


class Phase(Enum):
    """Which write the engine is about to make into a target's regions."""

    PERTURB = "perturb"
    """Add the step's noise (the target must be clean)."""
    RESTORE = "restore"
    """Subtract it again (the target must be perturbed)."""


_BEFORE = {Phase.PERTURB: None, Phase.RESTORE: "perturbed"}
"""The state a target must be in for ``begin_write(phase)`` (``None``: clean)."""
_DURING = {Phase.PERTURB: "perturbing", Phase.RESTORE: "restoring"}
_AFTER = {Phase.PERTURB: "perturbed", Phase.RESTORE: None}


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
        self._state: dict[int, str] = {}
        """Per target (``id``) not clean: ``perturbing``, ``perturbed`` or ``restoring``."""

    def check(self, targets: list[LoraTarget]) -> None:  # noqa: B027 - optional hook
        """Raise a clear error at start-up for configurations the backend cannot perturb correctly."""

    @abstractmethod
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's writable storage of the base weight as it stands (``[]`` when it holds none).

        Read-only inspection: no bookkeeping.  The engine writes only through ``begin_write``."""

    # ------------------------------------------------------------------ explicit write phases
    def begin_write(self, target: LoraTarget, phase: Phase) -> list[Region]:
        """The regions the engine writes in ``phase``; raises ``RuntimeError`` when ``phase`` does not
        follow the target's last completed phase (perturb and restore strictly alternate)."""
        self._expect(target, phase, _BEFORE[phase], "begin_write")
        regions = self._write_regions(target, phase)
        self._set(target, _DURING[phase])
        return regions

    def end_write(self, target: LoraTarget, phase: Phase) -> None:
        """Close ``phase``: the regions from ``begin_write(target, phase)`` now hold what it wrote."""
        self._expect(target, phase, _DURING[phase], "end_write")
        self._set(target, _AFTER[phase])
        self._finish_write(target, phase, written=True)

    def abort_write(self, target: LoraTarget) -> None:
        """Close a perturbation that left the regions holding the clean weight (never written, or written
        and undone through the same region objects): the target is clean again."""
        self._expect(target, Phase.PERTURB, _DURING[Phase.PERTURB], "abort_write")
        self._set(target, None)
        self._finish_write(target, Phase.PERTURB, written=False)

    def _expect(self, target: LoraTarget, phase: Phase, want: str | None, call: str) -> None:
        have = self._state.get(id(target))
        if have != want:
            raise RuntimeError(
                f"{type(self).__name__}.{call}({target.name!r}, {phase.name}) while the target is "
                f"{have or 'clean'} (expected {want or 'clean'}): perturb and restore must alternate, each "
                "bracketed by begin_write/end_write (FlatLoRA.perturb/restore do this; do not call the "
                "backend's write phases yourself while an engine uses it)"
            )

    def _set(self, target: LoraTarget, state: str | None) -> None:
        if state is None:
            self._state.pop(id(target), None)
        else:
            self._state[id(target)] = state

    def _write_regions(self, target: LoraTarget, phase: Phase) -> list[Region]:
        """Hook: the regions to write in ``phase`` (default: ``regions``)."""
        return self.regions(target)

    def _finish_write(self, target: LoraTarget, phase: Phase, written: bool) -> None:  # noqa: B027 - optional hook
        """Hook after ``phase`` closed; ``written`` is ``False`` for ``abort_write``."""

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

    # ------------------------------------------------------------------ any parameter (checkpoints)
    def settle(self) -> None:  # noqa: B027 - optional hook
        """Make this rank's stored shards the only copy of every parameter the backend manages in
        ``self.model`` (FSDP: reshard units a forward left unsharded).  Local; outside forward/backward."""

    def local_storage(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's stored elements of ``param`` (a parameter this backend manages), 1-D, padding
        excluded, as a view of the storage (call ``settle`` first).  Default: the whole tensor."""
        return param.data.reshape(-1)

    def full_copies(self, params: list[torch.Tensor], *, keep: bool = True) -> list[torch.Tensor] | None:
        """Complete CPU copies of ``params`` (parameters this backend manages, after ``settle``) in their
        full shapes and storage dtype; ``None`` when ``keep`` is false (this rank still takes part).

        Collective on sharded backends: every rank passes the same parameters in the same order."""
        return [p.detach().to("cpu", copy=True) for p in params] if keep else None
