"""Checkpointing a Flat-LoRA run, whatever shards it: the complete LoRA state dict, a loadable PEFT
adapter, and a fingerprint of the stored base weights.

Every function works through the ``ShardBackend`` of each parameter (``shards.param_kind``): the backend
knows where this rank stores its part (``local_storage``), how to make that storage the only copy
(``settle``: FSDP reshards units an evaluation forward left unsharded) and how to gather complete
values (``full_copies``).  So the same calls serve a single process, DDP, DeepSpeed ZeRO-1/2/3, FSDP1,
FSDP2 and HSDP, and a user's own training script needs nothing else::

    sd = gathered_lora_state_dict(model)          # every rank (collective); identical on every rank
    save_adapter(model, out_dir, state_dict=sd)   # global rank 0 writes; PeftModel.from_pretrained loads it
    before = base_fingerprint(model)              # every rank (collective)
    ...train...
    assert base_fingerprint(model) == before      # no stored base bit changed

``model`` is what the user trains: the PEFT model, the DeepSpeed engine (or ``engine.module``), the
``fully_shard``-ed PEFT model, or the root ``FullyShardedDataParallel`` around it.  Every function is
collective under ``torch.distributed``: call it on every rank, at the same point, outside
forward/backward.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .shards import ShardBackend, make_backend, model_kinds, param_kind
from .targets import WRAPPER_PARTS


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _backends(model: nn.Module) -> dict[str, ShardBackend]:
    """One settled backend per kind that stores parameters of ``model`` (local, no collective)."""
    backends = {kind: make_backend(kind, model) for kind in model_kinds(model)}
    for b in backends.values():
        b.settle()
    return backends


def _backend_of(backends: dict[str, ShardBackend], model: nn.Module, param: torch.Tensor) -> ShardBackend:
    kind = param_kind(param)
    if kind not in backends:
        backends[kind] = make_backend(kind, model)
    return backends[kind]


def state_dict_key(name: str) -> str:
    """A parameter name of the wrapped model as the PEFT model names it: the wrapper parts in
    ``targets.WRAPPER_PARTS`` and a leading ``module.`` (DDP, a DeepSpeed engine) are dropped;
    ``base_model.model.`` is kept (``PeftModel.save_pretrained`` expects it)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def gathered_lora_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Every trainable parameter (LoRA A/B, ``modules_to_save``) complete, as CPU copies.

    Keys are the PEFT model's ``named_parameters()`` names (``base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.default.weight``), the form ``PeftModel.save_pretrained(dir, state_dict=...)`` expects;
    values have the parameters' full shapes and storage dtype (bf16 under bf16 training).

    Collective: every rank must call it.  Only trainable parameters move (ZeRO-3: one
    ``GatheredParameters`` over all of them; FSDP: one ``all_gather`` per shard group and dtype).  The
    result is identical on every rank; with ``rank0_only=True`` ranks other than global rank 0 get ``{}``
    (they still take part).
    """
    backends = _backends(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keep = not rank0_only or not _dist_on() or dist.get_rank() == 0
    by_backend: dict[int, tuple[ShardBackend, list[int]]] = {}
    for i, (_, p) in enumerate(named):  # same model on every rank: same groups in the same order
        b = _backend_of(backends, model, p)
        by_backend.setdefault(id(b), (b, []))[1].append(i)
    values: list[Any] = [None] * len(named)
    for b, idx in by_backend.values():
        copies = b.full_copies([named[i][1] for i in idx], keep=keep)
        for i, c in zip(idx, copies or []):
            values[i] = c
    if not keep:
        return {}
    return {state_dict_key(n): v for (n, _), v in zip(named, values)}


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the bytes of every frozen parameter this rank stores, combined over ranks in order.

    Collective under torch.distributed.  Equal before and after training iff no rank's stored base
    weights changed by a single bit (padding excluded: ZeRO-3's holds garbage).  The value depends on
    the world size and sharding, since each rank hashes its own shard: compare fingerprints within a
    run.  Hashes copies: ``Tensor.numpy()`` on a parameter's own storage would make it non-resizable,
    and FSDP frees unsharded storage by resizing it.
    """
    backends = _backends(model)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = _backend_of(backends, model, p).local_storage(p).detach().to("cpu", copy=True)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if not _dist_on() or dist.get_world_size() == 1:
        return digest
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, digest)
    return hashlib.sha256("".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------ the adapter on disk
def _peft_model(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside ``model`` (itself under FSDP2; ``.module`` of an FSDP1 / DDP / DeepSpeed wrapper)."""
    from peft import PeftModel

    m = model
    while not isinstance(m, PeftModel):
        inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module) or inner is m:
            raise TypeError(f"no PeftModel inside {type(model).__name__}; save_adapter needs a PEFT model")
        m = inner
    return m


def _adapter_key(peft_model: nn.Module, key: str, adapter_name: str) -> str:
    """PEFT's checkpoint key for a model key (adapter name removed), through PEFT's own tuner mapping."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_model.peft_config[adapter_name].peft_type]
    strip = getattr(tuner, "_remove_adapter_name_from_key", None)
    return strip(key, adapter_name) if strip is not None else key.replace(f".{adapter_name}.", ".")


def _write_adapter(peft_model: nn.Module, sd: dict[str, torch.Tensor], out_dir: Path, adapter_name: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` the way ``PeftModel.save_pretrained`` does,
    for LoRA keys only (``modules_to_save`` need PEFT's own module walk: refused)."""
    from safetensors.torch import save_file

    other = sorted(k for k in sd if ".lora_" not in k or f".{adapter_name}." not in k)
    if other:
        raise NotImplementedError(
            f"save_adapter under nested FSDP1 units writes LoRA factors only; trainable params {other[:3]} "
            "(modules_to_save?) would need PEFT's save_pretrained, which finds no adapter keys there"
        )
    weights = {_adapter_key(peft_model, k, adapter_name): v.contiguous() for k, v in sd.items()}
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(weights, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter(
    model: nn.Module, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> bool:
    """Save a complete PEFT adapter that ``PeftModel.from_pretrained`` loads; returns whether this rank wrote.

    Collective unless ``state_dict`` (from ``gathered_lora_state_dict``) is given: every rank must call it.
    Global rank 0 writes (``PeftModel.save_pretrained(out_dir, state_dict=...)``), so the adapter is
    complete under ZeRO-3 and FSDP too, where PEFT alone would save this rank's shards or nothing.  Under
    FSDP1 with nested units (transformer auto-wrap) PEFT 0.21 finds no adapter keys — its module names
    carry ``_fsdp_wrapped_module`` in the middle — and would write an *empty* adapter (also through the HF
    Trainer's FULL_STATE_DICT path); there the same two files are written directly, with PEFT's key
    mapping.  Either way the written file is checked to hold every LoRA tensor.
    """
    sd = state_dict if state_dict is not None else gathered_lora_state_dict(model)
    if _dist_on() and dist.get_rank() != 0:
        return False
    peft_model = _peft_model(model)
    out = Path(out_dir)
    nested = any(p in WRAPPER_PARTS for n, _ in peft_model.named_modules() for p in n.split("."))
    if nested:  # PEFT's layout: non-default adapters go to a sub-folder named after them
        _write_adapter(peft_model, sd, out if adapter_name == "default" else out / adapter_name, adapter_name)
    else:
        peft_model.save_pretrained(str(out), state_dict=sd, selected_adapters=[adapter_name])
    _check_written(out, sd, adapter_name)
    return True


def _check_written(out: Path, sd: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Refuse an adapter file that lacks LoRA tensors of ``sd`` (PEFT silently writes empty ones)."""
    from safetensors import safe_open

    want = sum(1 for k in sd if ".lora_" in k and f".{adapter_name}." in k)
    sub = out / adapter_name if adapter_name != "default" else out
    with safe_open(str(sub / "adapter_model.safetensors"), framework="pt") as f:
        got = sum(1 for k in f.keys() if ".lora_" in k)
    if got < want:
        raise RuntimeError(f"PEFT wrote {got} of {want} LoRA tensors to {sub}; the adapter would be incomplete")
