"""Kernel launches and host syncs of one perturb + stats() + restore, counted from dispatched ops.

    .venv/bin/python bench/launches.py --json [--scheme fused|blocks|both] [--dtype float32|bfloat16]
        [--fused-scale 16] [--blocks-scale 1] [--device cpu|cuda] [--details] [--qlora]

One LLaMA-7B decoder layer's LoRA targets (q, k, v, o 4096x4096; gate, up 11008x4096; down
4096x11008; r = 16), single process, CPU tensors.  ``scale`` divides every dimension (the fused count
is taken at reduced shapes: the Triton interpreter is slow, and the count does not depend on the
shape — ``tests/test_kernels.py`` checks it at two sizes).

What is counted (``OpCounter``, a ``TorchDispatchMode``):

* **launches**: every dispatched op that is not a view (``OpOverload.is_view``) and not an
  allocation that launches no kernel (``EMPTY``: ``aten.empty*``/``new_empty*``).  A ``flatlora::*``
  custom op (one Triton kernel) counts as one.  Host syncs are launches too.
* **host syncs**: ops that make the host wait for device data (``SYNC_OPS``: ``nonzero``,
  ``_local_scalar_dense`` (``item``/``bool``), ``is_nonzero``, ``equal``, ``unique*``, ``masked_select``,
  ``repeat_interleave``), and copies to the CPU (``_to_copy``/``copy_`` to a CPU tensor from another
  device, or ``_to_copy`` with an explicit ``device=cpu``, which is how the engine reads back on any
  device).
* ``--qlora``: instead, the same seven targets as bitsandbytes nf4 ``Linear4bit`` layers (double
  quantization, ``--dtype`` = compute dtype), counted twice: one perturb + ``stats()`` + restore
  (``launches_per_layer`` / ``host_syncs_per_layer``: the per-step part, row norms of the dequantized
  weights included) and one functional *layer call* (``launches_per_layer_call``: building every
  target's ``round(dequant(W) + e)`` once; a forward does it once, its backward once more).
* every thread: a dispatch mode is thread-local, so the blocks scheme's CPU draw workers are switched
  off for the count (``noise.CPU_DRAW_THREADS = 0``): the same draws then run, and are counted, in
  the main thread.  The fused scheme starts no threads.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LLAMA7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
           "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
"""(out_features, in_features) of the seven LoRA targets of one decoder layer."""
RANK = 16
EMPTY = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
SYNC_OPS = {"nonzero", "_local_scalar_dense", "is_nonzero", "equal", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "masked_select", "repeat_interleave", "item"}


def _to_host(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name == "_to_copy":
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type == "cpu"
    if name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """Counts launches and host syncs (definitions in the module docstring); ``ops``: launches by name."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        short = name.split("::")[-1]
        if not func.is_view and short not in EMPTY:
            self.launches += 1
            self.ops[name] += 1
            if short in SYNC_OPS or _to_host(func, args, kwargs):
                self.syncs += 1
        return func(*args, **kwargs)


class _Targets(torch.nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> None:
        super().__init__()
        for name, (o, i) in shapes.items():
            self.add_module(name, torch.nn.Linear(i, o, bias=False, dtype=dtype))


def layer_model(scale: int = 1, dtype: torch.dtype = torch.float32, rank: int = RANK):
    """PEFT LoRA over the seven LLaMA-7B projections, every dimension divided by ``scale``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    shapes = {k: (o // scale, i // scale) for k, (o, i) in LLAMA7B.items()}
    base = _Targets(shapes, dtype)
    with torch.no_grad():
        for m in base.children():
            m.weight.normal_(0, 0.02)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(shapes)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model


def count(scheme: str, scale: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Launches and syncs of one perturb + stats() + restore under ``FLATLORA_KERNELS=scheme``."""
    from flatlora_dist import FlatLoRA, FlatLoRAConfig, noise

    os.environ["FLATLORA_KERNELS"] = scheme
    noise.CPU_DRAW_THREADS = 0  # the draws run (and are counted) in the main thread
    model = layer_model(scale, dtype).to(device)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant", seed=1))
    flat.perturb(0)  # warm-up: Triton compilation, lazy imports
    flat.restore()
    phases = {}
    total = OpCounter()
    for phase, fn in (("perturb", lambda: flat.perturb(1)), ("stats", flat.stats), ("restore", flat.restore)):
        with OpCounter() as c:
            fn()
        phases[phase] = {"launches": c.launches, "host_syncs": c.syncs}
        total.launches += c.launches
        total.syncs += c.syncs
        total.ops.update(c.ops)
    n = len(flat.targets)
    return {
        "launches_per_layer": total.launches,
        "host_syncs_per_layer": total.syncs,
        "targets": n,
        "launches_per_target": round(total.launches / n, 2),
        "elements": sum(t.layout.numel for t in flat.targets),
        "scale": scale,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "phases": phases,
        "ops": dict(total.ops.most_common()),
        "fixups": flat.stats()["fixups"],
    }


class _Targets4bit(torch.nn.Module):
    """The seven projections as bitsandbytes nf4 ``Linear4bit`` (double quantization), quantized on ``.to``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], compute_dtype: torch.dtype) -> None:
        import bitsandbytes as bnb

        super().__init__()
        for name, (o, i) in shapes.items():
            lin = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                                    compress_statistics=True)
            w = (torch.randn(o, i) * 0.02).to(compute_dtype)  # quantized from the compute dtype, as QLoRA loads
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)
            self.add_module(name, lin)


def qlora_count(scheme: str, scale: int, compute_dtype: torch.dtype, device: str = "cpu") -> dict:
    """Launches and syncs of one QLoRA step (perturb + stats() + restore: the row norms) and of one
    functional layer call (building the seven targets' noisy weights once), ``scheme`` forced."""
    from peft import LoraConfig, get_peft_model

    from flatlora_dist import FlatLoRA, FlatLoRAConfig, functional, noise

    os.environ["FLATLORA_KERNELS"] = scheme
    noise.CPU_DRAW_THREADS = 0
    torch.manual_seed(0)
    shapes = {k: (o // scale, i // scale) for k, (o, i) in LLAMA7B.items()}
    base = _Targets4bit(shapes, compute_dtype).to(device)  # quantizes
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(shapes)))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant", seed=1))
    flat.perturb(0)  # warm-up: compilation, lazy imports
    calls = [(flat.backend_of(t), t, flat.noise_key(t)) for t in flat.targets]
    functional.noisy_weight(*calls[0], compute_dtype)
    flat.restore()
    with OpCounter() as step:
        flat.perturb(1)
        flat.stats()
        flat.restore()
    flat.perturb(1)
    calls = [(flat.backend_of(t), t, flat.noise_key(t)) for t in flat.targets]
    with OpCounter() as c:
        for b, t, k in calls:
            functional.noisy_weight(b, t, k, compute_dtype)
    flat.restore()
    return {
        "launches_per_layer": step.launches,
        "host_syncs_per_layer": step.syncs,
        "step_ops": dict(step.ops.most_common()),
        "launches_per_layer_call": c.launches,
        "host_syncs_per_layer_call": c.syncs,
        "targets": len(calls),
        "launches_per_target": round(c.launches / len(calls), 2),
        "elements": sum(t.layout.numel for t in flat.targets),
        "scale": scale,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": device,
        "ops": dict(c.ops.most_common()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    ap.add_argument("--scheme", choices=["fused", "blocks", "both"], default="both")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--fused-scale", type=int, default=16, help="divide the 7B shapes by this for the fused count")
    ap.add_argument("--blocks-scale", type=int, default=1, help="divide the 7B shapes by this for the blocks count")
    ap.add_argument("--details", action="store_true", help="include per-phase counts and ops by name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qlora", action="store_true", help="nf4 4-bit targets: count a step and one functional layer call")
    args = ap.parse_args()
    if args.scheme != "blocks" and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the fused kernels run in the interpreter
    dtype = getattr(torch, args.dtype)
    out = {}
    for scheme in (["fused", "blocks"] if args.scheme == "both" else [args.scheme]):
        scale = args.fused_scale if scheme == "fused" else args.blocks_scale
        res = (qlora_count if args.qlora else count)(scheme, scale, dtype, args.device)
        if not args.details:
            res = {k: v for k, v in res.items() if k not in ("ops", "phases", "step_ops")}
        out[scheme] = res
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
