"""The training application: HF Trainer + FlatLoRACallback, under plain python, DeepSpeed or FSDP.

``launch/train.py`` calls :func:`main`.  Order of work: validate everything cheap (config, model
folder, output directory and its writability, DeepSpeed config and its batch sizes, data files and
their records, optional packages, scheduler and attention names) before distributed start-up, model
loading or data tokenization; check the LoRA target modules against the loaded model; touch the output
directory only once model and data have loaded (and undo that if the run fails before its first
step); then evaluate, train, save a complete PEFT adapter, evaluate (a SIGTERM stops this final
evaluation between batches: exit 143, adapter and summary written) and write ``summary.json`` and
``curves.png``.  ``--resume`` of a finished run (``summary.json`` present) does nothing and exits 0.

Reliability (issue 8):

* **Checkpoints** ``checkpoint-N`` get a ``COMPLETE`` marker after every rank has written its part;
  ``--resume`` loads only the newest complete one and sets every other newer or unmarked folder aside
  (``incomplete-checkpoint-N-<time>``: a name neither resume nor HF's rotation looks at).
  ``--save_total_limit`` is applied here, only to complete checkpoints and only once the new one is
  marked (HF's own rotation would delete the last complete checkpoint before the new one is).
  Checkpoints and saves never see perturbed base weights: a save requested while Flat-LoRA noise is
  in the weights restores them first and re-applies the same (deterministic) noise afterwards.
* **SIGTERM** (scheduler pre-emption, ``scancel``, the DeepSpeed launcher forwarding its own
  SIGTERM): the handler only sets a flag; at the end of the current optimizer step all ranks agree
  on it (one all-reduce), write a complete checkpoint and stop.  The process then exits with
  **143** (128 + SIGTERM) without final evaluation, adapter or summary: "stopped cleanly, not
  finished; rerun with --resume".  Under the ``deepspeed`` launcher, signal the process group (as
  Slurm and ``kill -TERM -<pgid>`` do) or ``deepspeed.launcher.launch`` (which forwards SIGTERM to
  the ranks and waits 30 s): the ``deepspeed`` command itself dies on SIGTERM and leaves the ranks
  running.
* **Non-finite loss or gradients**: the step's update is skipped (no optimizer or LR-scheduler step;
  the step still counts, so the noise schedule and data order go on), with a warning and the step
  listed in ``summary.json`` (``skipped_steps``).  All of it is :class:`flatlora_dist.hf.FlatLoRACallback`'s
  public behaviour (an optimizer step pre-hook: noise out before the real update in every setup, a
  non-finite gradient on any rank drops the update and the LR scheduler is rewound; DeepSpeed's own
  overflow skips are read from accelerate's ``step_was_skipped``); the app only adds the loss value
  to the warning and carries the list across resumes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import base_fingerprint
from .config import ConfigError, TrainConfig, parse_args
from .report import gather_per_rank, peak_memory_mb, plot_curves, write_json_atomic

logger = logging.getLogger("flatlora_dist.train")

COMPLETE_MARKER = "COMPLETE"
STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # 143: stopped on SIGTERM with a complete checkpoint
RUN_CONFIG = "run_config.json"
RUN_STATE = "run_state.json"  # in each checkpoint: what the Trainer's own state does not carry
RUN_ARTIFACTS = ("summary.json", "curves.png", RUN_CONFIG, "adapter", "merged", "tensorboard")
# Settings that must not change when a run is resumed (else the resumed run is a different run).
RESUME_KEYS = ("model", "task", "data", "data_format", "max_length", "packing", "train_limit", "sigma",
               "flat_schedule", "flat_mode", "flat_seed", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "max_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "seed",
               "bf16", "fp16", "load_in_4bit")  # fmt: skip


class RunError(ValueError):
    """A problem with the requested run; the message is one line naming it and the fix."""


class AlreadyFinished(Exception):
    """``--resume`` of a run that has finished: nothing to do (exit 0, nothing touched)."""




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


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (never the newest); marker first, so a
    deletion cut short leaves an unmarked folder, never a marked partial one."""
    if not limit or limit <= 0:
        return
    done = [p for p in checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()]
    for old in done[:-limit]:
        (old / COMPLETE_MARKER).unlink()
        shutil.rmtree(old, ignore_errors=True)


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


def check_data_file(label: str, path: str, split: str, fmt: str, limit: int | None) -> None:
    """Parse a JSONL file's records (no tokenizer needed): malformed lines fail here, before any work."""
    from .data import DataError, detect_format, parse_alpaca, parse_chat, read_jsonl, record_keys, split_file

    p = split_file(Path(path).expanduser(), split)
    records = read_jsonl(p)
    first_line, first = records[0]
    kind = detect_format(first) if fmt == "auto" else fmt
    looks = detect_format(first)
    if fmt != "auto" and looks not in (None, fmt):
        raise RunError(f"--data_format {fmt}, but {p}:{first_line} is in {looks} format (keys: "
                       f"{record_keys(first)}); use --data_format {looks} or auto")  # fmt: skip
    if kind not in ("alpaca", "chat"):
        raise DataError(f"{label} {p}:{first_line}: unknown format (keys: {record_keys(first)}); "
                        "expected 'messages' (chat) or 'instruction' + 'output' (alpaca)")  # fmt: skip
    parse = parse_chat if kind == "chat" else parse_alpaca
    for lineno, rec in records[:limit] if limit is not None else records:
        parse(p, lineno, rec)


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


def check_output_dir(cfg: TrainConfig) -> Path | None:
    """Refuse to mix runs; returns the checkpoint to resume from (``None``: start fresh).  Raises
    :class:`AlreadyFinished` for ``--resume`` of a finished run (``summary.json`` is written last)."""
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
            check_resume_noise(ckpt, cfg)
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


def run_noise_scheme(cfg: TrainConfig) -> str:
    """The noise scheme this run's engine will pick, as its state records it (``kernels.scheme_id`` of
    ``kernels.scheme_for`` of where the base weights are stored: CPU without CUDA or under ZeRO-3
    ``offload_param`` to CPU, else CUDA)."""
    from ..kernels import scheme_for, scheme_id

    on_cpu = not torch.cuda.is_available()
    if cfg.ds_config and not on_cpu:
        offload = load_ds_config(cfg.ds_config).get("zero_optimization", {}).get("offload_param") or {}
        on_cpu = isinstance(offload, dict) and offload.get("device") == "cpu"
    return scheme_id(scheme_for("cpu" if on_cpu else "cuda"))


def check_resume_noise(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuse a resume whose noise would differ from the checkpoint's (its ``flatlora_state.json``):
    sigma, the effective noise seed, the schedule or the noise scheme.  No state file: nothing to check
    (the saved run had sigma 0, or predates the file; ``run_config.json`` is checked separately)."""
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
    asked = {"sigma": cfg.sigma, "flat_seed": now.seed, "flat_schedule": now.schedule, "noise scheme": run_noise_scheme(cfg)}
    changed = [k for k in was if was[k] != asked[k]]
    if changed:
        diffs = ", ".join(f"{k}: {was[k]!r} -> {asked[k]!r}" for k in changed)
        raise RunError(f"--resume would draw other Flat-LoRA noise than {ckpt.name} ({diffs}); "
                       "resume with the original noise settings or use --overwrite")  # fmt: skip


def preflight(cfg: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """Every check that needs no model, data tokenization or process group: settings, files, the model
    folder, the output folder (writable, not holding another run), then the names only transformers
    knows (scheduler, attention).  Raises before anything is written."""
    from .model import check_model_source

    ds = load_ds_config(cfg.ds_config) if cfg.ds_config else None
    if ds is not None:
        check_ds_batch(cfg, ds, cfg.ds_config)
    for label, path, split, limit in (("--data", cfg.data, "train", cfg.train_limit),
                                      ("--eval_data", cfg.eval_data, "test", cfg.eval_limit)):  # fmt: skip
        if path and not Path(path).exists():
            raise RunError(f"{label} file not found: {path}")
        if path:
            check_data_file(label, path, split, cfg.data_format, limit)
    if cfg.data is None and cfg.task not in ("math", "sentiment"):
        raise RunError(f"--task must be 'math' or 'sentiment' (or give --data FILE.jsonl), got {cfg.task!r}")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RunError("--load_in_4bit needs bitsandbytes: pip install 'flatlora_dist[qlora]'")
    from .fsdp_args import fsdp_from_env

    fsdp = cfg.fsdp or fsdp_from_env()  # --fsdp, or an accelerate launch FSDP config
    if cfg.load_in_4bit and (fsdp or (ds and ds.get("zero_optimization", {}).get("stage", 0) == 3)):
        raise RunError("--load_in_4bit with ZeRO-3 or FSDP is not supported by Flat-LoRA (4-bit bases cannot be "
                       "sharded and perturbed); use QLoRA single-process/DDP/ZeRO-2, or a bf16 base with ZeRO-3/FSDP")  # fmt: skip
    if cfg.merge and (cfg.ds_config or fsdp or world_size() > 1):
        raise RunError("--merge writes a merged model from a single process; run without DeepSpeed/FSDP "
                       "(or merge the saved adapter afterwards)")  # fmt: skip
    if cfg.merge and cfg.load_in_4bit:
        raise RunError(
            "--merge is not supported with --load_in_4bit (merging into 4-bit weights loses precision)"
        )
    check_model_source(cfg.model)
    resume_from = check_output_dir(cfg)
    check_scheduler(cfg)
    check_attention(cfg)
    return resume_from, ds


# ------------------------------------------------------------------------------------ set-up
def init_distributed(cfg: TrainConfig) -> None:
    """Start the process group the launcher asked for (DeepSpeed needs it before TrainingArguments); under
    ``accelerate launch`` with an FSDP config, set ``cfg.fsdp`` to the kind it asked for."""
    if not cfg.ds_config:
        from .fsdp_args import resolve_fsdp

        resolve_fsdp(cfg)
    if not cfg.ds_config or (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


class OutputJournal:
    """What this run changed in its output folder until its first optimizer step, so that a run failing
    before then leaves the folder exactly as it found it (:meth:`undo`).

    Invariant until :meth:`commit`: every path that existed before is either in place (bytes of
    ``run_config.json`` kept) or moved by :meth:`move` (a replaced run goes to the hidden ``trash``
    folder, deleted only by :meth:`commit`); everything else under the folder, and any folder above it
    that did not exist, was created by this run.  Rank 0 only; elsewhere every method does nothing.
    """

    def __init__(self, out: Path, active: bool) -> None:
        self.out, self.active = out, active
        self.existed = out.is_dir()
        self.created_root = out.absolute()  # the topmost folder this run will create (if out is absent)
        while not self.created_root.parent.exists():
            self.created_root = self.created_root.parent
        self.before = {p.relative_to(out) for p in out.rglob("*")} if active and self.existed else set()
        config = out / RUN_CONFIG
        self.config_bytes = config.read_bytes() if active and config.is_file() else None
        self.moved: list[tuple[Path, Path]] = []
        self.trash = out / f".flatlora-replaced-{os.getpid()}"
        self.done = not active

    def move(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        self.moved.append((src, dst))

    def commit(self) -> None:
        """The run has taken its first step: what it replaced is gone for good."""
        if not self.done:
            shutil.rmtree(self.trash, ignore_errors=True)
            self.done = True

    def undo(self) -> None:
        """Put the folder back as it was (no-op once committed)."""
        if self.done:
            return
        self.done = True
        if not self.existed:
            shutil.rmtree(self.created_root, ignore_errors=True)
            return
        for src, dst in reversed(self.moved):
            if src.is_dir():
                shutil.rmtree(src)
            elif src.exists():
                src.unlink()
            os.replace(dst, src)
        for p in sorted(self.out.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p.relative_to(self.out) in self.before or not (p.is_symlink() or p.exists()):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if self.config_bytes is not None:
            (self.out / RUN_CONFIG).write_bytes(self.config_bytes)


def prepare_output_dir(cfg: TrainConfig, resume_from: Path | None) -> OutputJournal:
    """Rank 0: set a replaced run aside, set aside incomplete checkpoints, record the run's settings;
    all of it undoable (the returned journal) until the first optimizer step."""
    out = Path(cfg.output_dir)
    journal = OutputJournal(out, active=is_main())
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            for name in RUN_ARTIFACTS:
                if (out / name).exists():
                    journal.move(out / name, journal.trash / name)
            for ckpt in checkpoints(out):
                journal.move(ckpt, journal.trash / ckpt.name)
        newest = int(resume_from.name.split("-")[-1]) if resume_from is not None else -1
        for ckpt in checkpoints(out):
            if not (ckpt / COMPLETE_MARKER).is_file() or int(ckpt.name.split("-")[-1]) > newest:
                journal.move(ckpt, ckpt.with_name(f"incomplete-{ckpt.name}-{int(time.time())}"))
        write_json_atomic(out / RUN_CONFIG, cfg.to_dict())
    barrier()
    return journal


def training_arguments(cfg: TrainConfig, ds: dict[str, Any] | None):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {}
    if cfg.fsdp:
        from .fsdp_args import fsdp_training_kwargs

        kwargs.update(fsdp_training_kwargs(cfg))
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,  # HF: < 0 means num_train_epochs (0 would not)
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
        save_total_limit=None,  # rotate_checkpoints() does it, after the COMPLETE marker
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
    if cfg.fsdp:
        from .fsdp_args import cpu_fsdp_state

        cpu_fsdp_state(args, cfg.fsdp)  # CPU only: accelerate 1.15 drops FSDP there (see fsdp_args)
    return args


class StopRequest:
    """SIGTERM sets a flag (nothing else: the handler may run mid-step, with noise in the weights).

    ``install``/``uninstall`` swap the handler in and back out (main thread only; elsewhere, e.g. a
    notebook worker thread, signals cannot be handled and the default behaviour stays).  Repeated
    SIGTERMs change nothing: a rank often gets two (``kill`` of the process group, then the DeepSpeed
    launcher forwarding its own); schedulers and launchers escalate with SIGKILL.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None
        self._installed = False

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def trainer_class():
    """``FlatTrainer``: HF ``Trainer`` + skipped updates on non-finite values + saves of clean weights."""
    from transformers import Trainer

    class FlatTrainer(Trainer):
        """A ``Trainer`` for the app, on :class:`FlatLoRACallback`'s public guarantees (see the module
        docstring): the callback removes the noise before every update and skips non-finite ones; this
        class only remembers the first non-finite loss of a window (for the warning), counts skipped steps
        in the logs, and keeps a ``save_model`` called mid-window clean.

        ``flat_callback`` (set by :func:`build_callbacks`) gives access to the engine; ``skipped_steps``
        lists the steps (1-based: the ``checkpoint-N`` numbering) whose update was skipped, across resumes.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.flat_callback = None
            self.skipped_steps: list[int] = []
            self.bad_loss: float | None = None  # first non-finite loss of this window on this rank

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.bad_loss is None and not bool(torch.isfinite(loss).all()):
                self.bad_loss = float(loss.float().sum())
            return loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs["skipped_steps"] = len(self.skipped_steps)
            return super().log(logs, *args, **kwargs)

        def save_model(self, output_dir=None, _internal_call=False):
            """Also a save called mid-window (noise in the weights) sees the clean base (checkpoints go
            through here too)."""
            clean = self.flat_callback.clean_base() if self.flat_callback is not None else nullcontext()
            with clean:
                return super().save_model(output_dir, _internal_call)

    return FlatTrainer


@contextmanager
def tensorboard_dir(cfg: TrainConfig):
    """``<output_dir>/tensorboard`` for the Trainer built in the body (HF reads TENSORBOARD_LOGGING_DIR when
    it builds its TensorBoard callback); a directory the user set in the environment wins."""
    if "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir) / "tensorboard")
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)


def build_callbacks(trainer, cfg: TrainConfig, stop: StopRequest | None = None):
    from transformers import TrainerCallback

    from ..hf import FlatLoRACallback, any_rank

    class CheckpointGuard(TrainerCallback):
        """Marks a checkpoint COMPLETE only after every rank has written its part."""

        def on_save(self, args, state, control, **kwargs):
            barrier()
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if is_main() and ckpt.is_dir():
                write_json_atomic(ckpt / RUN_STATE, {"skipped_steps": trainer.skipped_steps})
                marker = ckpt / COMPLETE_MARKER
                with open(marker, "w") as f:
                    f.write(f"step {state.global_step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                rotate_checkpoints(Path(args.output_dir), cfg.save_total_limit)
            barrier()

    class GracefulStop(TrainerCallback):
        """At the end of an optimizer step, if any rank got SIGTERM: all ranks save and stop."""

        def __init__(self) -> None:
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if stop is not None and any_rank(stop.signum is not None):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

    class SkipReport(TrainerCallback):
        """After FlatLoRACallback's ``on_step_end``: a skipped step joins ``trainer.skipped_steps`` (which
        checkpoints carry across resumes), with the non-finite loss seen on this rank if any."""

        def on_step_end(self, args, state, control, **kwargs):
            n = state.global_step
            if flat.skipped_steps and flat.skipped_steps[-1] == n:
                trainer.skipped_steps.append(n)
                bad = trainer.bad_loss
                what = f"loss ({bad})" if bad is not None else "gradients (or loss on another rank)"
                if bad is not None or is_main():
                    logger.warning("step %d: non-finite %s; Flat-LoRA noise removed, optimizer and LR-scheduler "
                                   "update skipped", n, what)  # fmt: skip
            trainer.bad_loss = None

    # sigma 0 (plain LoRA) keeps the callback for its non-finite step skipping; it creates no engine
    flat = FlatLoRACallback.attach(trainer, cfg.flat_config())
    trainer.flat_callback = flat
    trainer.add_callback(SkipReport())
    trainer.add_callback(CheckpointGuard())
    trainer.graceful_stop = GracefulStop()
    trainer.add_callback(trainer.graceful_stop)
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


@contextmanager
def unsharded_loading(args) -> Iterator[None]:
    """Inside: transformers treats models as unsharded (``from_pretrained`` loads a plain model, ``generate``
    does not sync with other ranks).  After: the DeepSpeed config that ``TrainingArguments`` registered
    (``args.hf_deepspeed_config``) is registered again.  Public calls only: ``unset_hf_deepspeed_config``
    and ``set_hf_deepspeed_config``."""
    from transformers.integrations import deepspeed as hf_ds

    ds_config = getattr(args, "hf_deepspeed_config", None)  # None without DeepSpeed
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ds_config is not None:
            hf_ds.set_hf_deepspeed_config(ds_config)


def rank0_accuracy(cfg: TrainConfig, args, adapter_dir: Path, heldout, extra,
                   stop: StopRequest | None = None) -> tuple[dict, dict] | None:  # fmt: skip
    """Before/after accuracy from an unsharded copy on rank 0 (others wait at a barrier); ``None`` when a
    SIGTERM reached rank 0 during it (checked between batches).

    Token-by-token generation through ZeRO-3/FSDP gathers every layer for every new token; one plain
    copy of base + saved adapter is far cheaper whenever the model fits one device.  "Before" is the
    base model with the adapter disabled, which is what LoRA's zero-initialised B starts from.  ``args``:
    the run's ``TrainingArguments``, whose DeepSpeed config is switched off for that load and back on after.
    """
    from .evaluate import EvaluationStopped, stop_when

    before: dict[str, float] = {}
    after: dict[str, float] = {}
    result: tuple[dict, dict] | None = (before, after)
    if is_main() and cfg.eval_generate_limit and heldout is not None:
        from peft import PeftModel

        from .model import load_model

        try:
            with unsharded_loading(args):  # plain load and generation (no ZeRO-3 sync), on this rank alone
                base, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                             attn_implementation=cfg.attn_implementation,
                                             trust_remote_code=cfg.trust_remote_code)  # fmt: skip
                if torch.cuda.is_available():
                    base = base.to(f"cuda:{torch.cuda.current_device()}")
                model = PeftModel.from_pretrained(base, str(adapter_dir))
                model.eval()
                with stop_when(lambda: stop is not None and stop.signum is not None):  # rank 0 alone: local flag
                    with model.disable_adapter():
                        before.update(_accuracy(cfg, model, tokenizer, heldout, extra))
                    after.update(_accuracy(cfg, model, tokenizer, heldout, extra))
        except EvaluationStopped:
            result = None
    barrier()
    return result


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


def save_adapter(model, target: Path) -> None:
    """A complete PEFT adapter in ``target``, also under ZeRO-3 / FSDP (``checkpoint.save_adapter`` gathers
    the LoRA weights; collective), written to a temporary folder and renamed: a crash never leaves half an
    adapter in ``target``."""
    from .. import checkpoint

    tmp = target.with_name(target.name + ".tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if checkpoint.save_adapter(model, tmp):  # every rank gathers; global rank 0 writes
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    barrier()


# ------------------------------------------------------------------------------------ the run
def run(cfg: TrainConfig) -> dict[str, Any]:
    stop = StopRequest().install()
    try:
        return _run(cfg, stop)
    finally:
        stop.uninstall()


def _run(cfg: TrainConfig, stop: StopRequest) -> dict[str, Any]:
    t0 = time.time()
    resume_from, ds = preflight(cfg)
    init_distributed(cfg)

    from transformers import set_seed

    from .model import apply_lora, load_model, target_modules_problem

    set_seed(cfg.seed)
    targets = cfg.target_modules()
    args = training_arguments(cfg, ds)  # before the model: HF's ZeRO-3 init hooks need it
    model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                  load_in_4bit=cfg.load_in_4bit, attn_implementation=cfg.attn_implementation,
                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                  trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    problem = target_modules_problem(model, targets)
    if problem:
        raise RunError(problem)
    model = apply_lora(
        model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets
    )
    train, heldout, extra = load_data(cfg, tokenizer)
    # only now: a failure above leaves the output folder as it was; one below, until the first step, undoes
    journal = prepare_output_dir(cfg, resume_from)
    try:
        trainer, result, boundaries = _train(cfg, ds, stop, model, tokenizer, args, train, heldout, extra,
                                             resume_from, journal)  # fmt: skip
    except BaseException:
        journal.undo()
        raise
    journal.commit()
    out = Path(cfg.output_dir)
    if trainer.graceful_stop.stopped_at is not None:
        return stopped(trainer, out, stop)
    fingerprint_after = base_fingerprint(trainer.model)
    save_adapter(trainer.model, out / "adapter")
    after_metrics = final_evaluation(cfg, ds, trainer, tokenizer, heldout, extra, boundaries.before, stop)
    peaks = gather_per_rank(peak_memory_mb())
    train_s = boundaries.train_seconds(trainer.state.log_history)
    flat = trainer.flat_callback.flat if trainer.flat_callback is not None else None
    tokens = trainer.state.num_input_tokens_seen - boundaries.tokens_at_start
    summary = {
        "model": cfg.model,
        "task": cfg.data or cfg.task,
        "sigma": cfg.sigma,
        "world_size": world_size(),
        "backend": "deepspeed" if ds else (cfg.fsdp or "single"),
        "resumed_from": str(resume_from) if resume_from else None,
        "steps": trainer.state.global_step,
        "skipped_steps": trainer.skipped_steps,
        "metrics_before": boundaries.before.get("metrics"),
        "metrics_after": after_metrics,
        "final_evaluation": "complete" if after_metrics is not None else "stopped by SIGTERM",
        "train_loss": result.training_loss,
        "base_fingerprint_before": boundaries.before.get("fingerprint"),
        "base_fingerprint_after": fingerprint_after,
        "base_weights_unchanged": boundaries.before.get("fingerprint") == fingerprint_after,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": tokens / train_s if train_s > 0 else None,  # this session's training steps only
        "train_time_s": train_s,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "peak_memory_mb_per_rank": peaks,
        "wall_time_s": time.time() - t0,
        "flatlora": flat.stats() if flat is not None else None,
        "data": {"train": train.stats, "heldout": heldout.stats if heldout is not None else None},
    }
    if cfg.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(out / "merged"), safe_serialization=True)
        tokenizer.save_pretrained(str(out / "merged"))
    if is_main():
        write_json_atomic(out / "summary.json", summary)
        plot_curves(trainer.state.log_history, out / "curves.png", f"{cfg.model} sigma={cfg.sigma}")
        if after_metrics is None:
            print(f"stopped: SIGTERM during the final evaluation; training finished, {out / 'adapter'} is complete "
                  f"and {out / 'summary.json'} has no after-metrics", file=sys.stderr)  # fmt: skip
        else:
            print(f"done: {out / 'summary.json'}  before={summary['metrics_before']}  after={after_metrics}")
    barrier()
    return {**summary, "stopped": True} if after_metrics is None else summary


class Boundaries:
    """Callback marking where training proper starts and ends: before its first step, the held-out
    metrics and base fingerprint (once the model is wrapped) and then the clock and token count; after
    the first step, the output folder's journal is committed; at the end, the clock stops.  So
    ``train_seconds`` excludes the before/after evaluations and the periodic ones (``eval_runtime``)."""

    def __init__(self, trainer, cfg: TrainConfig, tokenizer, heldout, extra, resumed: bool, accuracy: bool,
                 journal: OutputJournal) -> None:  # fmt: skip
        self.trainer, self.cfg, self.tokenizer, self.heldout, self.extra = trainer, cfg, tokenizer, heldout, extra
        self.resumed, self.accuracy, self.journal = resumed, accuracy, journal
        self.before: dict[str, Any] = {}
        self.tokens_at_start = 0
        self.start_step = 0
        self.started = self.ended = 0.0

    def callback(self):
        from transformers import TrainerCallback

        owner = self

        class _Boundaries(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                owner.begin(state)

            def on_step_end(self, args, state, control, **kwargs):
                owner.journal.commit()

            def on_train_end(self, args, state, control, **kwargs):
                owner.ended = time.perf_counter()

        return _Boundaries()

    def begin(self, state) -> None:
        model = self.trainer.model
        self.before["fingerprint"] = base_fingerprint(model)
        if not self.resumed:
            self.before["metrics"] = evaluate_all(self.cfg, model, self.tokenizer, self.heldout, self.extra,
                                                  self.accuracy)  # fmt: skip
        self.tokens_at_start, self.start_step = state.num_input_tokens_seen, state.global_step
        self.started = time.perf_counter()

    def train_seconds(self, log_history: list[dict[str, Any]]) -> float:
        evals = sum(r.get("eval_runtime", 0.0) for r in log_history if r.get("step", 0) > self.start_step)
        return max(self.ended - self.started - evals, 0.0)


def _train(cfg: TrainConfig, ds, stop: StopRequest, model, tokenizer, args, train, heldout, extra,
           resume_from: Path | None, journal: OutputJournal):  # fmt: skip
    """Build the Trainer and train; (trainer, train() result, boundaries)."""
    with tensorboard_dir(cfg):
        trainer = trainer_class()(model=model, args=args, train_dataset=train.dataset, data_collator=train.collator,
                                  eval_dataset=heldout.dataset if heldout is not None and cfg.eval_steps else None)  # fmt: skip
    build_callbacks(trainer, cfg, stop)
    if resume_from is not None and (resume_from / RUN_STATE).is_file():
        trainer.skipped_steps = json.loads((resume_from / RUN_STATE).read_text())["skipped_steps"]
    split_eval = sharded(cfg, ds)  # accuracy then comes from one unsharded copy on rank 0
    boundaries = Boundaries(trainer, cfg, tokenizer, heldout, extra, resume_from is not None, not split_eval, journal)
    trainer.add_callback(boundaries.callback())
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        close_tensorboard(trainer)  # before the caller's undo removes tensorboard/: its writer is a thread
        raise
    return trainer, result, boundaries


def close_tensorboard(trainer) -> None:
    """Close the TensorBoard writer of a Trainer that failed (its ``on_train_end`` hook, which a failed
    ``train()`` never reaches): the writer's thread would otherwise keep creating event files."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.on_train_end(trainer.args, trainer.state, trainer.control)


def final_evaluation(cfg: TrainConfig, ds, trainer, tokenizer, heldout, extra, before: dict[str, Any],
                     stop: StopRequest) -> dict[str, Any] | None:  # fmt: skip
    """Held-out metrics of the trained model (the adapter is already saved); ``None`` if a SIGTERM stopped
    it (checked between batches; ranks agree on it).  Sharded runs take accuracy from rank 0's unsharded
    copy, whose "before" numbers are added to ``before['metrics']``."""
    from ..hf import any_rank
    from .evaluate import EvaluationStopped, stop_when

    split_eval = sharded(cfg, ds)
    if is_main():
        n = len(heldout.dataset) if heldout is not None else 0
        print(f"final evaluation: {n} held-out examples", file=sys.stderr, flush=True)
    try:
        with stop_when(lambda: any_rank(stop.signum is not None)):  # every rank evaluates in lockstep
            after = evaluate_all(cfg, trainer.model, tokenizer, heldout, extra, not split_eval)
    except EvaluationStopped:
        return None
    if split_eval:
        accuracy = gather_per_rank(rank0_accuracy(cfg, trainer.args, Path(cfg.output_dir) / "adapter", heldout, extra,
                                                  stop))[0]  # fmt: skip
        if accuracy is None:
            return None
        if before.get("metrics") is not None:
            before["metrics"].update(accuracy[0])
        after.update(accuracy[1])
    return after


def stopped(trainer, out: Path, stop: StopRequest) -> dict[str, Any]:
    """After a SIGTERM stop: the checkpoint is complete; no final evaluation, adapter or summary."""
    step = trainer.graceful_stop.stopped_at
    ckpt = out / f"checkpoint-{step}"
    if is_main():
        got = "SIGTERM" if stop.signum is not None else "SIGTERM on another rank"
        print(f"stopped: {got} at step {step}/{trainer.state.max_steps}; {ckpt} is complete; "
              "rerun with --resume to continue", file=sys.stderr)  # fmt: skip
    barrier()
    return {"stopped": True, "steps": step, "checkpoint": str(ckpt), "skipped_steps": trainer.skipped_steps}


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 finished (or ``--resume`` of a finished run: nothing to do); 2 user error (one
    ``error:`` line, never a traceback, the output folder untouched); 143 stopped on SIGTERM: during
    training with a complete checkpoint (rerun with ``--resume``), or during the final evaluation with
    the adapter and summary written."""
    from .data import DataError
    from .model import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(parse_args(argv))
    except (ConfigError, RunError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AlreadyFinished as e:
        if is_main():
            print(f"nothing to do: {e}")
        return 0
    return STOPPED_EXIT_CODE if summary.get("stopped") else 0
