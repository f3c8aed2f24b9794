"""Row norms ``||W_i + s·(B·A)_i||`` of every target, with one all-reduce for all layers.

Each rank sums squares over the elements it contributes (``ShardBackend.norm_chunks``: every element
by exactly one rank of the reduction group) into its slice of one flat float32 buffer of
``sum(out_features)`` entries; one ``all_reduce`` over the shard group completes all layers at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .shards import ShardBackend
from .targets import LoraTarget


def _accumulate(backend: ShardBackend, target: LoraTarget, factors, acc: torch.Tensor) -> None:
    """Add this rank's partial squared row sums of ``W + s·BA`` for ``target`` into ``acc`` (out_features,)."""
    layout = target.layout
    local = None
    for start, values in backend.norm_chunks(target):
        n = values.numel()
        if n == 0:
            continue
        if local is None:
            local = acc if acc.device == values.device else torch.zeros_like(acc, device=values.device)
            factors = [(a.to(values.device), b.to(values.device), s) for a, b, s in factors]
        x = values.float() + layout.delta_slice(factors, start, start + n)
        layout.add_sumsq_(local, x, start)
    if local is not None and local is not acc:
        acc += local.to(acc.device)


def reduction_group(backends: dict[str, ShardBackend], kinds: set[str]):
    """The one process group partial norms are summed over, or ``None`` (whole rows are local)."""
    groups = {id(g): g for g in (backends[k].reduce_group() for k in kinds)}
    if len(groups) > 1:
        raise NotImplementedError(
            f"LoRA targets are spread over backends {sorted(kinds)} with different process groups; "
            "Flat-LoRA needs every target under one sharding scheme"
        )
    return next(iter(groups.values()))


def row_norms(
    targets: list[LoraTarget],
    backend_of: dict[int, ShardBackend],
    buffer: torch.Tensor,
    group,
) -> tuple[torch.Tensor, int]:
    """Fill ``buffer`` (float32, sum of out_features) with every target's row norms, in place.

    Collective over ``group`` when it is not ``None``: exactly one ``all_reduce``, entered by every
    rank of the group with the same targets.  Returns ``(buffer, number_of_all_reduces)``.
    """
    buffer.zero_()
    by_backend: dict[int, list[LoraTarget]] = {}
    for t in targets:
        by_backend.setdefault(id(backend_of[id(t)]), []).append(t)
    for ts in by_backend.values():
        backend = backend_of[id(ts[0])]
        with backend.lora_factors(ts) as factors:
            for t in ts:
                m = t.layout.out_features
                _accumulate(backend, t, factors[id(t)], buffer[t.offset : t.offset + m])
    calls = 0
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        calls = 1
    return buffer.sqrt_(), calls
