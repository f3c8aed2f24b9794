"""One LLaMA-7B decoder layer's LoRA targets: perturb + restore vs a ``copy_`` of the same bytes, and the
Flat/LoRA step ratio at these shapes.

    .venv/bin/python bench/fused_layer.py --device cuda [--dtype bfloat16] [--scale 1] [--tokens 4096]
        [--reps 5] [--json out.json]

* ``perturb_restore_ms``: median of ``perturb(step)`` + ``restore()`` of the seven weights (q, k, v, o
  4096x4096, gate/up 11008x4096, down 4096x11008; LoRA r=16), norms and statistics included, with the
  scheme ``FLATLORA_KERNELS`` selects (``auto``: fused on CUDA).
* ``copy_ms``: median of ``dst.copy_(w)`` over the same seven weights (one read + one write of every
  byte): the bandwidth floor.  ``ratio_vs_copy`` = perturb_restore / copy (goal <= 5 on a GPU).
* ``kernels`` (fused scheme): each kernel of the step alone over the seven weights (on copies), median
  ms and its ratio to ``copy_ms``: ``write`` (perturb's one pass, records into ample buffers), ``restore``
  (the subtract pass), ``row_sumsq`` (the norms of ``W + s·BA``); the bandwidth floor of a pass that
  reads and writes every byte once is ``copy_ms`` (``row_sumsq`` only reads).
* ``step_ratio``: a training step of the seven projections (forward + backward of ``tokens`` tokens
  through q, k, v, o and the gated MLP, LoRA on all seven) with Flat-LoRA (perturb, step, restore) over
  the same step without it, medians of interleaved runs (goal <= 1.02 on a GPU).

On CPU use ``--scale`` to shrink every dimension (the fused kernels then run in the Triton interpreter
when ``FLATLORA_KERNELS=fused`` and ``TRITON_INTERPRET=1``): a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launches import layer_model  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` calls after one warm-up, device-synchronised, in ms."""
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _forward(model, x: torch.Tensor) -> torch.Tensor:
    """q, k, v, o on the hidden states and the gated MLP (no attention softmax: the LoRA layers' cost)."""
    m = model.base_model.model
    h = m.o_proj(m.q_proj(x) + m.k_proj(x) + m.v_proj(x))
    return m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))


def kernel_times(flat: FlatLoRA, device: torch.device, reps: int, copy_ms: float) -> dict:
    """Median ms of each fused kernel of a step over the seven weights (copies), and its ratio to ``copy_``."""
    from flatlora_dist.kernels import load_ops

    ops = load_ops()
    flat.perturb(1)  # for the noise keys (row std)
    keys = [flat.noise_key(t) for t in flat.targets]
    flat.restore()
    ws = [t.weight.detach().clone() for t in flat.targets]
    go = torch.ones(1, dtype=torch.int64, device=device)
    bufs = []
    for w in ws:
        n = w.numel()
        it = torch.int32 if n < 2**31 else torch.int64
        bufs.append((torch.zeros(2, dtype=torch.int64, device=device),
                     torch.zeros(ops.programs_at(n, 0), dtype=torch.int8, device=device),
                     (torch.empty(n, dtype=it, device=device), torch.empty(n, dtype=torch.int16, device=device),
                      torch.empty(n, dtype=it, device=device), torch.empty(n, dtype=w.dtype, device=device))))

    def write() -> None:
        for w, k, (ctr, done, rec) in zip(ws, keys, bufs):
            ctr.zero_()
            ops.perturb(w.view(-1), k.std, go, ctr, done, rec, 0, k.layout.cols, k.seed64, (0, 0), k.layout.out_axis)

    def restore() -> None:
        for w, k in zip(ws, keys):
            ops.restore(w.view(-1), k.std, 0, k.layout.cols, k.seed64, k.layout.out_axis)

    factors = []
    for t in flat.targets:
        a, b, s = t.local_factors()[0]
        factors.append((a.detach().float().contiguous(), b.detach().float().contiguous(), s))
    acc = torch.zeros(max(t.layout.out_features for t in flat.targets), dtype=torch.float32, device=device)

    def norms() -> None:
        for t, w, (a, b, s) in zip(flat.targets, ws, factors):
            ops.row_sumsq(acc, w.view(-1), a, b, s, 0, t.layout.cols, t.layout.out_axis)

    out = {}
    for name, fn in (("write", write), ("restore", restore), ("row_sumsq", norms)):
        ms = median_ms(fn, device, reps)
        out[name] = {"ms": ms, "ratio_vs_copy": ms / copy_ms}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (CPU smoke runs)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    model = layer_model(args.scale, dtype).to(device)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10**6, schedule="constant", seed=0))
    weights = [t.weight for t in flat.targets]
    clean = [w.detach().clone() for w in weights]
    copies = [torch.empty_like(w) for w in weights]
    step = [0]

    def perturb_restore() -> None:
        step[0] += 1
        flat.perturb(step[0])
        flat.stats()
        flat.restore()

    def copy() -> None:
        for d, w in zip(copies, weights):
            d.copy_(w)

    res = {"device": str(device), "dtype": args.dtype, "scale": args.scale, "scheme": flat.scheme,
           "weight_bytes": sum(w.numel() * w.element_size() for w in weights)}
    res["perturb_restore_ms"] = median_ms(perturb_restore, device, args.reps)
    res["copy_ms"] = median_ms(copy, device, args.reps)
    res["ratio_vs_copy"] = res["perturb_restore_ms"] / res["copy_ms"]
    res["bitwise_restored"] = all(torch.equal(w, c) for w, c in zip(weights, clean))
    res["fixups"] = flat.stats()["fixups"]

    if flat.scheme == "fused":
        res["kernels"] = kernel_times(flat, device, args.reps, res["copy_ms"])

    hidden = model.base_model.model.q_proj.in_features
    x = torch.randn(args.tokens, hidden, device=device, dtype=dtype)

    def lora_step() -> None:
        _forward(model, x).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def flat_step() -> None:
        step[0] += 1
        with flat.perturbed(step[0]):
            lora_step()

    lora, flat_t = [], []
    for _ in range(args.reps):  # interleaved, so drift in clocks hits both arms
        lora.append(median_ms(lora_step, device, 1))
        flat_t.append(median_ms(flat_step, device, 1))
    res["lora_step_ms"], res["flat_step_ms"] = statistics.median(lora), statistics.median(flat_t)
    res["step_ratio"] = res["flat_step_ms"] / res["lora_step_ms"]
    res["bitwise_restored_after_steps"] = all(torch.equal(w, c) for w, c in zip(weights, clean))
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if not (res["bitwise_restored"] and res["bitwise_restored_after_steps"]):
        raise SystemExit("the base weights were not restored bitwise")


if __name__ == "__main__":
    main()
