"""Row norms ``||W_i + s·(B·A)_i||`` of every target, with one all-reduce for all layers.

Each rank sums squares over the elements it contributes (``ShardBackend.norm_chunks``: every element
by exactly one rank of the reduction group) into its slice of one flat float32 buffer of
``sum(out_features)`` entries; one ``all_reduce`` over the shard group completes all layers at once.
Under the fused scheme each span is one ``row_sumsq`` kernel (one launch per target on a plain model).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .kernels import load_ops
from .shards import ShardBackend
from .targets import LoraTarget


def _accumulate(backend: ShardBackend, target: LoraTarget, factors, acc: torch.Tensor, fused: bool) -> None:
    """Add this rank's partial squared row sums of ``W + s·BA`` for ``target`` into ``acc`` (out_features,).

    ``fused``: one ``row_sumsq`` kernel per span (B·A tiles formed inside the kernel); else streamed in
    ``NORM_CHUNK`` chunks with torch ops.
    """
    layout = target.layout
    local = None
    parts = backend.norm_spans(target) if fused else backend.norm_chunks(target)
    for start, values in parts:
        n = values.numel()
        if n == 0:
            continue
        if local is None:
            local = acc if acc.device == values.device else torch.zeros_like(acc, device=values.device)
            factors = [(a.to(values.device), b.to(values.device), s) for a, b, s in factors]
            if fused:
                a_cat, b_cat, s_cat = _stacked(factors)
        if fused:
            load_ops().row_sumsq(local, values, a_cat, b_cat, s_cat, start, layout.cols, layout.out_axis)
        else:
            x = values.float() + layout.delta_slice(factors, start, start + n)
            layout.add_sumsq_(local, x, start)
    if local is not None and local is not acc:
        acc += local.to(acc.device)


def _stacked(factors) -> tuple[torch.Tensor, torch.Tensor, float]:
    """All adapters as one ``(A (R, in), B (out, R), s)`` in float32: ``sum_j s_j B_j A_j = s·B·A``."""
    if len(factors) == 1:
        a, b, s = factors[0]
        return a.float().contiguous(), b.float().contiguous(), float(s)
    if not factors:
        raise ValueError("row norms need at least one (A, B, scaling) factor")
    a = torch.cat([a.float() for a, _, _ in factors])
    b = torch.cat([b.float() * s for _, b, s in factors], dim=1)
    return a, b.contiguous(), 1.0


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
    fused: bool = False,
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
                _accumulate(backend, t, factors[id(t)], buffer[t.offset : t.offset + m], fused)
    calls = 0
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        calls = 1
    return buffer.sqrt_(), calls
