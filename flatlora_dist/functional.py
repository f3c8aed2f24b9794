"""Functional perturbation: the noisy weight exists only inside the layer's forward and backward.

For bases that cannot take noise in storage (4-bit / 8-bit quantized) or by choice.  The base layer's
forward is swapped for ``x·(W + e)ᵀ + b`` through a custom autograd function: ``W + e`` is
materialised transiently (one weight-sized buffer, freed when the call returns) and rebuilt from the
noise key in backward, so nothing of the weight's size is saved for backward.  ``W + e`` is rounded
to the storage dtype exactly as the in-place mode rounds it, so both modes give the same numbers.

Under the fused scheme a bitsandbytes 4-bit base (nf4/fp4, any ``quant_storage``, double quantization
on or off) is dequantized and perturbed by one kernel reading the packed bytes (``noisy_4bit``): the
same values as dequantizing with bitsandbytes and then adding the noise, one launch per layer call.
8-bit and CPU-packed 4-bit bases keep the two steps (bitsandbytes' dequantize, then ``noisy``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels import load_ops
from .perturbation import NoiseKey, compute_dtype
from .shards import ShardBackend
from .shards.bnb import packed_4bit
from .targets import LoraTarget

_SAVED_FORWARD = "_flatlora_saved_forward"


def noisy_weight(backend: ShardBackend, target: LoraTarget, key: NoiseKey, dtype: torch.dtype) -> torch.Tensor:
    """``round(W + e)`` as an ``(out, in)`` tensor of ``dtype`` (the full weight; one transient buffer).

    Fused scheme: one ``noisy_4bit`` kernel from the packed 4-bit bytes, else one ``noisy`` kernel over
    the (dequantized) weight; blocks scheme: chunk by chunk.
    """
    layout = target.layout
    packed = packed_4bit(target) if key.fused and target.quantized else None
    if packed is not None:  # bitsandbytes weights are (out, in) row-major (BnbBackend.check: out_axis 0)
        out = load_ops().noisy_4bit(packed, key.std.to(packed.data.device), layout.cols, key.seed64)
        return out.to(dtype).view(layout.rows, layout.cols)
    w = backend.dense_weight(target)
    store = w.dtype if w.is_floating_point() else torch.float32
    if key.fused:
        std = key.std.to(w.device)
        out = load_ops().noisy(w.detach().to(store), std, layout.cols, key.seed64, layout.out_axis)
    else:
        cd = compute_dtype(store)
        buf = w.detach().to(cd, copy=True).view(-1)
        for lo, e in key.chunks(0, buf.numel(), buf.device):
            buf[lo : lo + e.numel()] += e.to(cd)
        out = buf.to(store)
    out = out.to(dtype).view(layout.rows, layout.cols)
    return out.t() if layout.out_axis == 1 else out


class _NoisyLinear(torch.autograd.Function):
    """``y = x·Wₑᵀ + b`` with ``Wₑ = make(dtype)`` rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, make: Callable[[torch.dtype], torch.Tensor]):
        ctx.make = make
        ctx.bias_grad = bias is not None and bias.requires_grad
        w = make(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ ctx.make(grad.dtype)
        if ctx.bias_grad:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gb, None


def install(backend: ShardBackend, target: LoraTarget, key: NoiseKey) -> None:
    """Route ``target.base``'s forward through the noisy weight until ``uninstall``."""
    base = target.base
    if _SAVED_FORWARD in base.__dict__:
        raise RuntimeError(f"functional perturbation already installed on {target.name!r}")
    base.__dict__[_SAVED_FORWARD] = base.__dict__.get("forward")

    def make(dtype: torch.dtype) -> torch.Tensor:
        return noisy_weight(backend, target, key, dtype)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cd = getattr(base, "compute_dtype", None)  # bnb Linear4bit: matmul in compute dtype, output in x's
        if not isinstance(cd, torch.dtype) or cd == x.dtype:
            return _NoisyLinear.apply(x, getattr(base, "bias", None), make)
        return _NoisyLinear.apply(x.to(cd), getattr(base, "bias", None), make).to(x.dtype)

    base.forward = forward


def uninstall(target: LoraTarget) -> None:
    """Give ``target.base`` back its own forward."""
    base = target.base
    if _SAVED_FORWARD not in base.__dict__:
        return
    saved = base.__dict__.pop(_SAVED_FORWARD)
    if saved is None:
        del base.forward
    else:
        base.forward = saved
