"""Where one CPU perturb + restore spends its time, against the reference and against the draw floor.

    .venv/bin/python bench/cpu_phases.py [--reps 5] [--r 8] [--json bench/results/cpu_phases.json]

SmolLM2-135M-Instruct, fp32, LoRA on every linear layer (210 layers, 106 M base elements), no training:
the model as ``bench/overhead.py`` builds it (B random, so ``s·B·A`` enters the row norms).  Interleaved
over ``--reps`` rounds (each round times every item once, so load drift hits all alike), medians:

* ``norms``: ``row_norms`` of ``W + s·B·A`` for every target (the perturb's first part);
* ``flat_perturb`` / ``flat_restore``: ``FlatLoRA.perturb`` / ``restore`` (norms included);
* ``flat_torch_*``: the same with ``FLATLORA_NATIVE=off`` (the torch ops the C passes replace);
* ``reference_perturb`` / ``reference_restore``: ``bench/reference.py`` (the paper's dense draw);
* ``draw_floor``: drawing every noise block of the model on the draw threads (one stream, scratch
  buffers) and nothing else — the keyed noise each phase must make, so ``flat_restore / draw_floor``
  is how close a phase gets to it.

Prints each median and the ratios Flat-LoRA / reference (perturb + restore) and phase / draw floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from benchlib import machine
from overhead import build, native_mode
from reference import ReferenceFlatLoRA

from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.noise import Scratch, noise_tasks, run_ordered
from flatlora_dist.norms import row_norms


def draw_all(flat: FlatLoRA, step: int) -> None:
    """Every noise block of every target, drawn on the draw threads, nothing done with it."""
    scratch, tasks = Scratch(), []
    for t in flat.targets:
        n = t.layout.numel
        tasks += noise_tasks(flat.config.seed, step, t.name, n, 0, n, "cpu", lambda lo, z: None, scratch)
    for _ in run_ordered(tasks, parallel=True):  # one stream over all weights, as perturb and restore run
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    model, _ = build(argparse.Namespace(r=args.r, device="cpu", micro=1, seq=8, ga=1))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=args.sigma, total_steps=10**6, schedule="constant"))
    ref = ReferenceFlatLoRA(model, rho=args.sigma, total_steps=10**6, schedule="constant")
    step = [0]

    def flat_pair(prefix: str, acc: dict) -> None:
        step[0] += 1
        t0 = time.perf_counter()
        flat.perturb(step[0])
        t1 = time.perf_counter()
        flat.restore()
        acc.setdefault(f"{prefix}_perturb", []).append(t1 - t0)
        acc.setdefault(f"{prefix}_restore", []).append(time.perf_counter() - t1)

    def ref_pair(acc: dict) -> None:
        t0 = time.perf_counter()
        ref.perturb()
        t1 = time.perf_counter()
        ref.restore()
        acc.setdefault("reference_perturb", []).append(t1 - t0)
        acc.setdefault("reference_restore", []).append(time.perf_counter() - t1)

    def timed(name: str, fn, acc: dict) -> None:
        t0 = time.perf_counter()
        fn()
        acc.setdefault(name, []).append(time.perf_counter() - t0)

    backends = {id(t): flat.backend_of(t) for t in flat.targets}
    rows = sum(t.layout.out_features for t in flat.targets)

    def norms() -> None:
        with torch.no_grad():
            row_norms(flat.targets, backends, torch.zeros(rows), None)

    items = {
        "norms": lambda acc: timed("norms", norms, acc),
        "flat": lambda acc: flat_pair("flat", acc),
        "flat_torch": lambda acc: _native_off(flat_pair, "flat_torch", acc),
        "reference": ref_pair,
        "draw_floor": lambda acc: timed("draw_floor", lambda: draw_all(flat, 10**6 + step[0]), acc),
    }
    for fn in items.values():  # warm-up: thread pools, allocator, the native library
        fn({})
    acc: dict[str, list[float]] = {}
    order = list(items)
    for r in range(args.reps):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            items[name](acc)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in acc.items()), flush=True)
    med = {k: statistics.median(v) for k, v in acc.items()}
    flat_pr = med["flat_perturb"] + med["flat_restore"]
    ref_pr = med["reference_perturb"] + med["reference_restore"]
    ratios = {
        "flat_vs_reference": flat_pr / ref_pr,
        "flat_torch_vs_reference": (med["flat_torch_perturb"] + med["flat_torch_restore"]) / ref_pr,
        "flat_perturb_vs_draw_floor": med["flat_perturb"] / med["draw_floor"],
        "flat_restore_vs_draw_floor": med["flat_restore"] / med["draw_floor"],
    }
    print(f"\nmedians of {args.reps} (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print(f"perturb+restore: Flat-LoRA {flat_pr:.3f} s, reference {ref_pr:.3f} s")
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.json:
        res = {"machine": machine(), "reps": args.reps, "r": args.r, "sigma": args.sigma,
               "base_elements": flat.stats()["elements"], "layers": len(flat.targets),
               "threads": torch.get_num_threads(), "times_s": acc, "median_s": med, "ratios": ratios}  # fmt: skip
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")


def _native_off(fn, *a) -> None:
    with native_mode("off"):
        fn(*a)


if __name__ == "__main__":
    main()
