"""Flat-LoRA overhead under 2-rank DeepSpeed ZeRO-3 on CPU (gloo): step-time ratio and per-rank memory.

    .venv/bin/python bench/ds_overhead.py [--world 2] [--pairs 12] [--hidden 256] [--layers 4]

Flat-LoRA (sigma 0.05, constant factor) and plain LoRA (the same engine with a sigma-0 FlatLoRA,
which does nothing) alternate step by step in one run (ABBA order, so drift cancels); a step is
perturb + forward + backward + restore + ``engine.step()``, timed on every rank after a barrier.
Prints median step times, their ratio, the perturb/restore share, and per rank ``state_bytes`` (the
engine's persistent memory: norm buffers + fix-ups) against this rank's partitions of the base weights
and the noise elements each rank draws (whole noise blocks: layers below ``NOISE_BLOCK`` elements
are drawn whole by every rank).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchlib import (
    ds_env,
    interleaved_steps,
    launch,
    lora_llama,
    main_or_worker,
    parse_args,
    setup_line,
    step_line,
    step_medians,  # fmt: skip
    zero3_config,
)


def worker(args: dict, out_dir: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from flatlora_dist import FlatLoRA, FlatLoRAConfig
    from flatlora_dist.noise import NOISE_BLOCK

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = lora_llama(torch.float32, hidden=args["hidden"], inter=2 * args["hidden"], layers=args["layers"], r=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = zero3_config(world=world, micro=args["micro"], hidden=args["hidden"], persistence=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    flat = FlatLoRA(engine, FlatLoRAConfig(sigma=0.05, total_steps=1000, schedule="constant"))
    plain = FlatLoRA(engine, FlatLoRAConfig(sigma=0.0, total_steps=1000))
    times = interleaved_steps(flat, plain, lambda x: engine.backward(engine(input_ids=x, labels=x).loss),
                              engine.step, args, rank)  # fmt: skip
    part = [t.weight.ds_tensor for t in flat.targets]
    drawn = sum(_drawn(t.weight, NOISE_BLOCK) for t in flat.targets)
    res = {
        "rank": rank,
        **step_medians(times),
        "state_bytes": flat.stats()["state_bytes"],
        "fixups": flat.stats()["fixups"],
        "partition_bytes": sum(p.numel() * p.element_size() for p in part),
        "full_base_bytes": sum(t.layout.numel * 4 for t in flat.targets),
        "partition_elements": sum(p.numel() for p in part),
        "noise_elements_drawn": drawn,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()


def _drawn(w, block: int) -> int:
    """Noise elements this rank draws for its partition: every overlapped block, whole."""
    part = w.ds_tensor.numel()
    start = w.ds_zero_partition_rank * part
    stop = min(start + part, w.ds_numel)
    if stop <= start:
        return 0
    return sum(min(block, w.ds_numel - b * block) for b in range(start // block, (stop - 1) // block + 1))


def main() -> None:
    a, args = parse_args(__doc__)
    res = launch(Path(__file__).resolve(), a.world, {"bench": args}, env=ds_env)
    print(setup_line("ZeRO-3", a))
    for r in res:
        print(step_line(r))
        print(
            f"        state_bytes {r['state_bytes']} = {r['state_bytes'] / r['partition_bytes']:.4f} x this rank's "
            f"base partitions ({r['partition_bytes']} B; full base {r['full_base_bytes']} B), fixups {r['fixups']}; "
            f"noise drawn {r['noise_elements_drawn']} elements for {r['partition_elements']} partition elements"
        )


if __name__ == "__main__":
    main_or_worker(worker, main)
