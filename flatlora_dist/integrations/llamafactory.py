"""Flat-LoRA for LLaMA-Factory 0.9.5: ``flatlora-llamafactory train cfg.yaml [key=value ...]``.

LLaMA-Factory has no plugin API on its Trainer path; its ``llamafactory.train.tuner.run_exp(args,
callbacks)`` hands extra callbacks to the Trainer it builds.  This front end does what
``llamafactory-cli train`` does, with a :class:`~flatlora_dist.hf.FlatLoRACallback` in those callbacks:

* The config is the same YAML (or JSON) file, with the same ``key=value`` overrides (OmegaConf's
  dotlist, as ``llamafactory-cli`` reads them).
* The ``flatlora_*`` keys (:data:`CONFIG_KEYS`, :data:`CALLBACK_KEYS`) are taken out before LLaMA-Factory
  sees the config (it would refuse them) and checked one by one with :meth:`FlatLoRAConfig.validate`, so a
  bad value is one :class:`FlatLoRAConfigError` naming the key.  An unknown ``flatlora_*`` key, a
  ``finetuning_type`` other than ``lora``, ``use_dora: true`` and ``stage: ppo`` (its trainer has no
  per-step events) are refused the same way, before anything is loaded.
* With several GPUs (or ``FORCE_TORCHRUN=1``) it relaunches itself under ``torchrun`` with LLaMA-Factory's
  variables (``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``), as
  ``llamafactory-cli`` relaunches its own launcher; a process already under a launcher (``LOCAL_RANK`` set)
  trains directly.

Scripted use, without this command::

    from llamafactory.train.tuner import run_exp
    from flatlora_dist import FlatLoRAConfig
    from flatlora_dist.hf import FlatLoRACallback

    # args: LLaMA-Factory's keys (a dict, as in its YAML), no flatlora_* keys;
    # total_steps defaults to the run's optimizer steps (max_steps, or those of num_train_epochs)
    run_exp(args, callbacks=[FlatLoRACallback(FlatLoRAConfig(sigma=0.05))])

The core package never imports this module; it needs ``llamafactory`` (and its ``omegaconf``) installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import FlatLoRAConfig

PREFIX = "flatlora_"
CONFIG_KEYS: dict[str, str] = {PREFIX + f.name: f.name for f in fields(FlatLoRAConfig)}
"""YAML key -> :class:`FlatLoRAConfig` field (every field: sigma, total_steps, schedule, seed, mode,
skip_nonfinite)."""
CALLBACK_KEYS: dict[str, str] = {"flatlora_skip_nonfinite_steps": "skip_nonfinite_steps"}
"""YAML key -> :class:`FlatLoRACallback` keyword."""
REFUSED_STAGES = ("ppo",)
"""LLaMA-Factory's PPO trainer runs its own loop without ``on_step_begin``: no step would be perturbed."""
USAGE = "usage: flatlora-llamafactory train CONFIG.yaml|CONFIG.json [key=value ...]"


class FlatLoRAConfigError(ValueError):
    """A config this front end refuses; the message names the key and the fix."""


# --------------------------------------------------------------------------------------- the config
def read_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The YAML/JSON file at ``path`` merged with ``key=value`` overrides, as ``llamafactory-cli`` reads it."""
    from omegaconf import OmegaConf

    file = Path(path)
    if file.suffix not in (".yaml", ".yml", ".json"):
        raise FlatLoRAConfigError(f"{path}: expected a .yaml, .yml or .json config file\n{USAGE}")
    if not file.is_file():
        raise FlatLoRAConfigError(f"{path}: no such config file\n{USAGE}")
    try:
        loaded = json.loads(file.read_text()) if file.suffix == ".json" else OmegaConf.load(file.absolute())
        merged = OmegaConf.merge(OmegaConf.create(loaded), OmegaConf.from_cli(overrides))
        config = OmegaConf.to_container(merged)
    except Exception as e:  # YAML/JSON syntax, a malformed key=value: one line naming the file
        raise FlatLoRAConfigError(f"{path} {' '.join(overrides)}: cannot read the config: {e}") from None
    if not isinstance(config, dict):
        raise FlatLoRAConfigError(f"{path}: the config must be a mapping of LLaMA-Factory keys")
    return config


def _as_number(key: str, value: Any, kind: type) -> Any:
    """YAML 1.1 reads ``5e-2`` as a string; HF's parser turns such strings into numbers, so do the same."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise FlatLoRAConfigError(f"{key}: expected a number, got {value!r}") from None
    return value


def flat_config(keys: Mapping[str, Any]) -> FlatLoRAConfig:
    """The :class:`FlatLoRAConfig` of the ``flatlora_*`` keys in ``keys`` (absent or null: the defaults).

    Each key is validated on its own first, so the error names the YAML key and its value."""
    defaults = FlatLoRAConfig()
    values: dict[str, Any] = {}
    for key, name in CONFIG_KEYS.items():
        value = keys.get(key)
        if value is None:
            continue
        default = getattr(defaults, name)
        if name == "sigma":
            value = _as_number(key, value, float)
        elif name in ("total_steps", "seed"):
            value = _as_number(key, value, int)
        try:
            FlatLoRAConfig(**{name: value})
        except ValueError as e:
            raise FlatLoRAConfigError(f"{key}: {e}") from None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise FlatLoRAConfigError(f"{key}: expected true or false, got {value!r}")
        values[name] = value
    return FlatLoRAConfig(**values)


def callback_kwargs(keys: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`FlatLoRACallback` keywords from the ``flatlora_*`` keys that configure the callback."""
    kwargs: dict[str, Any] = {}
    for key, name in CALLBACK_KEYS.items():
        value = keys.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise FlatLoRAConfigError(f"{key}: expected true or false, got {value!r}")
        kwargs[name] = value
    return kwargs


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], FlatLoRAConfig, dict[str, Any]]:
    """``(LLaMA-Factory's args, FlatLoRAConfig, callback keywords)`` from one merged config.

    Invariant: the returned args hold no ``flatlora_*`` key; every ``flatlora_*`` key of ``config`` is known
    and valid, ``finetuning_type`` is ``lora`` (LLaMA-Factory's default when absent) without DoRA, and the
    stage is one whose Trainer runs the per-step callback events."""
    ours = {k: v for k, v in config.items() if k.startswith(PREFIX)}
    unknown = sorted(set(ours) - set(CONFIG_KEYS) - set(CALLBACK_KEYS))
    if unknown:
        raise FlatLoRAConfigError(
            f"unknown Flat-LoRA key(s) {unknown}; valid: {sorted(CONFIG_KEYS) + sorted(CALLBACK_KEYS)}"
        )
    finetuning = config.get("finetuning_type", "lora")
    if finetuning != "lora":
        raise FlatLoRAConfigError(
            f"finetuning_type: {finetuning!r}: Flat-LoRA trains a LoRA adapter; set finetuning_type: lora "
            "(or run llamafactory-cli without Flat-LoRA)"
        )
    if config.get("use_dora"):
        raise FlatLoRAConfigError(
            "use_dora: true: DoRA's weight is not W + s*B*A (Flat-LoRA needs plain LoRA); set use_dora: false"
        )
    stage = config.get("stage", "sft")
    if stage in REFUSED_STAGES:
        raise FlatLoRAConfigError(
            f"stage: {stage!r}: LLaMA-Factory's PPO trainer has no per-step callback events, so Flat-LoRA cannot "
            "drive it; use stage pt, sft, rm, dpo or kto"
        )
    args = {k: v for k, v in config.items() if not k.startswith(PREFIX)}
    return args, flat_config(ours), callback_kwargs(ours)


# --------------------------------------------------------------------------------------- running
def train(config: Mapping[str, Any]) -> Any:
    """Run LLaMA-Factory's training on ``config`` (its keys plus ``flatlora_*``) with Flat-LoRA; returns
    the :class:`FlatLoRACallback` (its ``skipped_steps`` lists steps a NaN/inf gradient skipped)."""
    args, flat, kwargs = split_config(config)
    from llamafactory.train.tuner import run_exp

    from ..hf import FlatLoRACallback

    callback = FlatLoRACallback(flat, **kwargs)
    run_exp(args, callbacks=[callback])
    return callback


def _wants_torchrun() -> bool:
    """Relaunch under torchrun when ``llamafactory-cli train`` would (several devices or FORCE_TORCHRUN),
    unless this process already runs under a launcher."""
    if "LOCAL_RANK" in os.environ:
        return False
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    if is_env_enabled("USE_MCA"):
        os.environ["FORCE_TORCHRUN"] = "1"
    return is_env_enabled("FORCE_TORCHRUN") or (get_device_count() > 1 and not use_ray() and not use_kt())


def torchrun_command(argv: list[str]) -> list[str]:
    """The torchrun command line that runs this module on ``argv`` once per device (LLaMA-Factory's env)."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    env = os.environ.get
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", env("NNODES", "1"), "--node_rank", env("NODE_RANK", "0"),
        "--nproc_per_node", env("NPROC_PER_NODE", str(get_device_count())),
        "--master_addr", env("MASTER_ADDR", "127.0.0.1"),
        "--master_port", env("MASTER_PORT", str(find_available_port())),
        "-m", __name__, *argv,
    ]  # fmt: skip


def torchrun_env() -> dict[str, str]:
    """This process's environment plus what ``llamafactory-cli`` sets for its ranks (``OPTIM_TORCH``,
    on by default: expandable CUDA segments, NCCL without record streams)."""
    from llamafactory.extras.misc import is_env_enabled

    env = dict(os.environ)
    if is_env_enabled("OPTIM_TORCH", "1"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    """``flatlora-llamafactory train CONFIG [key=value ...]``: 0 on success, 2 on a refused config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "train":
        print(
            USAGE + "\n(other llamafactory-cli commands need no Flat-LoRA: run llamafactory-cli)",
            file=sys.stderr,
        )
        return 2
    try:
        config = read_config(argv[1], argv[2:])
        split_config(config)  # refuse a bad config before a relaunch or a model load
    except FlatLoRAConfigError as e:
        print(f"flatlora-llamafactory: {e}", file=sys.stderr)
        return 2
    if _wants_torchrun():
        return subprocess.run(torchrun_command(argv), env=torchrun_env(), check=False).returncode
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
