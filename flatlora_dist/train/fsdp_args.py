"""FSDP for the training application: HF Trainer arguments for ``--fsdp`` and the CPU switch accelerate lacks.

Two ways in, one code path (the HF Trainer's own FSDP integration, i.e. ``accelerate``'s ``prepare``):

* ``torchrun ... launch/train.py --fsdp fsdp2|fsdp1|hsdp``: :func:`fsdp_training_kwargs` turns the flag into
  ``TrainingArguments(fsdp=True, fsdp_config=...)`` (and, for HSDP on GPUs, a ``ParallelismConfig``).
* ``accelerate launch --config_file launch/accelerate/<fsdp1|fsdp2|hsdp>.yaml launch/train.py ...``: the
  launcher exports ``ACCELERATE_USE_FSDP`` and ``FSDP_*`` (and ``PARALLELISM_CONFIG_*``); the YAML's settings
  are used as they are (no ``fsdp`` argument is passed, accelerate builds its plugin from the environment).
  :func:`fsdp_from_env` names the kind so the application gathers the adapter and reports it like ``--fsdp``.

Settings chosen for ``--fsdp`` (the Flat-LoRA backends need exactly these): transformer auto-wrap (the model's
``_no_split_modules``, plus PEFT's wrapping of LoRA layers that the Trainer adds), FULL_STATE_DICT
checkpoints, FSDP1 ``use_orig_params=True`` (each original weight a view into the flat shard: FSDP1Backend
refuses anything else), FSDP2 default ``Shard(0)`` placements; on CUDA, CPU-RAM-efficient loading (rank 0
reads, the others start on the meta device; FSDP1 with ``sync_module_states=True``), on CPU every rank
loads the same weights (``sync_module_states=False``: accelerate 1.15 raises on CPU for ``True``).

HSDP sizes: ``dp_shard`` = ``PARALLELISM_CONFIG_DP_SHARD_SIZE`` if set (accelerate's own variable, which
``hsdp.yaml`` exports), else the processes per node (``LOCAL_WORLD_SIZE``); ``dp_replicate`` = world /
``dp_shard``.  So ``torchrun --nnodes 2 --nproc_per_node 2 ... --fsdp hsdp`` is 2 replicas x 2 shards, and on
one node ``PARALLELISM_CONFIG_DP_SHARD_SIZE=2 torchrun --nproc_per_node 4 ... --fsdp hsdp`` is the same 2x2.

**CPU (gloo) workaround** (:func:`cpu_fsdp_state`).  accelerate 1.15 enables its FSDP plugin only for
GPU-like distributed types: under MULTI_CPU the plugin (from ``TrainingArguments`` or from ``FSDP_*``) is
silently dropped and the Trainer wraps the model in DDP; a ``parallelism_config`` is refused; FSDP1 fails on a
``cpu`` vs ``cpu:0`` device mismatch.  On a CPU-only machine, right after ``TrainingArguments`` has set up
the process group, :func:`cpu_fsdp_state` initialises accelerate's (singleton) ``AcceleratorState`` as the
GPU path would have: distributed type FSDP, the plugin the Trainer would have built, device ``cpu``, and
for HSDP the 2-D device mesh.  The Trainer's own ``Accelerator`` then reuses that state (accelerate keeps
an initialised state), so ``trainer.is_fsdp_enabled`` is true and ``accelerator.prepare`` shards the model
with ``fully_shard`` / ``FullyShardedDataParallel``.  Nothing is patched; on CUDA machines it does nothing.
Run ``accelerate launch`` on CPU with ``ACCELERATE_USE_CPU=true`` (else accelerate 1.15 starts torchrun ranks
but sees each as a single process).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import ConfigError

KINDS = ("fsdp1", "fsdp2", "hsdp")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def fsdp_from_env() -> str | None:
    """The FSDP kind ``accelerate launch`` asked for through its environment (``None``: no FSDP config).

    ``fsdp1``/``fsdp2`` from ``FSDP_VERSION``; ``hsdp`` for FSDP2 with a parallelism config of more than one
    ``dp_replicate`` group.  The launcher always exports ``FSDP_VERSION``; ``ACCELERATE_USE_FSDP`` alone is
    what an ``Accelerator`` given a plugin sets in its own process (a run started with ``--fsdp``)."""
    if not _env_true("ACCELERATE_USE_FSDP") or "FSDP_VERSION" not in os.environ:
        return None
    version = os.environ["FSDP_VERSION"].strip()
    if version == "1":
        return "fsdp1"
    if _env_true("ACCELERATE_USE_PARALLELISM_CONFIG") and int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1")) > 1:
        return "hsdp"
    return "fsdp2"


def fsdp_kind(cfg) -> str | None:
    """``cfg.fsdp``, or the kind an ``accelerate launch`` FSDP config set (``None``: no FSDP); ``cfg`` is
    left as it is (the preflight puts the answer in the run's plan).

    Raises ``ConfigError`` when ``--fsdp`` contradicts the launcher's config, or for FSDP in one process that
    no launcher started (``torchrun --nproc_per_node 1`` sets ``LOCAL_RANK``: a legitimate 1-rank FSDP
    run)."""
    env = fsdp_from_env()
    if cfg.fsdp and env and cfg.fsdp != env:
        raise ConfigError(f"--fsdp {cfg.fsdp} contradicts the accelerate config ({env}); drop --fsdp or use "
                          f"launch/accelerate/{cfg.fsdp}.yaml")  # fmt: skip
    kind = cfg.fsdp or env
    if kind and int(os.environ.get("WORLD_SIZE", "1")) < 2 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(f"--fsdp {kind} needs a launcher: start it with torchrun --nproc_per_node N "
                          "(or accelerate launch --config_file launch/accelerate/<fsdp>.yaml)")  # fmt: skip
    return kind


def hsdp_sizes(world: int | None = None, per_node: int | None = None) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` for HSDP (see the module docstring); raises ``ConfigError`` if they do not
    tile the world or leave a dimension of one."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) if per_node is None else per_node
    shard = int(os.environ.get("PARALLELISM_CONFIG_DP_SHARD_SIZE", per_node))
    if shard < 2 or world % shard or world // shard < 2:
        raise ConfigError(f"--fsdp hsdp needs world size = replicas x shards with both >= 2; got world {world}, "
                          f"shard size {shard} (set PARALLELISM_CONFIG_DP_SHARD_SIZE, e.g. 2 for 4 ranks)")  # fmt: skip
    return world // shard, shard


def fsdp_config(kind: str, cuda: bool | None = None) -> dict[str, Any]:
    """``TrainingArguments.fsdp_config`` for ``kind`` (keys without the ``fsdp_`` prefix).

    With CUDA (``cuda``; default: ``torch.cuda.is_available()``) the model loads with accelerate's
    CPU-RAM-efficient loading: rank 0 reads the checkpoint, the other ranks build on the meta device and
    receive the weights when the model is sharded (FSDP1 needs ``sync_module_states`` for that), so N
    ranks of a node do not each hold the whole model in host memory.  ``TrainingArguments`` exports
    ``FSDP_CPU_RAM_EFFICIENT_LOADING`` for ``from_pretrained``; the application builds it before the model.
    Off on CPU (accelerate 1.15 raises there for ``sync_module_states``).
    """
    efficient = torch.cuda.is_available() if cuda is None else cuda
    common = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
              "cpu_ram_efficient_loading": efficient, "activation_checkpointing": False}  # fmt: skip
    if kind == "fsdp1":
        return {**common, "version": 1, "use_orig_params": True, "sync_module_states": efficient,
                "reshard_after_forward": "FULL_SHARD", "backward_prefetch": "BACKWARD_PRE"}  # fmt: skip
    return {**common, "version": 2, "reshard_after_forward": True}


def fsdp_training_kwargs(kind: str | None) -> dict[str, Any]:
    """Extra ``TrainingArguments`` keywords for the FSDP ``kind`` (:func:`fsdp_kind`; ``{}`` without FSDP or
    when an accelerate config drives FSDP)."""
    if kind is None or fsdp_from_env() is not None:
        return {}
    kwargs: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp_config(kind)}
    if kind == "hsdp" and torch.cuda.is_available():  # on CPU accelerate refuses it: cpu_fsdp_state sets it
        from accelerate import ParallelismConfig

        replicate, shard = hsdp_sizes()
        kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=replicate, dp_shard_size=shard)
    return kwargs


def cpu_fsdp_state(args, kind: str | None) -> bool:
    """The CPU workaround (module docstring): make accelerate's state FSDP before the Trainer builds its
    ``Accelerator``.  Call right after building ``args``; returns whether it switched anything."""
    if kind is None or torch.cuda.is_available():
        return False
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    _ = args.device  # TrainingArguments sets up (and first resets) accelerate's state and the process group here
    mp = args.mixed_precision
    if _env_true("ACCELERATE_USE_PARALLELISM_CONFIG"):
        os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = "false"  # refused on CPU; the mesh is set below
    dynamo = TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)  # as the Trainer's
    state = AcceleratorState(mixed_precision=mp, cpu=True, dynamo_plugin=dynamo, _from_accelerator=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(f"--fsdp {kind} on CPU needs several processes (torchrun / accelerate launch); accelerate "
                          f"sees distributed type {state.distributed_type}")  # fmt: skip
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))  # {}: from the FSDP_* environment
    if mp != "no":
        plugin.set_mixed_precision(mp)
    if plugin.fsdp_version == 1 and "FULL_STATE_DICT" in str(plugin.state_dict_type):
        # torch 2.13: FSDP1's FULL_STATE_DICT with offload_to_cpu (which accelerate always asks for) segfaults
        # when the parameters already live on the CPU; checkpoints are written sharded instead
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # rebuilt for the new type
        plugin.set_state_dict_type("SHARDED_STATE_DICT")
    # Every later AcceleratorState() (the Trainer's Accelerator makes one) re-copies PartialState's fields over
    # its own: switch both.  MULTI_CPU says device cpu:<local rank>; FSDP1 wants the parameters' "cpu".
    # Both are singletons whose instances share one attribute dict, so setting the public attributes on an
    # instance switches the process-wide state (no private _shared_state needed).
    partial = PartialState()
    for name, value in {"distributed_type": DistributedType.FSDP, "device": torch.device("cpu")}.items():
        setattr(partial, name, value)
        setattr(state, name, value)
    state.fsdp_plugin = plugin
    if kind == "hsdp":
        replicate, shard = hsdp_sizes()
        pc = ParallelismConfig(dp_replicate_size=replicate, dp_shard_size=shard)
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh("cpu")
    return True
