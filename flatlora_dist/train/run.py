"""The training application: HF Trainer + FlatLoRACallback, under plain python, DeepSpeed or FSDP.

``launch/train.py`` calls :func:`main`.  Order of work: validate everything cheap (config, output
directory, DeepSpeed config, data files, optional packages) before distributed start-up, model
loading or data tokenization; then evaluate, train, evaluate, save a complete PEFT adapter and
write ``summary.json`` and ``curves.png``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import FlatLoRAConfig
from .config import ConfigError, TrainConfig, parse_args
from .report import frozen_fingerprint, gather_per_rank, peak_memory_mb, plot_curves, write_json_atomic

logger = logging.getLogger("flatlora_dist.train")

COMPLETE_MARKER = "COMPLETE"
RUN_CONFIG = "run_config.json"
RUN_ARTIFACTS = ("summary.json", "curves.png", RUN_CONFIG, "adapter", "merged", "tensorboard")
# Settings that must not change when a run is resumed (else the resumed run is a different run).
RESUME_KEYS = ("model", "task", "data", "data_format", "max_length", "packing", "train_limit", "sigma",
               "flat_schedule", "flat_mode", "flat_seed", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "max_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "seed",
               "bf16", "fp16", "load_in_4bit")  # fmt: skip


class RunError(ValueError):
    """A problem with the requested run; the message is one line naming it and the fix."""


# ------------------------------------------------------------------------------------ small helpers
def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker was written after every rank finished saving."""
    done = [p for p in checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()]
    return done[-1] if done else None


# ------------------------------------------------------------------------------------ preflight
def load_ds_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise RunError(
            f"DeepSpeed config not found: {path} (ship one from ds_configs/, e.g. ds_configs/zero3.json)"
        )
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


def check_output_dir(cfg: TrainConfig) -> Path | None:
    """Refuse to mix runs; returns the checkpoint to resume from (``None``: start fresh)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} exists and is not a folder")
    holds_run = out.is_dir() and (any((out / a).exists() for a in RUN_ARTIFACTS) or bool(checkpoints(out)))
    if cfg.resume:
        ckpt = last_complete_checkpoint(out) if out.is_dir() else None
        if ckpt is not None:
            _check_resume_config(out, cfg)
        elif holds_run and not checkpoints(out) and (out / "summary.json").exists():
            raise RunError(
                f"{out} holds a finished run with no checkpoint to resume; use --overwrite or another --output_dir"
            )
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


def preflight(cfg: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """Every check that needs no model, data tokenization or process group."""
    ds = load_ds_config(cfg.ds_config) if cfg.ds_config else None
    for label, path in (("--data", cfg.data), ("--eval_data", cfg.eval_data)):
        if path and not Path(path).exists():
            raise RunError(f"{label} file not found: {path}")
    if cfg.data is None and cfg.task not in ("math", "sentiment"):
        raise RunError(f"--task must be 'math' or 'sentiment' (or give --data FILE.jsonl), got {cfg.task!r}")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RunError("--load_in_4bit needs bitsandbytes: pip install 'flatlora_dist[qlora]'")
    if cfg.load_in_4bit and (cfg.fsdp or (ds and ds.get("zero_optimization", {}).get("stage", 0) == 3)):
        raise RunError("--load_in_4bit with ZeRO-3 or FSDP is not supported by Flat-LoRA (4-bit bases cannot be "
                       "sharded and perturbed); use QLoRA single-process/DDP/ZeRO-2, or a bf16 base with ZeRO-3/FSDP")  # fmt: skip
    if cfg.merge and (cfg.ds_config or cfg.fsdp or world_size() > 1):
        raise RunError("--merge writes a merged model from a single process; run without DeepSpeed/FSDP "
                       "(or merge the saved adapter afterwards)")  # fmt: skip
    if cfg.merge and cfg.load_in_4bit:
        raise RunError(
            "--merge is not supported with --load_in_4bit (merging into 4-bit weights loses precision)"
        )
    return check_output_dir(cfg), ds


# ------------------------------------------------------------------------------------ set-up
def init_distributed(cfg: TrainConfig) -> None:
    """Start the process group the launcher asked for (DeepSpeed needs it before TrainingArguments)."""
    if not cfg.ds_config or (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def prepare_output_dir(cfg: TrainConfig, resume_from: Path | None) -> None:
    """Rank 0: clear a replaced run, set aside incomplete checkpoints, record the run's settings."""
    out = Path(cfg.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            for name in RUN_ARTIFACTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            for ckpt in checkpoints(out):
                shutil.rmtree(ckpt)
        newest = int(resume_from.name.split("-")[-1]) if resume_from is not None else -1
        for ckpt in checkpoints(out):
            if not (ckpt / COMPLETE_MARKER).is_file() or int(ckpt.name.split("-")[-1]) > newest:
                ckpt.rename(ckpt.with_name(f"{ckpt.name}.incomplete-{int(time.time())}"))
        write_json_atomic(out / RUN_CONFIG, cfg.to_dict())
    barrier()


def flat_config(cfg: TrainConfig) -> FlatLoRAConfig:
    return FlatLoRAConfig(sigma=cfg.sigma, schedule=cfg.flat_schedule, mode=cfg.flat_mode,
                          seed=cfg.seed if cfg.flat_seed is None else cfg.flat_seed)  # fmt: skip


def training_arguments(cfg: TrainConfig, ds: dict[str, Any] | None):
    from transformers import TrainingArguments

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg.output_dir) / "tensorboard"))
    kwargs: dict[str, Any] = {}
    if cfg.fsdp:
        from .fsdp_args import fsdp_training_kwargs

        kwargs.update(fsdp_training_kwargs(cfg))
    return TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        deepspeed=ds,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        **kwargs,
    )


def build_callbacks(trainer, cfg: TrainConfig):
    from transformers import TrainerCallback

    from ..hf import FlatLoRACallback

    class CheckpointGuard(TrainerCallback):
        """Marks a checkpoint COMPLETE only after every rank has written its part."""

        def on_save(self, args, state, control, **kwargs):
            barrier()
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if is_main() and ckpt.is_dir():
                marker = ckpt / COMPLETE_MARKER
                with open(marker, "w") as f:
                    f.write(f"step {state.global_step}\n")
                    f.flush()
                    os.fsync(f.fileno())
            barrier()

    flat = FlatLoRACallback.attach(trainer, flat_config(cfg)) if cfg.sigma > 0 else None
    trainer.add_callback(CheckpointGuard())
    return flat


# ------------------------------------------------------------------------------------ evaluation
def _accuracy(cfg: TrainConfig, model, tokenizer, heldout, extra: dict[str, Any]) -> dict[str, float]:
    """Accuracy metrics of the built-in tasks (generation for math, log-probs for sentiment)."""
    from . import evaluate

    n = cfg.eval_generate_limit
    metrics: dict[str, float] = {}
    if not n or heldout is None:
        return metrics
    if heldout.kind == "math":
        metrics["math_accuracy"] = evaluate.math_accuracy(model, tokenizer, heldout.examples[:n],
                                                          max_new_tokens=cfg.max_new_tokens)["accuracy"]  # fmt: skip
    elif heldout.kind == "sentiment":
        metrics["sentiment_accuracy"] = evaluate.sentiment_accuracy(model, tokenizer, heldout.examples[:n])[
            "accuracy"
        ]
        for name, data in extra.items():
            metrics[f"sentiment_accuracy_{name}"] = evaluate.sentiment_accuracy(
                model, tokenizer, data.examples[:n]
            )["accuracy"]
    return metrics


def evaluate_all(cfg: TrainConfig, model, tokenizer, heldout, extra: dict[str, Any], accuracy: bool = True):
    """Held-out loss (and, if asked, accuracy).  Every rank runs the same work in lockstep."""
    from . import evaluate

    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        if heldout is not None:
            metrics["eval_loss"] = evaluate.heldout_loss(model, heldout.dataset, heldout.collator,
                                                         cfg.per_device_eval_batch_size)  # fmt: skip
        if accuracy:
            metrics.update(_accuracy(cfg, model, tokenizer, heldout, extra))
    finally:
        model.train(was_training)
    return metrics


def sharded(cfg: TrainConfig, ds: dict[str, Any] | None) -> bool:
    """Whether parameters are partitioned across ranks (ZeRO-3 or FSDP)."""
    return bool(cfg.fsdp) or bool(ds and ds.get("zero_optimization", {}).get("stage", 0) == 3)


def rank0_accuracy(cfg: TrainConfig, adapter_dir: Path, heldout, extra) -> tuple[dict, dict]:
    """Before/after accuracy from an unsharded copy on rank 0 (others wait at a barrier).

    Token-by-token generation through ZeRO-3/FSDP gathers every layer for every new token; one plain
    copy of base + saved adapter is far cheaper whenever the model fits one device.  "Before" is the
    base model with the adapter disabled, which is what LoRA's zero-initialised B starts from.
    """
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if is_main() and cfg.eval_generate_limit and heldout is not None:
        from peft import PeftModel
        from transformers.integrations import deepspeed as hf_ds

        from .model import load_model

        saved = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds.unset_hf_deepspeed_config()  # a plain load, not ZeRO-3 partitioned, on this rank alone
        try:
            base, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                         attn_implementation=cfg.attn_implementation,
                                         trust_remote_code=cfg.trust_remote_code)  # fmt: skip
            if torch.cuda.is_available():
                base = base.to(f"cuda:{torch.cuda.current_device()}")
            model = PeftModel.from_pretrained(base, str(adapter_dir))
            model.eval()
            with model.disable_adapter():
                before = _accuracy(cfg, model, tokenizer, heldout, extra)
            after = _accuracy(cfg, model, tokenizer, heldout, extra)
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved
    barrier()
    return before, after


def load_data(cfg: TrainConfig, tokenizer):
    """(train, held-out, out-of-domain sets) as TaskData."""
    from .data import load_task

    common = dict(max_length=cfg.max_length, seed=cfg.seed)
    source = cfg.data or cfg.task
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    train = load_task(
        source, tokenizer, "train", packing=cfg.packing, limit=cfg.train_limit, fmt=fmt, **common
    )
    extra = {}
    if cfg.eval_data:
        heldout = load_task(cfg.eval_data, tokenizer, "test", limit=cfg.eval_limit, fmt=fmt, **common)
    elif cfg.data:
        heldout = None
    else:
        heldout = load_task(cfg.task, tokenizer, "test", limit=cfg.eval_limit, **common)
        if cfg.task == "sentiment":
            extra = {"amazon": load_task("sentiment", tokenizer, "amazon", limit=cfg.eval_limit, **common)}
    return train, heldout, extra


def save_adapter(cfg: TrainConfig, model, target: Path) -> None:
    """A complete PEFT adapter, also under ZeRO-3 / FSDP (LoRA weights gathered first)."""
    state = None
    first = next(p for p in model.parameters() if p.requires_grad)
    if hasattr(first, "ds_id"):
        from ..shards.deepspeed import gathered_lora_state_dict

        state = gathered_lora_state_dict(model)
    elif cfg.fsdp:
        from ..shards.fsdp import gathered_lora_state_dict

        state = gathered_lora_state_dict(model)
    if is_main():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    barrier()


# ------------------------------------------------------------------------------------ the run
def run(cfg: TrainConfig) -> dict[str, Any]:
    t0 = time.time()
    resume_from, ds = preflight(cfg)
    init_distributed(cfg)
    prepare_output_dir(cfg, resume_from)

    from transformers import Trainer, set_seed

    from .model import apply_lora, load_model

    set_seed(cfg.seed)
    targets = cfg.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    args = training_arguments(cfg, ds)  # before the model: HF's ZeRO-3 init hooks need it
    model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                  load_in_4bit=cfg.load_in_4bit, attn_implementation=cfg.attn_implementation,
                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                  trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    model = apply_lora(
        model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets
    )
    train, heldout, extra = load_data(cfg, tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train.dataset, data_collator=train.collator,
                      eval_dataset=heldout.dataset if heldout is not None and cfg.eval_steps else None)  # fmt: skip
    flat_cb = build_callbacks(trainer, cfg)
    before: dict[str, Any] = {}

    from transformers import TrainerCallback

    class Before(TrainerCallback):
        """Held-out metrics and base fingerprint once the model is wrapped, before the first step."""

        def on_train_begin(self, args, state, control, **kwargs):
            before["fingerprint"] = frozen_fingerprint(trainer.model)
            if resume_from is None:
                before["metrics"] = evaluate_all(
                    cfg, trainer.model, tokenizer, heldout, extra, not split_eval
                )

    split_eval = sharded(cfg, ds)  # accuracy then comes from one unsharded copy on rank 0
    trainer.add_callback(Before())
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    after_metrics = evaluate_all(cfg, trainer.model, tokenizer, heldout, extra, not split_eval)
    fingerprint_after = frozen_fingerprint(trainer.model)
    out = Path(cfg.output_dir)
    save_adapter(cfg, trainer.model, out / "adapter")
    if split_eval:
        acc_before, acc_after = gather_per_rank(rank0_accuracy(cfg, out / "adapter", heldout, extra))[0]
        if before.get("metrics") is not None:
            before["metrics"].update(acc_before)
        after_metrics.update(acc_after)
    peaks = gather_per_rank(peak_memory_mb())
    summary = {
        "model": cfg.model,
        "task": cfg.data or cfg.task,
        "sigma": cfg.sigma,
        "world_size": world_size(),
        "backend": "deepspeed" if ds else (cfg.fsdp or "single"),
        "resumed_from": str(resume_from) if resume_from else None,
        "steps": trainer.state.global_step,
        "metrics_before": before.get("metrics"),
        "metrics_after": after_metrics,
        "train_loss": result.training_loss,
        "base_fingerprint_before": before.get("fingerprint"),
        "base_fingerprint_after": fingerprint_after,
        "base_weights_unchanged": before.get("fingerprint") == fingerprint_after,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": trainer.state.num_input_tokens_seen
        / max(result.metrics.get("train_runtime", 1e-9), 1e-9),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "peak_memory_mb_per_rank": peaks,
        "wall_time_s": time.time() - t0,
        "flatlora": flat_cb.flat.stats() if flat_cb is not None and flat_cb.flat is not None else None,
        "data": {"train": train.stats, "heldout": heldout.stats if heldout is not None else None},
    }
    if cfg.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(out / "merged"), safe_serialization=True)
        tokenizer.save_pretrained(str(out / "merged"))
    if is_main():
        write_json_atomic(out / "summary.json", summary)
        plot_curves(trainer.state.log_history, out / "curves.png", f"{cfg.model} sigma={cfg.sigma}")
        print(f"done: {out / 'summary.json'}  before={summary['metrics_before']}  after={after_metrics}")
    barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line (exit 2), never a traceback."""
    from .data import DataError
    from .model import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(parse_args(argv))
    except (ConfigError, RunError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
