"""Shared by the DeepSpeed workers, their pytest driver and bench/ds_overhead.py.

- ``tiny_model``: a random 2-layer Llama (hidden 64) with PEFT LoRA on all projections, B randomised.
- ``load_ds_config``: a file from ``ds_configs/`` with its HF-style ``"auto"`` values filled in.
- ``launch``: start ``world`` worker processes over gloo (free port, one thread each) and collect the
  JSON each rank writes (``launcher.launch`` with the DeepSpeed CPU environment of ``worker_env``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launcher import free_port  # noqa: F401 - re-exported for app_common
from launcher import launch as _launch
from launcher import worker_env as _worker_env
from tiny_lora import with_lora

ROOT = Path(__file__).resolve().parents[2]
DS_DEFAULT_PERSISTENCE = 100_000
"""DeepSpeed's own default ``stage3_param_persistence_threshold`` (a tiny model is then fully persistent)."""


def tiny_model(dtype=None, seed: int = 0, hidden: int = 64, inter: int = 128, layers: int = 2, r: int = 4):
    """PEFT LoRA Llama from a config (no download); identical on every rank for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return with_lora(LlamaForCausalLM(cfg).to(dtype or torch.float32), r, seed)


def load_ds_config(
    name: str,
    *,
    world: int,
    micro: int = 2,
    gas: int = 1,
    dtype: str = "fp32",
    hidden: int = 64,
    clip: float = 0.0,
    persistence: int | None = None,
) -> dict[str, Any]:
    """``ds_configs/<name>.json`` with every ``"auto"`` filled (as the HF integration would).

    ``persistence``: ``stage3_param_persistence_threshold``; ``None`` keeps HF's auto (10·hidden).
    """
    cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    top = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": clip,
    }
    for k, v in top.items():
        if cfg.get(k) == "auto":
            cfg[k] = v
    for key, on in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = on
    zero = cfg.get("zero_optimization", {})
    zauto = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for k, v in zauto.items():
        if zero.get(k) == "auto":
            zero[k] = v
    if persistence is not None and zero.get("stage") == 3:
        zero["stage3_param_persistence_threshold"] = persistence
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise ValueError(f"unfilled 'auto' values in {name}.json: {left}")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached: ``TORCH_EXTENSIONS_DIR`` if set, else a folder of this
    checkout's cache per torch version (an op built against one torch fails to load in another: the
    floor and newest stacks share the checkout)."""
    import torch

    default = ROOT / ".cache" / "torch_extensions" / f"torch-{torch.__version__}"
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(default)


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    """Environment of one CPU rank: gloo rendezvous, one thread, cached DeepSpeed JIT builds."""
    env = _worker_env(rank, world, port)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    env.setdefault("DS_BUILD_OPS", "0")
    return env


def launch(
    script: str | Path, world: int, args: dict[str, Any], timeout: float = 600
) -> list[dict[str, Any]]:
    """Run ``script`` as ``world`` DeepSpeed CPU ranks (:func:`launcher.launch` with :func:`worker_env`)."""
    return _launch(script, world, args, env=worker_env, prefix="flatlora_ds_", timeout=timeout)
