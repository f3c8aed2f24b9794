"""One rank of the long-run exactness check (issue 8.3), started by ``ds_common.launch``.

``cycles`` perturb/restore cycles on a ZeRO-3 engine with bf16 base weights, with a forward, backward
and optimizer step every ``train_every`` cycles (so LoRA factors, hence the row norms, move).  The
persistence threshold leaves some base weights persistent (gathered copies kept between steps) and
others partitioned.  Writes ``rank<r>.json``: whether every frozen parameter's local partition (and
gathered copy, where persistent) is bitwise what it was, checked every ``check_every`` cycles, and
whether the full gathered weights are bitwise unchanged at the end.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from ds_common import load_ds_config, tiny_model

from flatlora_dist import FlatLoRA, FlatLoRAConfig


def bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.detach().contiguous().view(-1).view(torch.int16 if t.element_size() == 2 else torch.uint8).clone()
    )


def local_state(model) -> dict[str, torch.Tensor]:
    """Bits of every frozen param's partition, and of its gathered copy when one is held."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        out[f"{n}:part"] = bits(p.ds_tensor)
        if p.ds_status.name == "AVAILABLE":
            out[f"{n}:full"] = bits(p.data)
    return out


def gathered_sha(model) -> str:
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    todo = [p for _, p in frozen if p.ds_status.name == "NOT_AVAILABLE"]
    h = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        for n, p in frozen:
            h.update(n.encode())
            h.update(bits(p.data).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_ds_config("zero3", world=world, micro=2, dtype="bf16", persistence=args["persistence"])
    model = tiny_model(torch.bfloat16, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    cycles = args["cycles"]
    flat = FlatLoRA(
        engine, FlatLoRAConfig(sigma=args["sigma"], total_steps=cycles, schedule="constant", seed=7)
    )
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))

    engine(input_ids=x, labels=x)  # first forward: persistent params are gathered from here on
    engine.zero_grad()
    before_full = gathered_sha(engine.module)
    before = local_state(engine.module)
    lora0 = {n: p.ds_tensor.clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    res = {"fixups": 0, "checks": 0, "dirty_checks": 0, "max_noise": 0.0, "steps": 0}
    targets = {t.name: t.weight for t in flat.targets}
    probe = targets[sorted(targets)[0]].ds_tensor
    probe0 = probe.float().clone()
    t0 = time.time()
    for step in range(cycles):
        flat.perturb(step)
        res["fixups"] += flat.stats()["fixups"]
        if step % args["probe_every"] == 0:  # the noise is really there
            res["max_noise"] = max(res["max_noise"], float((probe.float() - probe0).abs().max()))
        if step % args["train_every"] == 0:
            engine.backward(engine(input_ids=x, labels=x).loss)
            flat.restore()
            engine.step()
            res["steps"] += 1
        else:
            flat.restore()
        if (step + 1) % args["check_every"] == 0:
            now = local_state(engine.module)
            res["checks"] += 1
            # a gathered copy may be released (engine.step); where one is held it must be the loaded one
            missing = [k for k in before if k.endswith(":part") and k not in now]
            bad = missing + sorted(k for k in now if k in before and not torch.equal(now[k], before[k]))
            res["dirty_checks"] += int(bool(bad))
            res["dirty"] = res.get("dirty") or bad[:6]
    res["loop_s"] = time.time() - t0
    res["bitwise_local"] = res["dirty_checks"] == 0 and res["checks"] == cycles // args["check_every"]
    res["bitwise_gathered"] = gathered_sha(engine.module) == before_full
    res["lora_trained"] = any(not torch.equal(p.ds_tensor, lora0[n]) for n, p in engine.module.named_parameters()
                              if p.requires_grad)  # fmt: skip
    kinds = [("persistent" if p.ds_persist else "partitioned") for p in targets.values()]
    res.update(persistent_bases=kinds.count("persistent"), partitioned_bases=kinds.count("partitioned"),
               cycles=cycles, rank=rank)  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()  # leave together: a rank exiting early can abort the other's gloo connection
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
