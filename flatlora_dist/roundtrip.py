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
import threading
from collections.abc import Callable

import torch

from .noise import noise_tasks
from .shards import Region

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Storage dtypes the kernels handle (the code ``roundtrip.c`` switches on)."""

Records = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(index, xor, full_index, full_values)``: the fields of ``inplace.Fixups``."""


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


class _Scratch(threading.local):
    """Per draw thread: record buffers of one chunk's capacity, reused (allocating ~3.5 MiB per chunk
    cost page faults that showed in the perturb time)."""

    def take(self, n: int, itype: torch.dtype, vtype: torch.dtype, wide: bool) -> tuple[torch.Tensor, ...]:
        key = (itype, vtype, wide)
        bufs = self.__dict__.setdefault("bufs", {})
        have = bufs.get(key)
        if have is None or have[0].numel() < n:
            m = n if wide else 0
            have = bufs[key] = (torch.empty(n, dtype=itype), torch.empty(n, dtype=torch.int16),
                                torch.empty(m, dtype=itype), torch.empty(m, dtype=vtype),
                                torch.zeros(2, dtype=torch.int64))  # fmt: skip
        return have


_SCRATCH = _Scratch()


def perturb_tasks(lib: ctypes.CDLL, region: Region, key) -> list[Callable[[], tuple[int, int, Records | None]]]:
    """One task per noise chunk of ``region``: add ``key``'s noise to the chunk in place and return
    ``(chunk_start, chunk_len, records)`` (``records``: ``None`` when the round trip is exact there).
    Index dtype: int32 for weights under 2^31 elements, else int64.  Run with ``noise.run_ordered``."""
    t, layout = region.tensor, key.layout
    code, std = DTYPE_CODES[t.dtype], _std(key, t.device)
    idx64 = layout.numel >= 2**31
    itype = torch.int64 if idx64 else torch.int32
    wide_cap = t.element_size() > 2  # 2-byte types: every xor fits in 16 bits

    def chunk(lo: int, z: torch.Tensor) -> tuple[int, int, Records | None]:
        n, off = z.numel(), lo - region.start
        w = t[off : off + n]
        idx, xor, fidx, fval, counts = _SCRATCH.take(n, itype, t.dtype, wide_cap)
        rc = lib.flatlora_perturb(code, _ptr(w), _ptr(z), _ptr(std), n, lo, layout.cols, layout.out_axis,
                                  int(idx64), _ptr(idx), _ptr(xor), _ptr(fidx), _ptr(fval), _ptr(counts))  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"roundtrip.c: flatlora_perturb returned {rc} for dtype {t.dtype}")
        nn, nw = counts.tolist()
        if nn == 0 and nw == 0:
            return lo, n, None
        return lo, n, (idx[:nn].clone(), xor[:nn].clone(), fidx[:nw].clone(), fval[:nw].clone())

    return _tasks(region, key, chunk)


def restore_tasks(lib: ctypes.CDLL, region: Region, key) -> list[Callable[[], None]]:
    """One task per noise chunk of ``region``: subtract ``key``'s noise in place (``round(w - e)``; the
    fix-ups are not applied).  Run with ``noise.run_ordered``."""
    t, layout = region.tensor, key.layout
    code, std = DTYPE_CODES[t.dtype], _std(key, t.device)

    def chunk(lo: int, z: torch.Tensor) -> None:
        off = lo - region.start
        w = t[off : off + z.numel()]
        rc = lib.flatlora_restore(code, _ptr(w), _ptr(z), _ptr(std), z.numel(), lo, layout.cols, layout.out_axis)
        if rc != 0:
            raise RuntimeError(f"roundtrip.c: flatlora_restore returned {rc} for dtype {t.dtype}")

    return _tasks(region, key, chunk)


def concat(parts: list[Records | None]) -> Records | None:
    """One region's records from its chunks' (in chunk order), or ``None`` when there are none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return tuple(torch.cat(field) for field in zip(*parts))  # type: ignore[return-value]


def _tasks(region: Region, key, fn):
    """``fn(chunk_start, z)`` tasks over the raw standard-normal blocks covering the region (scratch draws)."""
    return noise_tasks(key.seed, key.step, key.name, key.layout.numel, region.start, region.stop,
                       region.tensor.device, fn, scratch=True)  # fmt: skip
