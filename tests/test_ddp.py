"""DDP (replicated weights, plain backend): every rank draws the same noise, equal to one process's."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flatlora_dist import FlatLoRA, FlatLoRAConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perturbed_weights(model, flat, step: int) -> dict[str, torch.Tensor]:
    with flat.perturbed(step):
        return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "proj" in n}


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import fingerprint, tiny_llama

    model = tiny_llama(torch.bfloat16, seed=4)
    before = fingerprint(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    flat = FlatLoRA(ddp, FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant", seed=2))
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        with flat.perturbed(step):
            ddp(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    weights = _perturbed_weights(ddp.module, flat, 3)
    torch.save({"weights": weights, "unchanged": fingerprint(model) == before,
                "lora": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                "stats": flat.stats()}, os.path.join(result_dir, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_draw_identical_noise(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["weights"].keys() == r1["weights"].keys() and r0["weights"]
    for n in r0["weights"]:
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n
    assert r0["stats"]["backends"] == "plain" and r0["stats"]["norm_allreduces"] == 0
    # a single process with the same LoRA weights draws the very same perturbation
    from conftest import tiny_llama

    single = tiny_llama(torch.bfloat16, seed=4)
    with torch.no_grad():
        for n, p in single.named_parameters():
            if p.requires_grad:
                p.copy_(r0["lora"][n])
    flat = FlatLoRA(single, FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant", seed=2))
    ref = _perturbed_weights(single, flat, 3)
    for n, w in ref.items():
        assert torch.equal(w, r0["weights"][n]), n
