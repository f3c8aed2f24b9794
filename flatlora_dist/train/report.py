"""What a run leaves behind for people: summary.json, curves.png (the base fingerprint is the library's:
``flatlora_dist.checkpoint.base_fingerprint``)."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .runtime import dist_on


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else the resident-set high-water mark."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_per_rank(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a one-element list without torch.distributed)."""
    if not dist_on():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, in nested dicts, lists and
    tuples: what strict JSON (RFC 8259, ``json.dumps(allow_nan=False)``) can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write strict JSON (non-finite numbers as ``null``) via a temporary file and rename, so readers
    never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(strict_json_value(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_curves(log_history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Train loss and eval loss against optimizer step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
