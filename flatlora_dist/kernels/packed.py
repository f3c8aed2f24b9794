"""A bitsandbytes 4-bit weight as the fused kernels read it: :class:`Packed4bit` and its double-quantized
scales (:class:`Nested`).  Plain data (no bitsandbytes, no Triton): the ``bnb`` backend builds it
(``shards.bnb.packed_4bit``), the ``noisy_4bit`` kernel reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Nested:
    """Double quantization of the 4-bit scales: ``absmax[b] = code[q[b]] · absmax[b // blocksize] + offset``."""

    absmax: torch.Tensor  # float32, one per nested block
    code: torch.Tensor  # float32 (256,): the 8-bit dynamic map
    blocksize: int
    offset: torch.Tensor  # float32, one element, on the device (read there: no host sync)


@dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight as the fused kernel reads it (views of its storage, nothing copied).

    Element ``k`` of the flat ``(out, in)`` weight = nibble ``k % 2`` (high first) of ``data[k // 2]``,
    scaled by ``absmax[k // blocksize]`` (uint8 codes of ``nested`` when double-quantized), rounded to
    ``quant_dtype``, then cast to ``out_dtype`` (the layer's compute dtype), as ``dense_weight`` does.
    """

    data: torch.Tensor  # uint8, flat
    absmax: torch.Tensor  # float32 scales, or uint8 codes when nested
    code: torch.Tensor  # float32 (16,): the nf4/fp4 table
    blocksize: int
    numel: int
    quant_dtype: torch.dtype
    out_dtype: torch.dtype
    nested: Nested | None
