"""Flat-LoRA overhead under 2-rank FSDP2 on CPU (gloo): step-time ratio against plain LoRA.

    .venv/bin/python bench/fsdp_overhead.py [--world 2] [--pairs 12] [--hidden 256] [--layers 4]

The model is sharded once with ``fully_shard`` (per decoder layer + root).  Flat-LoRA (sigma 0.05,
constant factor) and plain LoRA (the same engine with a sigma-0 FlatLoRA, which does nothing) alternate
step by step in one run (ABBA order, so drift cancels); a step is perturb + forward + backward + restore
+ optimizer step, timed on every rank after a barrier.  Prints median step times, their ratio, the
perturb/restore share and per rank ``state_bytes`` (norm buffers + fix-ups) against this rank's shards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))

from fsdp_common import launch, tiny_model, wrap  # noqa: E402


def worker(args: dict, out_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    from flatlora_dist import FlatLoRA, FlatLoRAConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    h = args["hidden"]
    model = tiny_model(torch.float32, r=8, hidden=h, inter=2 * h, layers=args["layers"], heads=4, kv_heads=4,
                       head_dim=h // 4)  # fmt: skip
    model = wrap(model, "fsdp2", world=world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=1000, schedule="constant"))
    plain = FlatLoRA(model, FlatLoRAConfig(sigma=0.0, total_steps=1000))
    gen = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {k: [] for k in ("flat", "plain", "perturb", "restore", "fb_flat", "fb_plain")}

    def step(f: FlatLoRA, i: int, record: bool) -> None:
        x = torch.randint(0, 128, (args["micro"], args["seq"]), generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        f.perturb(i)
        t1 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        t2 = time.perf_counter()
        f.restore()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if record:
            times["flat" if f is flat else "plain"].append(t4 - t0)
            times["fb_flat" if f is flat else "fb_plain"].append(t2 - t1)
            if f is flat:
                times["perturb"].append(t1 - t0)
                times["restore"].append(t3 - t2)

    for i in range(3):
        step(flat, i, False)
        step(plain, i, False)
    order = [flat, plain, plain, flat]
    for i in range(2 * args["pairs"]):
        step(order[i % 4], 10 + i, True)
    backend = flat._backend_of[id(flat.targets[0])]
    local = [r.tensor for t in flat.targets for r in backend.regions(t)]
    res = {
        "rank": rank,
        "median_flat_s": statistics.median(times["flat"]),
        "median_plain_s": statistics.median(times["plain"]),
        "median_perturb_s": statistics.median(times["perturb"]),
        "median_restore_s": statistics.median(times["restore"]),
        "median_fwd_bwd_flat_s": statistics.median(times["fb_flat"]),
        "median_fwd_bwd_plain_s": statistics.median(times["fb_plain"]),
        "state_bytes": flat.stats()["state_bytes"],
        "fixups": flat.stats()["fixups"],
        "shard_bytes": sum(t.numel() * t.element_size() for t in local),
        "full_base_bytes": sum(t.layout.numel * 4 for t in flat.targets),
        "norm_allreduces": flat.stats()["norm_allreduces"],
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    args = {k: getattr(a, k) for k in ("pairs", "hidden", "layers", "micro", "seq")}
    res = launch(Path(__file__).resolve(), a.world, {"bench": args})
    print(f"FSDP2, {a.world} CPU ranks (gloo, 1 thread each), Llama hidden {a.hidden}, {a.layers} layers, "
          f"LoRA r=8 on all projections, micro-batch {a.micro}x{a.seq}, {a.pairs} steps per arm (ABBA)")
    for r in res:
        ratio = r["median_flat_s"] / r["median_plain_s"]
        share = (r["median_perturb_s"] + r["median_restore_s"]) / r["median_plain_s"]
        print(
            f"rank {r['rank']}: step flat {r['median_flat_s'] * 1e3:.1f} ms / plain {r['median_plain_s'] * 1e3:.1f} ms "
            f"= ratio {ratio:.3f}; perturb {r['median_perturb_s'] * 1e3:.1f} ms, restore "
            f"{r['median_restore_s'] * 1e3:.1f} ms (= {share:.3f} x a plain step); forward+backward "
            f"{r['median_fwd_bwd_flat_s'] * 1e3:.1f} ms perturbed / {r['median_fwd_bwd_plain_s'] * 1e3:.1f} ms plain"
        )
        print(
            f"        state_bytes {r['state_bytes']} = {r['state_bytes'] / r['shard_bytes']:.4f} x this rank's base "
            f"shards ({r['shard_bytes']} B; full base {r['full_base_bytes']} B), fixups {r['fixups']}, "
            f"norm all-reduces {r['norm_allreduces']}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("{"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        worker(json.loads(sys.argv[1])["bench"], Path(sys.argv[2]))
    else:
        main()
