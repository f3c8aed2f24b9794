"""bitsandbytes bases: 4-bit ``Params4bit`` (QLoRA) and 8-bit ``Int8Params`` (LLM.int8()).

A quantized weight has no writable dense storage, so it takes the noise in *functional* mode only
(``regions`` is empty): the engine asks this backend for the dequantized weight — chunk by chunk for
the row norms, whole inside the layer's forward/backward — and never writes to the quantized storage.

Invariants
----------
* The quantized storage (packed bytes, ``absmax``, nested ``state2`` tensors, ``CB``/``SCB``) is only
  read, never written: it is bitwise the loaded one after any number of steps.
* Element ``k`` of a weight is global flat index ``k`` of the ``(out, in)`` row-major weight, the same
  order bitsandbytes quantizes in, so the noise keys match a dense run of the same model.
* 4-bit data is dequantized with a *flat* shape ``(rows·in,)``: the bitsandbytes 0.50.2 CPU kernel
  called with a 2-D shape mis-indexes the block scales whenever ``in_features % blocksize != 0``
  (measured: max error 0.4-2.0 on N(0,1) weights for widths 48, 80, 96 at blocksize 64 and 64, 96,
  192 at blocksize 128); the flat call agrees with an independent decode to the bit at every width tested.
* Chunks are row-aligned and start on a quantization-block boundary, so each chunk reads only its
  own slice of the packed bytes and of ``absmax`` (and of the nested absmax of double quantization).

Supported: nf4 and fp4, double quantization on/off, any blocksize, any ``quant_storage``, compute
dtype fp32/bf16/fp16, the CPU-optimised packed layout bitsandbytes switches to after an inference
forward on AVX512-BF16 CPUs, ``Int8Params`` with ``has_fp16_weights`` either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cache

import torch

from ..kernels import load_ops
from ..kernels.packed import Nested, Packed4bit
from ..targets import LoraTarget
from .base import NORM_CHUNK, Region, ShardBackend

_CPU_PACK_ROWS = 32
"""Rows per tile of bitsandbytes' CPU-packed 4-bit layout (``_convert_weight_packed_for_cpu``)."""


def _ops():
    """``torch.ops.bitsandbytes`` (importing bitsandbytes registers the kernels)."""
    import bitsandbytes  # noqa: F401 - registers torch.ops.bitsandbytes.*

    return torch.ops.bitsandbytes


# ---------------------------------------------------------------------- what a target holds
def quant_state(target: LoraTarget):
    """The 4-bit ``QuantState`` of the target (on the weight, or on the module after FSDP/loading)."""
    qs = getattr(target.weight, "quant_state", None)
    return qs if qs is not None else getattr(target.base, "quant_state", None)


def storage_kind(target: LoraTarget) -> str:
    """``"4bit"``, ``"4bit_cpu_packed"``, ``"int8"`` or ``"dense"`` (a quantized param still in float)."""
    w = target.weight
    if type(w).__name__ == "Params4bit":
        qs = quant_state(target)
        if qs is None:
            return "dense" if w.data.is_floating_point() else "missing"
        return "4bit_cpu_packed" if getattr(qs, "packing_format_for_cpu", False) else "4bit"
    if w.data.dtype == torch.int8:
        return "int8"
    return "dense" if w.data.is_floating_point() else "missing"


def _int8_stats(target: LoraTarget) -> torch.Tensor | None:
    """Row scales ``SCB`` (out,) float32: on the weight before the first forward, then on ``state``."""
    scb = getattr(target.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(target.base, "state", None), "SCB", None)
    return scb


def dequant_dtype(target: LoraTarget) -> torch.dtype:
    """The dtype bitsandbytes dequantizes into (``quant_state.dtype`` for 4-bit; float32 for int8)."""
    kind = storage_kind(target)
    if kind.startswith("4bit"):
        return quant_state(target).dtype
    if kind == "int8":
        return torch.float32
    return target.weight.dtype


def layer_compute_dtype(target: LoraTarget) -> torch.dtype:
    """The matmul dtype of the base layer: ``Linear4bit.compute_dtype`` if set, else the dequant dtype."""
    cd = getattr(target.base, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) else dequant_dtype(target)


def row_step(target: LoraTarget) -> int:
    """Smallest row count such that a chunk of that many rows starts on a block (and byte) boundary."""
    kind = storage_kind(target)
    n = target.layout.cols
    if kind == "4bit":
        bs = int(quant_state(target).blocksize)
        return bs // math.gcd(n, bs)
    if kind == "4bit_cpu_packed":
        return _CPU_PACK_ROWS
    return 1


def rows_per_chunk(target: LoraTarget, chunk: int | None = None) -> int:
    """Rows dequantized at once: about ``chunk`` (default ``NORM_CHUNK``) elements, a multiple of ``row_step``."""
    chunk = NORM_CHUNK if chunk is None else chunk
    step = row_step(target)
    return max(step, (chunk // max(1, target.layout.cols)) // step * step)


# ---------------------------------------------------------------------- dequantization of row slices
def _flat_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit data as a flat uint8 view (whatever ``quant_storage`` dtype holds it)."""
    data = weight.data
    if not data.is_contiguous():
        raise ValueError("packed 4-bit data is not contiguous")
    return data.view(torch.uint8).reshape(-1)


def _absmax_blocks(qs, b0: int, b1: int) -> torch.Tensor:
    """float32 scales of 4-bit blocks ``[b0, b1)``, undoing double quantization for that slice only."""
    if not qs.nested:
        return qs.absmax[b0:b1].float()
    s2 = qs.state2
    nb = int(s2.blocksize)
    a0 = b0 // nb * nb  # the nested blocks start on their own boundary
    vals = _ops().dequantize_blockwise.default(
        qs.absmax[a0:b1].contiguous(),
        s2.absmax[a0 // nb : -(-b1 // nb)].contiguous(),
        s2.code,
        nb,
        torch.float32,
    )
    return vals[b0 - a0 :].float() + qs.offset


def _rows_4bit(target: LoraTarget, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a 4-bit weight, ``(r1-r0, in)`` in ``quant_state.dtype``.

    ``r0`` must be a multiple of ``row_step`` (block-aligned start); reads ``(r1-r0)·in/2`` bytes and
    ``ceil((r1-r0)·in/blocksize)`` scales.
    """
    qs = quant_state(target)
    n, bs = target.layout.cols, int(qs.blocksize)
    k0, k1 = r0 * n, r1 * n
    if k0 % bs:
        raise ValueError(f"chunk start {k0} of {target.name!r} is not on a {bs}-element block boundary")
    data = _flat_bytes(target.weight)[k0 // 2 : (k1 + 1) // 2]
    absmax = _absmax_blocks(qs, k0 // bs, -(-k1 // bs))
    out = _ops().dequantize_4bit.default(data, absmax, bs, qs.quant_type, (k1 - k0,), qs.dtype)
    return out.view(r1 - r0, n)


@cache
def _code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16-value nf4/fp4 table on ``device`` (built once per device: no copy per call), as its
    dequantize kernels decode it: fp4's code 8 (sign bit, zero magnitude) is -0.0 there, while
    ``get_4bit_type`` lists +0.0."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device=device).float().clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code.contiguous()


def _as_device_scalar(x, device: torch.device) -> torch.Tensor:
    """``offset`` as a one-element float32 tensor on ``device`` (no copy when it already is one)."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device)
    return t.reshape(1)


def packed_4bit(target: LoraTarget) -> Packed4bit | None:
    """The fused kernel's view of a 4-bit target, or ``None`` where the two-step path stays: 8-bit
    (LLM.int8()) and dense bases, and bitsandbytes' CPU-packed (AVX512) 4-bit layout."""
    if storage_kind(target) != "4bit":
        return None
    qs = quant_state(target)
    dev = target.weight.device
    nested = None
    if qs.nested:
        s2 = qs.state2
        nested = Nested(s2.absmax.float().contiguous(), s2.code.float().contiguous(), int(s2.blocksize),
                        _as_device_scalar(qs.offset, dev))
    return Packed4bit(
        data=_flat_bytes(target.weight),
        absmax=qs.absmax.contiguous() if qs.nested else qs.absmax.float().contiguous(),
        code=_code_table(qs.quant_type, dev),
        blocksize=int(qs.blocksize),
        numel=target.layout.numel,
        quant_dtype=qs.dtype,
        out_dtype=layer_compute_dtype(target),
        nested=nested,
    )


def _rows_4bit_cpu_packed(target: LoraTarget, r0: int, r1: int) -> torch.Tensor:
    """Rows of a weight in bitsandbytes' AVX512 packed layout: ``(r1-r0, in)`` in ``quant_state.dtype``.

    Layout (``_convert_weight_packed_for_cpu``): data ``(out, in/2)`` uint8 in tiles of 32 rows, byte
    ``c`` of a 32-byte group holds element pair slot ``c`` (low nibble) and ``c+32`` (high nibble);
    ``absmax`` is ``(in/blocksize, out)`` bf16.  ``r0`` and ``r1`` (unless ``out``) are multiples of 32.
    """
    from bitsandbytes.functional import get_4bit_type

    qs = quant_state(target)
    m, n, bs = target.layout.rows, target.layout.cols, int(qs.blocksize)
    rows = r1 - r0
    if r0 % _CPU_PACK_ROWS or (rows % _CPU_PACK_ROWS and r1 != m) or n % bs:
        raise ValueError(f"unsupported CPU-packed 4-bit slice [{r0}, {r1}) of {target.name!r} ({m}x{n})")
    packed = target.weight.data[r0:r1].reshape(-1, _CPU_PACK_ROWS)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = codes.reshape(rows // _CPU_PACK_ROWS, n // 2, _CPU_PACK_ROWS, 2).transpose(1, 2).reshape(rows, n)
    table = get_4bit_type(qs.quant_type, device=packed.device)
    scale = qs.absmax[:, r0:r1].t().float()  # (rows, n/bs)
    vals = table[codes.long()].view(rows, n // bs, bs) * scale[:, :, None]
    return vals.view(rows, n).to(qs.dtype)


def _rows_int8(target: LoraTarget, r0: int, r1: int) -> torch.Tensor:
    """Rows of an LLM.int8() weight: ``CB[r0:r1]·SCB[r0:r1]/127`` as float32 (bitsandbytes' own op)."""
    scb = _int8_stats(target)
    cb = target.weight.data[r0:r1]
    return _ops().int8_vectorwise_dequant.default(cb.contiguous(), scb[r0:r1].contiguous())


def dequantize_rows(target: LoraTarget, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the dequantized weight, ``(r1-r0, in)`` in ``dequant_dtype(target)``."""
    kind = storage_kind(target)
    if kind == "4bit":
        return _rows_4bit(target, r0, r1)
    if kind == "4bit_cpu_packed":
        return _rows_4bit_cpu_packed(target, r0, r1)
    if kind == "int8":
        return _rows_int8(target, r0, r1)
    if kind == "dense":
        return target.weight.data[r0:r1]
    raise ValueError(f"base weight of {target.name!r} holds neither quantized nor float data")


def row_chunks(target: LoraTarget, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering the weight, each about ``chunk`` elements, block-aligned."""
    m, step = target.layout.rows, rows_per_chunk(target, chunk)
    for r0 in range(0, m, step):
        yield r0, min(m, r0 + step)


# ---------------------------------------------------------------------- the backend
class BnbBackend(ShardBackend):
    """bitsandbytes 4-bit / 8-bit bases, single process or data parallel (whole weights per rank).

    No writable storage (``regions() == []``): the engine runs these targets in functional mode.
    """

    name = "bnb"

    def regions(self, target: LoraTarget) -> list[Region]:
        return []

    @torch.no_grad()
    def norm_chunks(self, target: LoraTarget) -> Iterator[tuple[int, torch.Tensor]]:
        """Dequantized rows, ~``NORM_CHUNK`` elements at a time, as flat float32 ``(global_start, values)``.

        Values are those of ``dense_weight`` (rounded to the compute dtype), so the row norms are the
        norms of the weight the layer actually multiplies with.  Transient memory: about one chunk.
        """
        n, cd = target.layout.cols, layer_compute_dtype(target)
        for r0, r1 in row_chunks(target):
            yield r0 * n, dequantize_rows(target, r0, r1).to(cd).float().reshape(-1)

    @torch.no_grad()
    def norm_spans(self, target: LoraTarget) -> list[tuple[int, torch.Tensor]]:
        """The fused scheme's spans (the engine asks for these only under it): a 4-bit weight whole, from
        one ``noisy_4bit`` kernel without noise — the values of ``norm_chunks`` in the compute dtype, one
        transient weight-sized buffer (what every forward of the layer holds too), one launch instead of
        ~4 per ``NORM_CHUNK``; the other formats as their dequantized chunks."""
        packed = packed_4bit(target)
        if packed is None:
            return list(self.norm_chunks(target))
        return [(0, load_ops().noisy_4bit(packed, None, target.layout.cols, 0))]

    @torch.no_grad()
    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The full dequantized weight ``(out, in)`` in the layer's compute dtype (one buffer).

        Values are bitsandbytes' own: dequantized into ``quant_state.dtype`` and cast to the compute
        dtype, as ``Linear4bit`` does before its matmul.  One kernel call when the two dtypes agree;
        otherwise filled chunk by chunk, so no second copy of the weight's size exists.
        """
        m, n = target.layout.rows, target.layout.cols
        cd = layer_compute_dtype(target)
        chunks = list(row_chunks(target))
        if len(chunks) == 1 or dequant_dtype(target) == cd:  # one kernel call, no extra copy
            return dequantize_rows(target, 0, m).to(cd)
        out = torch.empty(m, n, dtype=cd, device=target.weight.device)
        for r0, r1 in chunks:
            out[r0:r1].copy_(dequantize_rows(target, r0, r1))
        return out

    # ------------------------------------------------------------------ start-up validation
    def check(self, targets: list[LoraTarget]) -> None:
        """Refuse, with the combination and the fix, what this backend cannot perturb correctly.

        Also turns off bitsandbytes' CPU inference repacking (``support_avx512bf16_for_cpu``): on
        AVX512-BF16 CPUs a no-grad eval forward rewrites the 4-bit storage with bf16-rounded block
        scales, a lossy change to the frozen base that Flat-LoRA promises never happens.
        """
        for t in targets:
            _check_target(t)
            if getattr(t.base, "support_avx512bf16_for_cpu", False):
                t.base.support_avx512bf16_for_cpu = False


def _check_target(t: LoraTarget) -> None:
    where = f"bitsandbytes layer {t.name!r} ({type(t.base).__name__}, weight {type(t.weight).__name__})"
    if getattr(t.module, "merged", False):
        raise ValueError(
            f"{where}: the LoRA adapter is merged into the quantized weight, so W already holds s*B*A; "
            "call model.unmerge_adapter() before training with Flat-LoRA"
        )
    if t.weight.device.type == "meta":
        raise ValueError(
            f"{where}: the weight is on the meta device (offloaded by accelerate's device_map); functional "
            "Flat-LoRA replaces the layer's forward and would bypass the offload hook: load every LoRA layer "
            "on one device (device_map={'': 0} or device_map='cpu')"
        )
    if t.layout.out_axis != 0:
        raise ValueError(
            f"{where}: fan_in_fan_out layouts are not used by bitsandbytes linears; cannot map rows"
        )
    kind = storage_kind(t)
    if kind == "missing":
        raise ValueError(
            f"{where}: no quantization state found ({t.weight.data.dtype} data, quant_state/SCB missing); "
            "quantize the model first (move it to its device, or load it with from_pretrained(..., "
            "quantization_config=BitsAndBytesConfig(...)))"
        )
    if kind.startswith("4bit"):
        _check_4bit(t, where, kind)
    elif kind == "int8" and _int8_stats(t) is None:
        raise ValueError(
            f"{where}: int8 weight without row scales (SCB missing on the weight and on layer.state); "
            "load the model with BitsAndBytesConfig(load_in_8bit=True) so bitsandbytes sets them"
        )


def _check_4bit(t: LoraTarget, where: str, kind: str) -> None:
    qs = quant_state(t)
    m, n = t.layout.rows, t.layout.cols
    if qs.shape is None or tuple(qs.shape) != (m, n):
        raise ValueError(
            f"{where}: quant_state.shape {tuple(qs.shape) if qs.shape is not None else None} is not the "
            f"layer's (out, in) = {(m, n)}; weights quantized in (in, out) orientation are not supported: "
            "re-quantize from the (out_features, in_features) weight"
        )
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{where}: quant_type {qs.quant_type!r} is not nf4/fp4")
    if qs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{where}: quant_state.dtype {qs.dtype} is not fp32/bf16/fp16")
    if kind == "4bit_cpu_packed" and (m % _CPU_PACK_ROWS or n % int(qs.blocksize)):
        raise ValueError(
            f"{where}: CPU-packed 4-bit layout with shape {(m, n)} is not a whole number of tiles"
        )
    if qs.absmax.device != t.weight.device:
        raise ValueError(
            f"{where}: quant_state is on {qs.absmax.device} but the packed weight on {t.weight.device}; "
            "move the whole model with model.to(device)"
        )
