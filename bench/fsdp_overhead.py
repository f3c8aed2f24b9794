"""Flat-LoRA overhead under 2-rank FSDP2 on CPU (gloo): step-time ratio against plain LoRA.

    .venv/bin/python bench/fsdp_overhead.py [--world 2] [--pairs 12] [--hidden 256] [--layers 4]

The model is sharded once with ``fully_shard`` (per decoder layer + root).  Flat-LoRA (sigma 0.05,
constant factor) and plain LoRA (the same engine with a sigma-0 FlatLoRA, which does nothing) alternate
step by step in one run (ABBA order, so drift cancels); a step is perturb + forward + backward + restore
+ optimizer step, timed on every rank after a barrier.  Prints median step times, their ratio, the
perturb/restore share and per rank ``state_bytes`` (norm buffers + fix-ups) against this rank's shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchlib import (
    fsdp2_wrap,
    interleaved_steps,
    launch,
    lora_llama,
    main_or_worker,
    parse_args,
    setup_line,
    step_line,  # fmt: skip
    step_medians,
)


def worker(args: dict, out_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    from flatlora_dist import FlatLoRA, FlatLoRAConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    h = args["hidden"]
    model = lora_llama(torch.float32, r=8, hidden=h, inter=2 * h, layers=args["layers"], heads=4, kv_heads=4,
                       head_dim=h // 4, max_positions=256)  # fmt: skip
    model = fsdp2_wrap(model, world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=1000, schedule="constant"))
    plain = FlatLoRA(model, FlatLoRAConfig(sigma=0.0, total_steps=1000))

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = interleaved_steps(
        flat, plain, lambda x: model(input_ids=x, labels=x).loss.backward(), opt_step, args, rank
    )
    backend = flat.backend_of(flat.targets[0])
    local = [r.tensor for t in flat.targets for r in backend.regions(t)]
    res = {
        "rank": rank,
        **step_medians(times, fwd_bwd=True),
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
    a, args = parse_args(__doc__)
    res = launch(Path(__file__).resolve(), a.world, {"bench": args})
    print(setup_line("FSDP2", a))
    for r in res:
        print(
            f"{step_line(r)}; forward+backward {r['median_fwd_bwd_flat_s'] * 1e3:.1f} ms perturbed / "
            f"{r['median_fwd_bwd_plain_s'] * 1e3:.1f} ms plain"
        )
        print(
            f"        state_bytes {r['state_bytes']} = {r['state_bytes'] / r['shard_bytes']:.4f} x this rank's base "
            f"shards ({r['shard_bytes']} B; full base {r['full_base_bytes']} B), fixups {r['fixups']}, "
            f"norm all-reduces {r['norm_allreduces']}"
        )


if __name__ == "__main__":
    main_or_worker(worker, main)
