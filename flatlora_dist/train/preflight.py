"""The preflight: every check that needs no model, data tokenization or process group, in the order a
user fixes them (settings, files, the model folder, the output folder, then the names only transformers
knows), and the run's facts settled once as a :class:`~.plan.RunPlan`.  Raises before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .loggers import check_report_to
from .outputs import RUN_ARTIFACTS, RUN_CONFIG, checkpoints, last_complete_checkpoint
from .plan import RunPlan
from .runtime import AlreadyFinished, RunError, world_size

# Settings that must not change when a run is resumed (else the resumed run is a different run).
RESUME_KEYS = ("model", "task", "data", "data_format", "max_length", "packing", "train_limit", "sigma",
               "val_size", "flat_schedule", "flat_mode", "flat_seed", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "max_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "seed",
               "bf16", "fp16", "load_in_4bit")  # fmt: skip


def shipped_ds_configs() -> dict[str, Path]:
    """Name -> file of the DeepSpeed configs shipped inside the package (``flatlora_dist/ds_configs``, package
    data; a checkout's top-level ``ds_configs/`` links there), so an installed package has them too."""
    folder = resources.files("flatlora_dist").joinpath("ds_configs")
    return {f.name.removesuffix(".json"): Path(str(f)) for f in folder.iterdir() if f.name.endswith(".json")}


def resolve_ds_config(value: str) -> Path:
    """``--ds_config``'s file: an existing path as given, else a shipped config by bare name (``zero3`` or
    ``zero3.json``).  Invariant: what it returns is an existing file; otherwise one-line RunError listing
    the shipped names."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    shipped = shipped_ds_configs()
    names = ", ".join(sorted(shipped))
    if "/" not in value and os.sep not in value:
        if value.removesuffix(".json") in shipped:
            return shipped[value.removesuffix(".json")]
        raise RunError(f"--ds_config {value!r} is neither a file nor a shipped DeepSpeed config; "
                       f"use one of {names} or the path of a JSON file")  # fmt: skip
    raise RunError(f"DeepSpeed config not found: {value} (give a JSON file's path, or a shipped config by name: {names})")


def load_ds_config(value: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (:func:`resolve_ds_config`: a path or a shipped name); one-line errors
    for a missing or malformed file."""
    p = resolve_ds_config(value)
    path = str(p)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: a DeepSpeed config must be a JSON object")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise RunError(f"{path}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RunError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return cfg


def check_ds_batch(cfg: TrainConfig, ds: dict[str, Any], path: str) -> None:
    """Explicit DeepSpeed batch sizes must match the run's (HF would fail much later, after loading)."""
    micro, gas, ws = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world_size()
    expected = {"train_micro_batch_size_per_gpu": (micro, f"per_device_train_batch_size {micro}"),
                "gradient_accumulation_steps": (gas, f"gradient_accumulation_steps {gas}"),
                "train_batch_size": (micro * gas * ws, f"per_device_train_batch_size {micro} x "
                                     f"gradient_accumulation_steps {gas} x world size {ws} = {micro * gas * ws}")}  # fmt: skip
    for key, (want, why) in expected.items():
        got = ds.get(key, "auto")
        if got in ("auto", None):
            continue
        if isinstance(got, bool) or not isinstance(got, int) or got != want:
            raise RunError(f'{path}: {key} is {got!r} but this run has {why}; set it to {want} or "auto"')


def check_data(cfg: TrainConfig) -> None:
    """The data checks (no tokenizer needed): each source exists (a file, a folder or a Hub dataset ID)
    and is readable here, every record the run will read parses in the format given or detected, and
    ``--val_size`` holds out at least one record and leaves at least one."""
    from .records import needs_datasets, require_datasets, source_kind
    from .sources import check_run_data

    for label, path in (("--data", cfg.data), ("--eval_data", cfg.eval_data)):
        if not path:
            continue
        kind = source_kind(path)
        if kind == "missing":
            raise RunError(f"{label} file not found: {path}")
        if needs_datasets(kind):
            require_datasets(f"{label} {path}", kind)
    check_run_data(cfg)


def check_writable(out: Path) -> None:
    """``out`` (or the nearest folder above it that exists, where it would be created) accepts a new
    file: probed by creating and removing a hidden temporary file (permission bits say nothing for root,
    read-only mounts or /proc).  Leaves nothing behind; creates no folder."""
    where = out.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise RunError(f"--output_dir {out}: {where} is a file, not a folder; choose another --output_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".flatlora-write-test-", dir=where)
    except OSError as e:
        raise RunError(f"--output_dir {out}: cannot create files in {where} ({e.strerror}); "
                       "choose a writable --output_dir") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)


def check_output_dir(cfg: TrainConfig, noise_scheme: str | None = None) -> Path | None:
    """Refuse to mix runs; returns the checkpoint to resume from (``None``: start fresh).  Raises
    :class:`AlreadyFinished` for ``--resume`` of a finished run (``summary.json`` is written last).
    ``noise_scheme``: see :func:`check_resume_noise`."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} exists and is not a folder")
    check_writable(out)
    holds_run = out.is_dir() and (any((out / a).exists() for a in RUN_ARTIFACTS) or bool(checkpoints(out)))
    if cfg.resume:
        if (out / "summary.json").is_file():
            raise AlreadyFinished(f"{out} holds a finished run (summary.json); nothing to resume. "
                                  "Use --overwrite to train it again, or another --output_dir")  # fmt: skip
        ckpt = last_complete_checkpoint(out) if out.is_dir() else None
        if ckpt is not None:
            _check_resume_config(out, cfg)
            check_resume_noise(ckpt, cfg, noise_scheme)
        return ckpt
    if holds_run and not cfg.overwrite:
        raise RunError(f"--output_dir {out} already holds a run; pass --resume to continue it, "
                       "--overwrite to replace it, or choose another --output_dir")  # fmt: skip
    return None


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    saved_path = out / RUN_CONFIG
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise RunError(
            f"--resume with changed settings ({diffs}); resume with the original settings or use --overwrite"
        )


def check_scheduler(cfg: TrainConfig) -> None:
    """``--lr_scheduler_type``: a name transformers knows (``SchedulerType``) that it can build with the
    settings this app passes (no ``lr_scheduler_kwargs``), with the evaluation some schedulers need."""
    import difflib

    from transformers import SchedulerType, get_scheduler

    names = [s.value for s in SchedulerType]
    name = cfg.lr_scheduler_type
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RunError(f"--lr_scheduler_type {name!r} is not a transformers scheduler; {hint}choose one of "
                       f"{', '.join(names)}")  # fmt: skip
    if name in ("reduce_lr_on_plateau", "greedy") and not cfg.eval_steps:
        raise RunError(f"--lr_scheduler_type {name} steps on held-out loss: set --eval_steps N (> 0) too")
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, probe, num_warmup_steps=1, num_training_steps=2)
    except (TypeError, ValueError) as e:
        raise RunError(f"--lr_scheduler_type {name} needs scheduler settings this app does not pass ({e}); "
                       "use e.g. cosine, linear or constant_with_warmup") from None  # fmt: skip


def check_attention(cfg: TrainConfig) -> None:
    """``--attn_implementation``: one transformers accepts by name; a flash-attention kernel only where it
    can run here (CUDA and its package importable: an explicit request is not silently replaced)."""
    name = cfg.attn_implementation
    if name in (None, "auto"):
        return
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    accepted = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in accepted:
        raise RunError(f"--attn_implementation {name!r} is not one transformers accepts; choose one of "
                       f"{', '.join(accepted)} (or leave it unset)")  # fmt: skip
    version = name.removeprefix("flash_attention_")
    if version.isdigit() and not (torch.cuda.is_available()
                                  and FLASH_ATTENTION_COMPATIBILITY_MATRIX[int(version)]["general_availability_check"]()):  # fmt: skip
        raise RunError(f"--attn_implementation {name} needs CUDA and its flash-attention package, which this "
                       "machine lacks; use sdpa or eager (or leave it unset)")  # fmt: skip


def zero_stage(ds: dict[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without one)."""
    return ds.get("zero_optimization", {}).get("stage", 0) if ds else 0


def run_noise_scheme(ds: dict[str, Any] | None) -> str:
    """The noise scheme this run's engine will pick, as its state records it (``kernels.scheme_id`` of
    ``kernels.scheme_for`` of where the base weights are stored: CPU without CUDA or under ZeRO-3
    ``offload_param`` to CPU, else CUDA); ``ds``: the run's DeepSpeed config as read (``None`` without
    DeepSpeed)."""
    from ..kernels import scheme_for, scheme_id

    on_cpu = not torch.cuda.is_available()
    if ds is not None and not on_cpu:
        offload = ds.get("zero_optimization", {}).get("offload_param") or {}
        on_cpu = isinstance(offload, dict) and offload.get("device") == "cpu"
    return scheme_id(scheme_for("cpu" if on_cpu else "cuda"))


def _noise_scheme_of(cfg: TrainConfig) -> str:
    """:func:`run_noise_scheme` for a caller holding only the settings (the config is read only where it
    can matter: with CUDA)."""
    ds = load_ds_config(cfg.ds_config) if cfg.ds_config and torch.cuda.is_available() else None
    return run_noise_scheme(ds)


def check_resume_noise(ckpt: Path, cfg: TrainConfig, noise_scheme: str | None = None) -> None:
    """Refuse a resume whose noise would differ from the checkpoint's (its ``flatlora_state.json``):
    sigma, the effective noise seed, the schedule or the noise scheme (``noise_scheme``: the run's, as the
    preflight settled it; ``None``: worked out from ``cfg``).  No state file: nothing to check (the saved
    run had sigma 0, or predates the file; ``run_config.json`` is checked separately)."""
    from ..hf import STATE_FILE

    path = ckpt / STATE_FILE
    if not path.is_file():
        return
    try:
        state = json.loads(path.read_text())
        saved = state["config"]
        was = {"sigma": saved["sigma"], "flat_seed": saved["seed"], "flat_schedule": saved["schedule"],
               "noise scheme": state.get("noise_scheme", "blocks")}  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is not a Flat-LoRA state file ({e}); resume from another checkpoint or use --overwrite") from e
    now = cfg.flat_config()
    asked = {"sigma": cfg.sigma, "flat_seed": now.seed, "flat_schedule": now.schedule, "noise scheme": noise_scheme or _noise_scheme_of(cfg)}
    changed = [k for k in was if was[k] != asked[k]]
    if changed:
        diffs = ", ".join(f"{k}: {was[k]!r} -> {asked[k]!r}" for k in changed)
        raise RunError(f"--resume would draw other Flat-LoRA noise than {ckpt.name} ({diffs}); "
                       "resume with the original noise settings or use --overwrite")  # fmt: skip


def preflight(cfg: TrainConfig) -> RunPlan:
    """Every check that needs no model, data tokenization or process group: settings, files, the model
    folder, the output folder (writable, not holding another run), then the names only transformers
    knows (scheduler, attention, loggers), and last the FSDP kind (``--fsdp`` against the launcher's config).
    Raises before anything is written; returns the run's facts, settled once.  A Hub model not yet in
    the Hugging Face cache is downloaded last, once every other check has passed (by every process of a
    launch: ``huggingface_hub``'s file locks make it one download)."""
    from .model_sources import check_model_source, is_hub_id, model_folder

    ds = load_ds_config(cfg.ds_config) if cfg.ds_config else None
    if ds is not None:
        check_ds_batch(cfg, ds, cfg.ds_config)
    check_data(cfg)
    if cfg.data is None and cfg.task not in ("math", "sentiment"):
        raise RunError(f"--task must be 'math' or 'sentiment' (or give --data FILE.jsonl), got {cfg.task!r}")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RunError("--load_in_4bit needs bitsandbytes: pip install 'flatlora_dist[qlora]'")
    from .fsdp_args import fsdp_from_env, fsdp_kind

    stage = zero_stage(ds)
    fsdp = cfg.fsdp or fsdp_from_env()  # --fsdp, or an accelerate launch FSDP config
    if cfg.load_in_4bit and (fsdp or stage == 3):
        raise RunError("--load_in_4bit with ZeRO-3 or FSDP is not supported by Flat-LoRA (4-bit bases cannot be "
                       "sharded and perturbed); use QLoRA single-process/DDP/ZeRO-2, or a bf16 base with ZeRO-3/FSDP")  # fmt: skip
    if cfg.merge and (cfg.ds_config or fsdp or world_size() > 1):
        raise RunError("--merge writes a merged model from a single process; run without DeepSpeed/FSDP "
                       "(or merge the saved adapter afterwards)")  # fmt: skip
    if cfg.merge and cfg.load_in_4bit:
        raise RunError(
            "--merge is not supported with --load_in_4bit (merging into 4-bit weights loses precision)"
        )
    check_model_source(cfg.model, trust_remote_code=cfg.trust_remote_code)  # offline: a Hub ID must be cached
    scheme = run_noise_scheme(ds)
    resume_from = check_output_dir(cfg, scheme)
    check_scheduler(cfg)
    check_attention(cfg)
    check_report_to(cfg.report_to)
    kind = cfg.fsdp if cfg.ds_config else fsdp_kind(cfg)  # refuses a contradiction or a launcher-less FSDP
    if is_hub_id(cfg.model):
        model_folder(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return RunPlan(resume_from=resume_from, ds=ds, fsdp=kind, zero_stage=stage, noise_scheme=scheme)


