"""Cost of a QLoRA Flat-LoRA step against a plain QLoRA LoRA step, same model, same run.

The model is a stack of ``--blocks`` 4-bit MLP blocks ``x + down(silu(up(x)))`` with LoRA on ``up``
(in -> out) and ``down`` (out -> in); ``--shape 4096x11008`` gives a Llama-2-7B MLP (gate omitted).
Steps are interleaved (LoRA, Flat, Flat, LoRA, ...) so drift in machine load hits both alike; the
medians are reported.  Flat-LoRA runs with ``schedule="constant"`` so every measured step perturbs.

Memory is the peak of *step-transient* tensor memory, i.e. the highest live-tensor bytes above the
level at the step's start (activations, gradients, dequantized and noisy weights):
  * cuda: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one step;
  * cpu: torch's CPU allocator has no peak counter, so one extra step per mode runs under
    ``torch.profiler(profile_memory=True)`` and the running sum of its allocation/free records gives
    the peak.  (RSS is useless here: glibc keeps freed pages, and ``ru_maxrss`` cannot be reset.)

    .venv/bin/python bench/qlora_overhead.py                                  # CPU, 1024x2816
    python bench/qlora_overhead.py --device cuda --shape 4096x11008 --dtype bf16 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from benchlib import sync
from fused_layer import median_ms
from torch import nn

from flatlora_dist import FlatLoRA, FlatLoRAConfig


class Block(nn.Module):
    """``x + down(silu(up(x)))`` with 4-bit ``up`` (in->out) and ``down`` (out->in)."""

    def __init__(self, n_in: int, n_out: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.up = quantized_linear(n_in, n_out, args)
        self.down = quantized_linear(n_out, n_in, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.silu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, n_in: int, n_out: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(n_in, n_out, args) for _ in range(args.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def quantized_linear(n_in: int, n_out: int, args: argparse.Namespace) -> nn.Module:
    """A bnb ``Linear4bit`` with a random weight (std 1/sqrt(in)), quantized when moved to the device."""
    import bitsandbytes as bnb

    dtype = DTYPES[args.dtype]
    lin = bnb.nn.Linear4bit(
        n_in,
        n_out,
        bias=False,
        compute_dtype=dtype,
        quant_type=args.quant_type,
        compress_statistics=args.double_quant,
        quant_storage=dtype if args.quant_storage else torch.uint8,
    )
    w = torch.randn(n_out, n_in, dtype=dtype) / n_in**0.5
    lin.weight = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        quant_type=args.quant_type,
        compress_statistics=args.double_quant,
        quant_storage=dtype if args.quant_storage else torch.uint8,
    )
    return lin


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    n_out, n_in = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    model = Stack(n_in, n_out, args).to(args.device)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["up", "down"]))
    lora = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    x = torch.randn(args.batch, args.seq, n_in, device=args.device, dtype=DTYPES[args.dtype])
    return model, lora, x, n_in, n_out


def make_steps(model, lora, x, flat: FlatLoRA) -> dict[str, Callable[[int], float]]:
    """One training step per mode; each returns the seconds its ``perturb()`` (norm pass) took."""
    opt = torch.optim.AdamW(lora, lr=1e-4)
    device = str(x.device)

    def fwd_bwd() -> None:
        model(x).float().square().mean().backward()

    def lora_step(step: int) -> float:
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    def flat_step(step: int) -> float:
        t0 = time.perf_counter()
        flat.perturb(step)
        sync(device)
        t_norm = time.perf_counter() - t0
        try:
            fwd_bwd()
        finally:
            flat.restore()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t_norm

    return {"lora": lora_step, "flat": flat_step}


def peak_step_memory(fn: Callable[[int], float], step: int, device: str) -> int:
    """Peak live-tensor bytes above the step's starting level (see the module docstring)."""
    if device.startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(step)
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(step)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in records:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def component_times(flat: FlatLoRA, device: str, reps: int = 5) -> dict[str, float]:
    """Median ms per call, for the largest layer: bnb's dequant, ``dense_weight``, drawing its noise,
    ``noisy_weight`` (what functional mode runs once in forward and once in backward)."""
    import bitsandbytes.functional as bf

    from flatlora_dist import functional
    from flatlora_dist.noise import noise_range

    t = max(flat.targets, key=lambda t: t.layout.numel)
    backend = flat.backend_of(t)
    flat.perturb(0)
    key = flat.noise_key(t)
    numel = t.layout.numel
    parts = {
        "bnb dequantize_4bit": lambda: bf.dequantize_4bit(t.weight.data, t.weight.quant_state),
        "BnbBackend.dense_weight": lambda: backend.dense_weight(t),
        "noise draw (randn m*n)": lambda: noise_range(0, 0, t.name, numel, 0, numel, device),
        "functional.noisy_weight": lambda: functional.noisy_weight(
            backend, t, key, backend.dense_weight(t).dtype
        ),
    }
    out = {}
    try:
        for name, fn in parts.items():
            out[name] = median_ms(fn, torch.device(device), reps)
    finally:
        flat.restore()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="1024x2816", help="OUTxIN of the up projection (down is its transpose)")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (cpu: fp32, cuda: bf16)"
    )
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--quant-storage", action="store_true", help="bnb_4bit_quant_storage = compute dtype")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, lora, x, n_in, n_out = build(args)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=args.sigma, total_steps=10**6, schedule="constant"))
    steps = make_steps(model, lora, x, flat)
    print(
        f"device={args.device} shape={n_out}x{n_in} blocks={args.blocks} layers={len(flat.targets)} "
        f"tokens={args.batch}x{args.seq} dtype={args.dtype} {args.quant_type} double_quant={args.double_quant} "
        f"quant_storage={'compute' if args.quant_storage else 'uint8'} r={args.r} threads={torch.get_num_threads()}"
    )
    times: dict[str, list[float]] = {"lora": [], "flat": []}
    norm_times: list[float] = []
    for i in range(args.warmup + args.steps):
        order = ("lora", "flat") if i % 2 == 0 else ("flat", "lora")
        for mode in order:
            sync(args.device)
            t0 = time.perf_counter()
            t_norm = steps[mode](i)
            sync(args.device)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
                if mode == "flat":
                    norm_times.append(t_norm)
    mem = {mode: peak_step_memory(steps[mode], 10**5, args.device) for mode in ("lora", "flat")}

    med = {k: statistics.median(v) for k, v in times.items()}
    w_bytes = sum(t.layout.numel for t in flat.targets) // 2
    print(
        f"step time median  lora {med['lora'] * 1e3:9.1f} ms   flat {med['flat'] * 1e3:9.1f} ms   "
        f"ratio {med['flat'] / med['lora']:.3f}   (flat: perturb/norm pass {statistics.median(norm_times) * 1e3:.1f} ms)"
    )
    print(
        f"peak step memory  lora {mem['lora'] / 2**20:9.1f} MiB  flat {mem['flat'] / 2**20:9.1f} MiB  "
        f"ratio {mem['flat'] / max(1, mem['lora']):.3f}   (packed 4-bit weights: {w_bytes / 2**20:.1f} MiB, "
        f"largest layer dequantized in fp32: {max(t.layout.numel for t in flat.targets) * 4 / 2**20:.1f} MiB)"
    )
    parts = component_times(flat, args.device)
    print("largest layer, ms per call: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(
        f"engine state {flat.stats()['state_bytes']} bytes; spread lora {min(times['lora']) * 1e3:.1f}-"
        f"{max(times['lora']) * 1e3:.1f} ms, flat {min(times['flat']) * 1e3:.1f}-{max(times['flat']) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
