"""DeepSpeed ZeRO-3: the base weight lives as flat partitions ``param.ds_tensor``, one per rank.

Geometry (DESIGN 3.3).  A weight of ``N = param.ds_numel`` elements is split over the ranks of its
partition group ``param.ds_process_group`` (size ``ws``) into partitions of ``part = ceil(N / ws)``
elements; rank ``r`` holds global flat ``[r·part, min((r+1)·part, N))`` at the front of its
``ds_tensor`` and uninitialised padding behind it.  Padding is never part of a region or a norm sum.

Regions.  The partition's valid prefix is always a region.  A *gathered* full copy (``param.data``
while ``ds_status`` is AVAILABLE: persistent params, numel <= ``stage3_param_persistence_threshold``,
stay gathered after their first fetch and ignore edits to ``ds_tensor`` until they are released) is
a second region when it exists at perturb time, lives on the partition's device type (so both draw
the same noise) and does not alias the partition (at world size 1 ``param.data`` *is* a view of
``ds_tensor``; it is then covered by the partition region and never written twice).

Consistency between perturb and restore.  The engine names the phase of every write
(``begin_write(target, Phase.PERTURB)`` ... ``end_write``, then the same for ``Phase.RESTORE``; see
``base``); a call out of order raises instead of being taken for the other phase.  At restore time the
gathered copy is a region only if it is the very buffer that was perturbed (a reference is kept, so
its address cannot be reused meanwhile).  A gathered copy that was *not* written by the engine —
gathered during the forward from noisy partitions, or on another device type — is released when the
phase closes (freed without write-back; the next use re-gathers from the partitions), so no stale
noisy or unpatched copy survives a restore.

Use (the engine picks this backend by itself when a LoRA base weight has a ``ds_id``)::

    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=torch.optim.AdamW(...), config=cfg)
    flat = FlatLoRA(engine, FlatLoRAConfig(total_steps=T))      # FlatLoRA(engine.module, ...) is the same
    for step in range(T):                                       # gas micro-batches per optimizer step
        flat.perturb(step)                                      # every rank, same step (collective)
        for k, batch in enumerate(window(step)):
            engine.backward(engine(**batch).loss)
            if k == gas - 1:
                flat.restore()                                  # before the boundary engine.step()
            engine.step()
    flatlora_dist.checkpoint.save_adapter(engine, out_dir)      # every rank (collective); rank 0 writes

Supported: ZeRO-3 with ``offload_param`` "none" or "cpu" (noise is then drawn on the CPU, where the
partitions live), any ``stage3_param_persistence_threshold``, MiCS-style partition groups (norms are
summed over ``ds_process_group`` only).  Refused at start-up: NVMe param offload, ZeRO++ hpZ secondary
partitions, int8-quantized frozen partitions.  ZeRO-1/2 keep whole params: the plain backend.

Everything here is local except ``lora_factors`` (all-gathers LoRA factors) and ``full_copies``
(the trainable parameters for ``checkpoint.gathered_lora_state_dict``); both are collective over the
partition group.  ``deepspeed`` is imported only inside functions of this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..targets import LoraTarget
from .base import Factors, Phase, Region, ShardBackend

_OFFLOAD_FIX = (
    'set "zero_optimization.offload_param.device" to "cpu" (partitions in CPU memory: supported) '
    'or "none"; NVMe offload swaps frozen partitions out of memory, where they cannot take noise'
)


def _status(param: torch.Tensor) -> str:
    """``ds_status`` name: ``AVAILABLE``, ``NOT_AVAILABLE`` or ``INFLIGHT``."""
    return getattr(param.ds_status, "name", str(param.ds_status))


def _partition_rank(param: torch.Tensor) -> int:
    """This rank's index in the param's partition group."""
    rank = getattr(param, "ds_zero_partition_rank", None)
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank(group=param.ds_process_group)
    return int(rank)


def _partition_world(param: torch.Tensor) -> int:
    size = getattr(param, "ds_zero_partition_world_size", None)
    if size is None:
        import torch.distributed as dist

        size = dist.get_world_size(group=param.ds_process_group)
    return int(size)


def partition_region(param: torch.Tensor) -> Region:
    """The valid (non-padding) prefix of this rank's partition as a writable 1-D view of ``ds_tensor``.

    ``start = r·part``; length ``max(0, min(part, N - start))`` (may be 0 on trailing ranks).
    """
    ds = param.ds_tensor.data.view(-1)
    part = ds.numel()
    start = _partition_rank(param) * part
    valid = max(0, min(part, int(param.ds_numel) - start))
    return Region(ds.narrow(0, 0, valid), min(start, int(param.ds_numel)))


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def gathered_copy(param: torch.Tensor) -> torch.Tensor | None:
    """The full gathered ``param.data`` as a flat view (``ds_numel`` elements), or ``None`` when the
    param is not gathered or its data is a view of the partition itself (world size 1)."""
    if _status(param) != "AVAILABLE":
        return None
    data = param.data
    if data.numel() != int(param.ds_numel) or not data.is_contiguous():
        return None
    if _shares_storage(data, param.ds_tensor):
        return None
    return data.view(-1)


def _usable(part: Region, copy: torch.Tensor | None) -> bool:
    """Whether a gathered copy can take the noise with the partition (same device type: same noise)."""
    return copy is not None and copy.device.type == part.tensor.device.type


def settle_inflight(model: nn.Module | None, params: list[torch.Tensor]) -> None:
    """Complete the all-gathers ZeRO-3 left in flight for ``params`` (prefetches after a forward without
    backward, e.g. evaluation); each becomes AVAILABLE, a plain gathered copy.  Local, no collective.

    The handles live in ``module.ds_inflight_param_registry`` of the module DeepSpeed wraps; ``model``
    is the engine or that module.
    """
    inflight = [p for p in params if hasattr(p, "ds_id") and _status(p) == "INFLIGHT"]
    if not inflight:
        return
    registry = None
    if model is not None:
        registry = next(
            (m.ds_inflight_param_registry for m in model.modules() if hasattr(m, "ds_inflight_param_registry")), None
        )
    for p in inflight:
        if registry is None or p not in registry:
            raise RuntimeError(
                f"ZeRO-3 param {p.ds_id} is being fetched but its handle is unknown; call perturb()/restore() "
                "outside forward/backward and pass the DeepSpeed engine (or engine.module) to FlatLoRA"
            )
        registry.pop(p).wait()


def _release(param: torch.Tensor, name: str) -> None:
    """Free a gathered copy without write-back (the partition stays authoritative)."""
    if param.ds_active_sub_modules:
        raise RuntimeError(
            f"Flat-LoRA cannot drop the gathered copy of {name!r}: it is in use by a module "
            f"({sorted(param.ds_active_sub_modules)}); call perturb()/restore() outside forward/backward"
        )
    param.partition(param_list=[param], has_been_updated=False)


class ZeRO3Backend(ShardBackend):
    """Base weights partitioned by DeepSpeed ZeRO-3 (``param.ds_tensor``), on GPU or CPU offload."""

    name = "deepspeed"

    def __init__(self, model=None) -> None:
        super().__init__(model)
        self._group = None
        self._group_found = False
        self._written: dict[int, torch.Tensor | None] = {}
        """Per target perturbed: the gathered copy written at perturb time (kept alive) or None."""
        self._drop: dict[int, bool] = {}
        """Per target: release the gathered copy when the current write phase closes."""

    # ------------------------------------------------------------------ start-up
    def check(self, targets: list[LoraTarget]) -> None:
        """Refuse NVMe offload, ZeRO++ hpZ secondary partitions and quantized frozen partitions; require
        one partition group for all targets."""
        groups = {}
        for t in targets:
            w = t.weight
            ds = getattr(w, "ds_tensor", None)
            if ds is None:
                raise ValueError(f"base weight of {t.name!r} has a ds_id but no ds_tensor; not a ZeRO-3 param")
            where = getattr(ds, "final_location", None)
            if getattr(w, "nvme_swapper", None) is not None or getattr(where, "value", where) == "nvme":
                raise ValueError(
                    f"Flat-LoRA does not support ZeRO-3 NVMe parameter offload (layer {t.name!r}): {_OFFLOAD_FIX}"
                )
            if getattr(w, "ds_secondary_tensor", None) is not None or getattr(w, "ds_zero_param_process_group", None):
                raise ValueError(
                    "Flat-LoRA does not support ZeRO++ hierarchical partitioning: forward gathers read the "
                    'secondary partition, which the noise would miss; remove "zero_optimization.'
                    'zero_hpz_partition_size" (or set it to 1)'
                )
            if hasattr(ds, "ds_quant_scale"):
                raise ValueError(
                    "Flat-LoRA cannot perturb int8-quantized frozen partitions; set "
                    '"zero_optimization.zero_quantized_nontrainable_weights" to false'
                )
            if not ds.is_floating_point():
                raise ValueError(f"ZeRO-3 partition of {t.name!r} has dtype {ds.dtype}; expected a float dtype")
            if ds.numel() * _partition_world(w) < int(w.ds_numel):
                raise ValueError(f"ZeRO-3 partitions of {t.name!r} do not cover the weight; unknown layout")
            groups[id(w.ds_process_group)] = w.ds_process_group
        if len(groups) > 1:
            raise NotImplementedError("LoRA base weights are partitioned over different process groups")
        if groups:
            self._group, self._group_found = next(iter(groups.values())), True
        self._warn_quantized_comm()

    def _warn_quantized_comm(self) -> None:
        get = getattr(self.model, "zero_quantized_weights", None)
        if callable(get) and get():
            warnings.warn(
                "ZeRO++ quantized weight communication (zero_quantized_weights) quantizes the noisy weight "
                "in every gather: the perturbation the forward sees is approximate",
                RuntimeWarning,
                stacklevel=4,
            )

    def reduce_group(self):
        """The partition group of the base weights (``param.ds_process_group``), never a larger one."""
        if not self._group_found and self.model is not None:
            for p in self.model.parameters():
                if hasattr(p, "ds_process_group"):
                    self._group, self._group_found = p.ds_process_group, True
                    break
        return self._group

    # ------------------------------------------------------------------ where the weight lives
    def regions(self, target: LoraTarget) -> list[Region]:
        """Partition (valid prefix) plus the gathered copy when it lives on the partition's device type."""
        part, now = self._storage(target)
        return [part, Region(now, 0)] if _usable(part, now) else [part]

    def _storage(self, target: LoraTarget) -> tuple[Region, torch.Tensor | None]:
        w = target.weight
        settle_inflight(self.model, [w])
        return partition_region(w), gathered_copy(w)

    def _write_regions(self, target: LoraTarget, phase: Phase) -> list[Region]:
        """Perturb: the partition plus a usable gathered copy, which is remembered.  Restore: the
        partition plus the gathered copy only if it is the very buffer written at perturb time."""
        part, now = self._storage(target)
        key = id(target)
        if phase is Phase.PERTURB:
            usable = _usable(part, now)
            self._written[key] = now if usable else None
            self._drop[key] = now is not None and not usable
            return [part, Region(now, 0)] if usable else [part]
        then = self._written.pop(key)
        same = then is not None and now is not None and now.data_ptr() == then.data_ptr()
        self._drop[key] = now is not None and not same
        return [part, Region(now, 0)] if same else [part]

    def _finish_write(self, target: LoraTarget, phase: Phase, written: bool) -> None:
        """Release a gathered copy the engine did not write (it would keep stale values); an aborted
        perturbation forgets the copy it took."""
        if not written:
            self._written.pop(id(target), None)
        if self._drop.pop(id(target), False) and gathered_copy(target.weight) is not None:
            _release(target.weight, target.name)

    def norm_spans(self, target: LoraTarget) -> list[tuple[int, torch.Tensor]]:
        """The partition's valid elements: each element counted by one rank."""
        r = partition_region(target.weight)
        return [(r.start, r.tensor)]

    # ------------------------------------------------------------------ any parameter (checkpoints)
    def local_storage(self, param: torch.Tensor) -> torch.Tensor:
        """The valid prefix of this rank's partition (padding holds garbage and is never included)."""
        return partition_region(param).tensor

    def full_copies(self, params: list[torch.Tensor], *, keep: bool = True) -> list[torch.Tensor] | None:
        """Complete CPU copies in the storage dtype, all gathered in one ``GatheredParameters`` (transient
        memory: all of ``params``).  Collective over the partition group; ranks with ``keep=False`` take
        part but copy nothing."""
        settle_inflight(self.model, params)
        pending = [p for p in params if _status(p) != "AVAILABLE"]
        with _gathered(pending):
            if not keep:
                return None
            for p in params:
                if p.data.numel() != int(p.ds_numel):
                    raise RuntimeError(f"ZeRO-3 param {p.ds_id} is not gathered ({p.ds_summary()})")
            return [p.data.detach().to("cpu", copy=True) for p in params]

    # ------------------------------------------------------------------ LoRA factors and functional mode
    @contextmanager
    def lora_factors(self, targets: list[LoraTarget]) -> Iterator[dict[int, Factors]]:
        """Full ``(A, B, s)`` for all targets, gathered in one ``GatheredParameters`` (read-only).

        Collective over the partition group: every rank enters with the same targets.  Factors that are
        already gathered (persistent) are read in place and left gathered.  The yielded tensors are
        valid only inside the ``with`` block.
        """
        params = {}
        for t in targets:
            for a, b, _ in t.local_factors():
                params[id(a)], params[id(b)] = a, b
        zero = [p for p in params.values() if hasattr(p, "ds_id")]
        settle_inflight(self.model, zero + [t.weight for t in targets])
        pending = [p for p in zero if _status(p) == "NOT_AVAILABLE"]
        with _gathered(pending):
            yield {id(t): [(a.data, b.data, s) for a, b, s in t.local_factors()] for t in targets}

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The gathered base weight (functional mode): available inside the layer's forward/backward,
        where ZeRO-3 has fetched it."""
        w = target.weight
        if _status(w) != "AVAILABLE" or w.data.numel() != int(w.ds_numel):
            raise NotImplementedError(
                f"functional Flat-LoRA under ZeRO-3 reads the gathered weight of {target.name!r}, which is "
                "only available inside the layer's forward/backward; use mode='inplace'"
            )
        return w.data.view(target.layout.rows, target.layout.cols)


@contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[None]:
    """``deepspeed.zero.GatheredParameters(params, modifier_rank=None)``; nothing when ``params`` is empty."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
