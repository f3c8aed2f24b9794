"""QLoRA's functional layer call under the fused scheme: building ``round(dequant(W) + e)`` for one
LLaMA-7B layer's seven nf4 targets, against bitsandbytes' dequantize alone (what any QLoRA forward pays).

    .venv/bin/python bench/qlora_fused.py --device cuda [--dtype bfloat16] [--scale 1] [--reps 20]
        [--json out.json]

Three arms per target, summed over the seven (q, k, v, o 4096x4096, gate/up 11008x4096, down
4096x11008; nf4, double quantization, ``--dtype`` = compute dtype), medians of ``--reps``:

* ``dequant_ms``: bitsandbytes' ``dequantize_4bit`` into the compute dtype (the floor: QLoRA's own
  forward does it).
* ``two_step_ms``: that dequantize, then the ``noisy`` kernel over its output (the path before
  ``noisy_4bit``).
* ``fused_ms``: ``functional.noisy_weight`` = one ``noisy_4bit`` kernel from the packed bytes.

``fused_vs_dequant`` = fused / dequant and ``two_step_vs_dequant``; every fused result is checked
bit-equal to the two-step one.  On CPU the kernels run in the Triton interpreter (``--scale`` shrinks
the shapes): a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from fused_layer import median_ms
from launches import LLAMA7B, RANK, _Targets4bit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (CPU smoke runs)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ["FLATLORA_KERNELS"] = "fused"
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    from peft import LoraConfig, get_peft_model

    from flatlora_dist import FlatLoRA, FlatLoRAConfig, functional
    from flatlora_dist.kernels import load_ops

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    shapes = {k: (o // args.scale, i // args.scale) for k, (o, i) in LLAMA7B.items()}
    base = _Targets4bit(shapes, dtype).to(device)  # quantizes on the device
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(shapes)))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant", seed=0))
    flat.perturb(1)
    ops = load_ops()
    calls = [(flat.backend_of(t), t, flat.noise_key(t)) for t in flat.targets]

    def dequant():
        return [b.dense_weight(t) for b, t, _ in calls]

    def two_step():
        return [ops.noisy(b.dense_weight(t), k.std, t.layout.cols, k.seed64, 0) for b, t, k in calls]

    def fused():
        return [functional.noisy_weight(b, t, k, dtype) for b, t, k in calls]

    same = all(torch.equal(f, s) for f, s in zip(fused(), two_step()))
    res = {"device": str(device), "dtype": args.dtype, "scale": args.scale,
           "elements": sum(t.layout.numel for t in flat.targets),
           "packed_bytes": sum(t.weight.data.numel() * t.weight.data.element_size() for t in flat.targets)}
    res["dequant_ms"] = median_ms(dequant, device, args.reps)
    res["two_step_ms"] = median_ms(two_step, device, args.reps)
    res["fused_ms"] = median_ms(fused, device, args.reps)
    res["fused_vs_dequant"] = res["fused_ms"] / res["dequant_ms"]
    res["two_step_vs_dequant"] = res["two_step_ms"] / res["dequant_ms"]
    res["fused_equals_two_step"] = same
    flat.restore()
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if not same:
        raise SystemExit("the fused 4-bit kernel differs from dequantize + noisy")


if __name__ == "__main__":
    main()
