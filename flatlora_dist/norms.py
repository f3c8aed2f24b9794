"""Row norms ``||W_i + s·(B·A)_i||`` of every target, with one all-reduce for all layers.

Each rank sums squares over the elements it contributes (``ShardBackend.norm_chunks``: every element
by exactly one rank of the reduction group) into its slice of one flat float32 buffer of
``sum(out_features)`` entries; one ``all_reduce`` over the shard group completes all layers at once.
Under the fused scheme each span is one ``row_sumsq`` kernel (one launch per target on a plain model).
Under the blocks scheme on CPU, each ``NORM_CHUNK`` chunk is one call of the native ``row_sumsq.c``
(``W + s·B·A`` formed tile by tile in registers, nothing of the chunk's size allocated), the chunks of
all targets as one stream on the draw threads; each chunk's partial sums are added in chunk order, so
the result does not depend on the threads.  Without the native library: torch ops per chunk.
"""

from __future__ import annotations

from functools import partial
from itertools import chain

import torch
import torch.distributed as dist

from . import native
from .kernels import load_ops
from .noise import run_ordered, threads_pay
from .roundtrip import DTYPE_CODES
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


def _accumulate_native(lib, backend: ShardBackend, targets: list[LoraTarget], factors, acc: torch.Tensor) -> None:
    """``_accumulate`` for ``targets`` through the native kernel, their chunks as one stream of tasks on
    the draw threads (``run_ordered``); each chunk's partial sums are added to ``acc`` in chunk order.
    A target whose first chunk the kernel cannot read (not on the CPU, not float32/bfloat16/float16)
    takes the torch path.  Chunks are produced lazily (bnb dequantizes them): at most a few exist."""
    local = acc if acc.device.type == "cpu" else torch.zeros(acc.shape, dtype=torch.float32)

    def tasks():
        for t in targets:
            out = local[t.offset : t.offset + t.layout.out_features]
            chunks = iter(backend.norm_chunks(t))
            first = next(chunks, None)
            if first is None:
                continue
            if not _readable(first[1]):
                _accumulate(backend, t, factors[id(t)], out, fused=False)
                continue
            a, b, s = _stacked([(fa.cpu(), fb.cpu(), fs) for fa, fb, fs in factors[id(t)]])
            bo = b if t.layout.out_axis == 0 else b.t().contiguous()
            for start, v in chain([first], chunks):
                if v.numel():
                    yield partial(_chunk_sumsq, lib, t.layout, a, bo, s, start, v, out)

    parallel = threads_pay(sum(t.layout.numel for t in targets))  # global sizes: an upper bound per rank
    for out, first_row, part in run_ordered(tasks(), parallel):
        out[first_row : first_row + part.numel()] += part
    if local is not acc:
        acc += local.to(acc.device)


def _readable(values: torch.Tensor) -> bool:
    """Whether ``row_sumsq.c`` can read this chunk."""
    return values.device.type == "cpu" and values.dtype in DTYPE_CODES and values.is_contiguous()


def _chunk_sumsq(lib, layout, a: torch.Tensor, bo: torch.Tensor, s: float, start: int, values: torch.Tensor,
                 out: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:  # fmt: skip
    """One chunk's partial squared sums: ``(out, first_row, partial)`` for ``out[first_row:...] += partial``
    (out_axis 0: one entry per storage row the chunk touches; 1: one per column)."""
    if not _readable(values):  # a later chunk unlike the first (not seen from any backend): read a copy
        values = values.detach().to("cpu", torch.float32).contiguous()
    n, cols = values.numel(), layout.cols
    if layout.out_axis == 0:
        first = start // cols
        part = torch.empty((start + n - 1) // cols - first + 1, dtype=torch.float32)
    else:
        first, part = 0, torch.zeros(cols, dtype=torch.float32)
    rc = lib.flatlora_row_sumsq(DTYPE_CODES[values.dtype], values.data_ptr(), n, start, layout.rows, cols,
                                layout.out_axis, a.data_ptr(), bo.data_ptr(), a.shape[0], s, part.data_ptr())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"row_sumsq.c: flatlora_row_sumsq returned {rc} for {values.dtype}, axis {layout.out_axis}")
    return out, first, part


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
    lib = None if fused else native.load()
    for ts in by_backend.values():
        backend = backend_of[id(ts[0])]
        with backend.lora_factors(ts) as factors:
            if lib is not None:
                _accumulate_native(lib, backend, ts, factors, buffer)
                continue
            for t in ts:
                m = t.layout.out_features
                _accumulate(backend, t, factors[id(t)], buffer[t.offset : t.offset + m], fused)
    calls = 0
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        calls = 1
    return buffer.sqrt_(), calls
