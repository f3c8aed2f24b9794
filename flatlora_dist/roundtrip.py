"""The blocks scheme's perturb/restore on CPU in one fused pass per noise chunk (``native/roundtrip.c``).

Same values as ``inplace.py``'s torch path, bit for bit: the same noise blocks (``noise_chunks``), the
same float32 ``e = z·std[out(k)]``, ``new = round(w + e)``, ``back = round(new - e)``, and the same
fix-up records in the same order (ascending global index per chunk, chunks in order; narrow records
``(index, low 16 bits of bits(w) ^ bits(back))``, wide ones ``(index, old value)``).  What changes is
the number of passes: each chunk is read and written once per phase, the records are appended in that
same pass (no mask, ``nonzero`` or gathers), and the pass runs in the draw thread right after its
block is drawn (``noise_tasks``; the kernel releases the GIL), so the draw threads do all the work, and
``inplace.perturb_regions`` runs the chunks of every region of a step as one stream (``run_ordered``).

Storage dtypes: float32, bfloat16, float16, contiguous CPU tensors; anything else uses the torch path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from .noise import NOISE_BLOCK, Scratch, noise_tasks
from .shards import Region

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Storage dtypes the kernels handle (the code ``roundtrip.c`` switches on)."""

Records = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(index, xor, full_index, full_values)``: the fields of ``perturbation.Fixups``."""
Chunk = tuple[int, int, "Records | None"]
"""What a perturb task returns: ``(chunk_start, chunk_len, records or None)``."""


def supports(tensor: torch.Tensor, std: torch.Tensor) -> bool:
    """Whether the kernels can take this region tensor (1-D storage) and per-row std."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype in DTYPE_CODES
        and tensor.is_contiguous()
        and std.dtype == torch.float32  # a float64 std would make torch's in-place scale round twice
    )


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _std(key, device: torch.device) -> torch.Tensor:
    return key.std.to(device=device, dtype=torch.float32).contiguous()


def perturb_tasks(lib: ctypes.CDLL, region: Region, key, scratch: Scratch) -> list[Callable[[], Chunk]]:
    """One task per noise chunk of ``region``: add ``key``'s noise to the chunk in place and return
    ``(chunk_start, chunk_len, records)`` (``records``: ``None`` when the round trip is exact there).
    Index dtype: int32 for weights under 2^31 elements, else int64.  Noise and record buffers come from
    ``scratch``.  Run with ``noise.run_ordered``."""
    t, layout = region.tensor, key.layout
    code, std = DTYPE_CODES[t.dtype], _std(key, t.device)
    idx64 = layout.numel >= 2**31
    itype = torch.int64 if idx64 else torch.int32
    wide_cap = t.element_size() > 2  # 2-byte types: every xor fits in 16 bits

    def chunk(lo: int, z: torch.Tensor) -> Chunk:
        n, off = z.numel(), lo - region.start
        w = t[off : off + n]
        cap, wide = NOISE_BLOCK, NOISE_BLOCK if wide_cap else 0
        idx, xor = scratch.get("idx", cap, itype), scratch.get("xor", cap, torch.int16)
        fidx, fval = scratch.get("fidx", wide, itype), scratch.get("fval", wide, t.dtype)
        counts = scratch.get("counts", 2, torch.int64)
        rc = lib.flatlora_perturb(code, _ptr(w), _ptr(z), _ptr(std), n, lo, layout.cols, layout.out_axis,
                                  int(idx64), _ptr(idx), _ptr(xor), _ptr(fidx), _ptr(fval), _ptr(counts))  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"roundtrip.c: flatlora_perturb returned {rc} for dtype {t.dtype}")
        nn, nw = counts.tolist()
        if nn == 0 and nw == 0:
            return lo, n, None
        return lo, n, (idx[:nn].clone(), xor[:nn].clone(), fidx[:nw].clone(), fval[:nw].clone())

    return _tasks(region, key, chunk, scratch)


def restore_tasks(lib: ctypes.CDLL, region: Region, key, scratch: Scratch) -> list[Callable[[], None]]:
    """One task per noise chunk of ``region``: subtract ``key``'s noise in place (``round(w - e)``; the
    fix-ups are not applied); noise buffers from ``scratch``.  Run with ``noise.run_ordered``."""
    t, layout = region.tensor, key.layout
    code, std = DTYPE_CODES[t.dtype], _std(key, t.device)

    def chunk(lo: int, z: torch.Tensor) -> None:
        off = lo - region.start
        w = t[off : off + z.numel()]
        rc = lib.flatlora_restore(code, _ptr(w), _ptr(z), _ptr(std), z.numel(), lo, layout.cols, layout.out_axis)
        if rc != 0:
            raise RuntimeError(f"roundtrip.c: flatlora_restore returned {rc} for dtype {t.dtype}")

    return _tasks(region, key, chunk, scratch)


def concat(parts: list[Records | None]) -> Records | None:
    """One region's records from its chunks' (in chunk order), or ``None`` when there are none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return tuple(torch.cat(field) for field in zip(*parts))  # type: ignore[return-value]


def _tasks(region: Region, key, fn, scratch: Scratch):
    """``fn(chunk_start, z)`` tasks over the raw standard-normal blocks covering the region (scratch draws)."""
    return noise_tasks(key.seed, key.step, key.name, key.layout.numel, region.start, region.stop,
                       region.tensor.device, fn, scratch)  # fmt: skip
