"""One rank of the fast multi-rank norm check (tests/test_norm_reduction.py, which forks the ranks): FSDP2 over a 2 x 2 HSDP
mesh (2 replicas x 2 row shards), one perturbation, compared with a single-process engine built here.

Writes ``rank<r>.json``: the reduction group's size, the all-reduces seen during perturb/restore, the
row std's largest relative difference from the single-process one, and this rank's perturbed rows
against the single-process perturbed weight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft  # noqa: F401 - imported before the ranks fork, so no rank pays for it
import torch
import torch.distributed as dist
import torch.distributed.device_mesh  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from fsdp_common import tiny_model, wrap

from flatlora_dist import FlatLoRA, FlatLoRAConfig

STEP = 3
_CALLS = {"n": 0}
_all_reduce = dist.all_reduce


def _counting(*a, **k):
    _CALLS["n"] += 1
    return _all_reduce(*a, **k)


dist.all_reduce = _counting


def config() -> FlatLoRAConfig:
    return FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant", seed=5)


def run_rank(args: dict, out: str) -> None:
    """One rank (forked by the test through ``launcher.fork_launch``, or started by ``main``)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(tiny_model(seed=0), "fsdp2", world=world, replicas=args["replicas"], layers=False)
    flat = FlatLoRA(model, config())
    backend = flat._backend_of[id(flat.targets[0])]
    group = backend.reduce_group()
    before = [[r.tensor.clone() for r in backend.regions(t)] for t in flat.targets]
    _CALLS["n"] = 0
    flat.perturb(STEP)
    perturb_calls = _CALLS["n"]
    std = flat._norms.clone()
    local = [[(r.start, r.tensor.clone()) for r in backend.regions(t)] for t in flat.targets]
    _CALLS["n"] = 0
    flat.restore()
    restore_calls = _CALLS["n"]
    restored = all(
        torch.equal(r.tensor, b) for t, bs in zip(flat.targets, before) for r, b in zip(backend.regions(t), bs)
    )

    ref = tiny_model(seed=0)
    ref_flat = FlatLoRA(ref, config())
    ref_flat.perturb(STEP)
    ref_std = ref_flat._norms.clone()
    diff, covered = 0.0, 0
    for t, rt, regions in zip(flat.targets, ref_flat.targets, local):
        want = rt.weight.detach().reshape(-1)
        for start, values in regions:
            diff = max(diff, float((values - want[start : start + values.numel()]).abs().max()))
            covered += values.numel()
    ref_flat.restore()
    res = {
        "reduce_group_size": None if group is None else dist.get_world_size(group),
        "perturb_allreduces": perturb_calls,
        "restore_allreduces": restore_calls,
        "norm_allreduces": flat.stats()["norm_allreduces"],
        "std_max_rel": float(((std - ref_std).abs() / ref_std.abs()).max()),
        "local_max_abs_diff": diff,
        "local_elements": covered,
        "total_elements": sum(t.layout.numel for t in flat.targets),
        "restored_bitwise": restored,
        "starts": [[s for s, _ in regions] for regions in local],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_rank(json.loads(sys.argv[1]), sys.argv[2])
