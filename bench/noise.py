"""Noise throughput vs ``torch.randn`` on the same device, interleaved in one run.

    .venv/bin/python bench/noise.py [--device cpu|cuda] [--numel 16777216] [--repeats 7] [--json out.json]

Prints elements/s of (a) ``torch.randn`` with a generator, (b) our keyed block noise for a whole
weight, (c) our noise for a shard starting mid-block (what a ZeRO-3 rank draws), and (d) a full
perturb+restore of one bf16 layer through FlatLoRA (noise, scaling, exact-restore check), with the
ratios randn_time / our_time (target for (b): >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchlib import sync

from flatlora_dist.noise import NOISE_BLOCK, noise_chunks


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=16 * NOISE_BLOCK)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, n = torch.device(args.device), args.numel
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn():
        for lo in range(0, n, NOISE_BLOCK):  # same chunking as ours, so the comparison is like for like
            torch.randn(min(NOISE_BLOCK, n - lo), generator=gen, device=dev)

    def ours_full():
        for _ in noise_chunks(0, 1, "layer", n, 0, n, dev):
            pass

    shard_lo = NOISE_BLOCK // 3

    def ours_shard():
        for _ in noise_chunks(0, 1, "layer", n + shard_lo, shard_lo, shard_lo + n, dev):
            pass

    from peft import LoraConfig, get_peft_model

    rows = 4096
    cols = max(1, n // rows)
    lin = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False)).to(device=dev, dtype=torch.bfloat16)
    model = get_peft_model(lin, LoraConfig(r=8, target_modules=["0"]))
    from flatlora_dist import FlatLoRA, FlatLoRAConfig

    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))

    def perturb_restore():
        flat.perturb(3)
        flat.restore()

    cases = {"randn": randn, "ours_full": ours_full, "ours_shard": ours_shard, "perturb_restore_bf16": perturb_restore}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for k, fn in cases.items():  # interleaved: machine noise hits every case alike
            times[k].append(timed(fn, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    elems = {"randn": n, "ours_full": n, "ours_shard": n, "perturb_restore_bf16": rows * cols}
    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "numel": n,
        "melem_per_s": {k: elems[k] / med[k] / 1e6 for k in med},
        "ratio_vs_randn": {k: (med["randn"] / elems["randn"]) / (med[k] / elems[k]) for k in med},
    }
    for k in med:
        print(f"{k:>22}: {result['melem_per_s'][k]:9.1f} M elem/s   ratio vs randn {result['ratio_vs_randn'][k]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
