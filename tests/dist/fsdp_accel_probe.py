"""One rank under ``accelerate launch --config_file launch/accelerate/<cfg>.yaml``: does the shipped config
give real FSDP ranks that Flat-LoRA recognises?  Writes ``<out>/rank<r>.json``.

Prepares a tiny PEFT Llama with ``Accelerator().prepare``, runs two Flat-LoRA steps, then gathers the
LoRA weights and (rank 0) saves and reloads the adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from fsdp_common import base_model, tiny_model

from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.checkpoint import gathered_lora_state_dict, save_adapter


def make_accelerator() -> tuple[Accelerator, bool]:
    """``Accelerator()`` honouring the FSDP / HSDP settings the launcher exported, also on CPU.

    accelerate 1.15 turns its FSDP plugin on only for GPU-like distributed types: under MULTI_CPU (gloo)
    the ``FSDP_*`` settings are ignored and a ``parallelism_config`` is refused outright.  On CPU the
    state is switched to FSDP with a plugin (and device mesh) built from those settings, before
    ``prepare``.  Returns the accelerator and whether the switch was needed.
    """
    import os

    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" and not torch.cuda.is_available()
    use_pc = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true"
    if cpu and use_pc:
        os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = "false"
    acc = Accelerator()
    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP") != "true":
        return acc, False
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    acc.state.device = torch.device("cpu")  # MULTI_CPU says cpu:<local rank>; FSDP1 wants the params' "cpu"
    if use_pc:
        pc = ParallelismConfig()
        acc.state.parallelism_config = pc
        acc.state.device_mesh = pc.get_device_mesh("cpu")
    return acc, True


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    acc, cpu_fsdp = make_accelerator()
    model = tiny_model(seed=0)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, opt = acc.prepare(model, opt)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=4, schedule="constant", seed=1))
    backend = flat._backend_of[id(flat.targets[0])]
    group = backend.reduce_group()
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(acc.process_index))
    for step in range(2):
        with flat.perturbed(step):
            acc.backward(model(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    sd = gathered_lora_state_dict(model)
    res = {
        "distributed_type": str(acc.distributed_type),
        "cpu_fsdp_switch": cpu_fsdp,
        "num_processes": acc.num_processes,
        "process_index": acc.process_index,
        "dist_world": dist.get_world_size() if dist.is_initialized() else 1,
        "dist_backend": str(dist.get_backend()) if dist.is_initialized() else None,
        "fsdp_version": getattr(acc.state.fsdp_plugin, "fsdp_version", None),
        "mesh_shape": list(getattr(flat.targets[0].weight, "device_mesh", None).shape)
        if type(flat.targets[0].weight).__name__ == "DTensor"
        else None,
        "backends": flat.stats()["backends"],
        "norm_allreduces": flat.stats()["norm_allreduces"],
        "reduce_group_size": None if group is None else dist.get_world_size(group),
        "adapter_equal": sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in want),
    }
    if save_adapter(model, out / "adapter", state_dict=sd):
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(base_model(seed=0), str(out / "adapter"))
        got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
        res["adapter_loaded_equal"] = sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(res))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
