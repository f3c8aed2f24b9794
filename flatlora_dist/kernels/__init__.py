"""Which noise scheme a run uses, and lazy access to the fused (Triton) kernels.

Two schemes define the noise of element ``k`` of a weight at one step (see ``noise.py``):

* ``blocks`` — the weight is cut into ``NOISE_BLOCK`` blocks drawn with the device's native generator
  (the CPU default; values pinned by the project's golden hashes).
* ``fused`` (version 2, recorded as ``fused-v2``) — ``z_k`` = value ``k & 3`` of the four normals that
  one Philox4x32-10 call on counter ``k >> 2`` gives (both outputs of two Box-Muller pairs), keyed by
  ``key = noise.key_seed(seed, step, name)`` (``k`` = the global flat index, 64-bit), computed inside one
  Triton kernel per region and phase (``kernels/triton_kernels.py``), so cost is proportional to bytes,
  not blocks.  Version 1 (recorded as ``fused``) drew ``tl.randn(key, k)``: one Philox call and one
  precise Box-Muller per value, ~8x the instructions; a state written with it cannot be resumed here.

``FLATLORA_KERNELS=auto|fused|blocks`` selects: ``auto`` = fused on CUDA when Triton imports, else
blocks.  ``fused`` on CPU tensors needs ``TRITON_INTERPRET=1`` (the Triton interpreter; set before
the kernels are first imported).  The two schemes give different values: a run keeps one scheme
(the engine records it in its state dict).  Nothing here imports Triton at module level.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

ENV = "FLATLORA_KERNELS"
SCHEMES = ("auto", "fused", "blocks")
FUSED_VERSION = 2
"""Version of the fused scheme's noise definition (part of what a state dict records)."""


def requested() -> str:
    """The value of ``FLATLORA_KERNELS`` (default ``auto``), validated."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in SCHEMES:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(SCHEMES)}")
    return value


def triton_available() -> bool:
    """Whether ``import triton`` can succeed (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or half-initialised module
        return False


def scheme_for(device: torch.device | str) -> str:
    """``"fused"`` or ``"blocks"`` for tensors on ``device``; one clear error when fused cannot run."""
    device = torch.device(device)
    want = requested()
    if want == "blocks":
        return "blocks"
    if want == "auto":
        return "fused" if device.type == "cuda" and triton_available() else "blocks"
    if not triton_available():
        raise RuntimeError(
            f"{ENV}=fused needs Triton, which is not installed: pip install 'flatlora_dist[kernels]' "
            f"or set {ENV}=blocks"
        )
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{ENV}=fused on CPU tensors runs only through the Triton interpreter: set TRITON_INTERPRET=1 "
            f"before starting Python, or use {ENV}=blocks (the CPU default)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{ENV}=fused supports CUDA (and CPU via TRITON_INTERPRET=1), not {device}; use {ENV}=blocks")
    return "fused"


def load_ops() -> ModuleType:
    """The fused ops module (imports Triton and registers the ``flatlora::`` custom ops on first use)."""
    from . import ops as _ops

    return _ops


def scheme_id(scheme: str) -> str:
    """What a state dict records for a scheme: ``"blocks"``, or ``"fused-v2"`` for the fused one (a state
    without the entry predates the fused scheme: blocks; ``"fused"``: the fused scheme's version 1)."""
    return f"fused-v{FUSED_VERSION}" if scheme == "fused" else scheme
