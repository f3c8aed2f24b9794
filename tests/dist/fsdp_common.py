"""Shared by the FSDP workers, their pytest driver (tests/test_fsdp.py) and bench/fsdp_overhead.py.

- ``tiny_model``: a random 2-layer Llama with PEFT LoRA on all projections, B randomised.  ``head_dim=4``
  and one KV head make ``k_proj``/``v_proj`` 4 rows tall, so a 3-rank ceil row split leaves rank 2 with
  no rows (and LoRA A, r=4 rows, likewise); q_proj (16 rows) and gate/up (80 rows) split unevenly.
- ``wrap``: FSDP2 (``fully_shard`` per decoder layer + root, or root only), FSDP1 (``use_orig_params``,
  transformer auto-wrap or root only, any sharding strategy) and HSDP (2-D mesh) for either.
- ``launch``: start ``world`` worker processes over gloo on loopback (free port, one thread each) and
  collect the JSON each rank writes (``launcher.launch`` with this module's ``worker_env``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from launcher import free_port  # noqa: F401 - re-exported for the tests
from launcher import launch as _launch
from launcher import worker_env as _worker_env
from tiny_lora import with_lora

ROOT = Path(__file__).resolve().parents[2]


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
    return with_lora(base_model(dtype, seed, **cfg), r, seed)


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


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    """Environment of one CPU rank: gloo rendezvous on loopback, one thread, ``tests/dist`` importable."""
    return _worker_env(rank, world, port, paths=(ROOT, ROOT / "tests" / "dist"))


def launch(
    script: str | Path, world: int, args: dict[str, Any], timeout: float = 600
) -> list[dict[str, Any]]:
    """Run ``script`` as ``world`` FSDP CPU ranks (:func:`launcher.launch` with :func:`worker_env`)."""
    return _launch(script, world, args, env=worker_env, prefix="flatlora_fsdp_", timeout=timeout)
