"""Shared by the FSDP workers, their pytest driver (tests/test_fsdp.py) and bench/fsdp_overhead.py.

- ``tiny_model``: a random 2-layer Llama with PEFT LoRA on all projections, B randomised.  ``head_dim=4``
  and one KV head make ``k_proj``/``v_proj`` 4 rows tall, so a 3-rank ceil row split leaves rank 2 with
  no rows (and LoRA A, r=4 rows, likewise); q_proj (16 rows) and gate/up (80 rows) split unevenly.
- ``wrap``: FSDP2 (``fully_shard`` per decoder layer + root, or root only), FSDP1 (``use_orig_params``,
  transformer auto-wrap or root only, any sharding strategy) and HSDP (2-D mesh) for either.
- ``launch``: start ``world`` worker processes over gloo on loopback (free port, one thread each) and
  collect the JSON each rank writes.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(layers: int = 2, hidden: int = 64, inter: int = 80, heads: int = 4, kv_heads: int = 1, head_dim: int = 4):
    """Defaults: the test model (4-row k/v projections); the benchmark passes a conventional shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
    )


def tiny_model(dtype=None, seed: int = 0, r: int = 4, **cfg):
    """PEFT LoRA Llama from a config (no download); identical on every rank for the same seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**cfg)).to(dtype or torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_PROJ))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make s*BA vanish from the norms
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return model


def base_model(dtype=None, seed: int = 0, **cfg):
    """The un-adapted Llama ``tiny_model`` starts from (same seed: same weights)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**cfg)).to(dtype or torch.float32)


def decoder_layers(model):
    return model.base_model.model.model.layers


def make_mesh(world: int, replicas: int):
    """1-D mesh over all ranks, or a ``(replicas, world // replicas)`` mesh named (replicate, shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicas <= 1:
        return init_device_mesh("cpu", (world,))
    return init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def wrap(model, kind: str, *, world: int, replicas: int = 1, layers: bool = True, strategy: str = "FULL_SHARD"):
    """Shard ``model`` in place (FSDP2) or wrap it (FSDP1); returns the object to train and to give FlatLoRA.

    ``kind``: ``fsdp2`` or ``fsdp1``.  ``replicas > 1``: HSDP over a 2-D mesh (FSDP2 mesh placements
    (Replicate, Shard(0)); FSDP1 ``HYBRID_SHARD`` with that mesh).
    """
    import torch

    mesh = make_mesh(world, replicas)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if layers:
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    if replicas > 1:
        strategy = "HYBRID_SHARD"
    return FSDP(
        model,
        auto_wrap_policy=policy if layers else None,
        use_orig_params=True,
        sharding_strategy=ShardingStrategy[strategy],
        device_mesh=mesh if replicas > 1 else None,
        device_id=torch.device("cpu"),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    """Environment of one CPU rank: gloo rendezvous on loopback, one thread."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "dist"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    )
    return env


def launch(script: str | Path, world: int, args: dict[str, Any], timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``script`` as ``world`` ranks; each writes ``<out>/rank<r>.json``; return them by rank.

    The script gets ``args`` as one JSON argument and the output folder as the second.  Raises
    ``RuntimeError`` with every failed rank's output tail when a rank fails or times out.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="flatlora_fsdp_") as out:
        procs, logs = [], []
        for r in range(world):
            log = open(Path(out) / f"log{r}.txt", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            cmd = [sys.executable, str(script), json.dumps(args), out]
            procs.append(subprocess.Popen(cmd, env=worker_env(r, world, port), stdout=log, stderr=subprocess.STDOUT))
        failed = []
        for r, p in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                rc = "timeout"
            if rc != 0:
                failed.append(r)
        tails = {}
        for r, log in enumerate(logs):
            log.seek(0)
            tails[r] = log.read()[-4000:]
            log.close()
        if failed:
            logs_text = "\n".join(f"--- rank {r}\n{tails[r]}" for r in failed)
            raise RuntimeError(f"ranks {failed} failed:\n{logs_text}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
