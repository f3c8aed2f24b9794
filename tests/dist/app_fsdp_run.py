"""``launch/train.py`` with a recorder: what the HF Trainer actually built under ``--fsdp`` / an accelerate FSDP config.

Runs the application's ``main`` unchanged; at ``on_train_end`` (wrapped model still there, Flat-LoRA engine
alive) every rank writes ``$APP_FSDP_RECORD/rank<r>.json``: the process group, how the model is wrapped
(FSDP2 ``fully_shard`` units / FSDP1 ``FullyShardedDataParallel`` units, LoRA layers as their own units),
the mesh of a base weight, the Flat-LoRA backend and the size of its norm-reduction group, and what
accelerate's state says.  Used by ``tests/test_fsdp_app.py`` under torchrun and accelerate launch.  With
``APP_INJECT`` set (JSON, see ``app_inject.py``) the per-step recorder of ``app_run.py`` is installed too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch.distributed as dist  # noqa: E402

from flatlora_dist.hf import FlatLoRACallback  # noqa: E402
from flatlora_dist.train.run import main  # noqa: E402


def facts(model, flat) -> dict:
    from accelerate.state import AcceleratorState
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fsdp2 = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    fsdp1 = [m for m in model.modules() if isinstance(m, FSDP)]
    lora_units = sum(1 for n, m in model.named_modules()
                     if isinstance(m, (FSDP, FSDPModule)) and (".lora_A." in n or ".lora_B." in n))  # fmt: skip
    target = flat.targets[0]
    w = target.base.weight
    backend = flat._backend_of[id(target)]
    group = backend.reduce_group()
    state = AcceleratorState()
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "dist_backend": str(dist.get_backend()),
        "fsdp2_units": len(fsdp2),
        "fsdp1_units": len(fsdp1),
        "lora_units": lora_units,
        "weight_type": type(w).__name__,
        "mesh_shape": list(w.device_mesh.shape) if type(w).__name__ == "DTensor" else None,
        "backend": backend.name,
        "reduce_group_size": None if group is None else dist.get_world_size(group),
        "accelerate_distributed_type": str(state.distributed_type),
        "fsdp_version": getattr(state.fsdp_plugin, "fsdp_version", None),
        "state_dict_type": str(getattr(state.fsdp_plugin, "state_dict_type", None)),
        "stats": flat.stats(),
    }


def install(record_dir: str) -> None:
    original = FlatLoRACallback.on_train_end

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.flat is not None and model is not None:
            out = Path(record_dir) / f"rank{dist.get_rank()}.json"
            out.write_text(json.dumps(facts(model, self.flat), default=str))
        return original(self, args, state, control, model=model, **kwargs)

    FlatLoRACallback.on_train_end = on_train_end


if __name__ == "__main__":
    hooks = []
    if os.environ.get("APP_INJECT"):
        import app_inject

        hooks.append(app_inject.hook(json.loads(os.environ["APP_INJECT"])))
    if os.environ.get("APP_FSDP_RECORD"):
        Path(os.environ["APP_FSDP_RECORD"]).mkdir(parents=True, exist_ok=True)
        install(os.environ["APP_FSDP_RECORD"])
    sys.exit(main(sys.argv[1:], extra_callbacks=hooks))
