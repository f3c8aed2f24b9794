"""What a run writes in its output folder and how: the undoable journal of the first changes
(:class:`OutputJournal`), ``checkpoint-N`` folders with their ``COMPLETE`` marker and rotation, and the
final PEFT adapter with its tokenizer (written whole or not at all; its model card: :mod:`.model_card`)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .plan import RunPlan
from .report import write_json_atomic
from .runtime import barrier, is_main

COMPLETE_MARKER = "COMPLETE"
RUN_CONFIG = "run_config.json"
RUN_STATE = "run_state.json"  # in each checkpoint: what the Trainer's own state does not carry
METRICS_LOG = "metrics.jsonl"  # trainer.MetricsLog: every Trainer log line of the run, across resumes
RUN_ARTIFACTS = ("summary.json", "curves.png", RUN_CONFIG, "adapter", "merged", "tensorboard", METRICS_LOG)
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


def prepare_output_dir(cfg: TrainConfig, plan: RunPlan) -> OutputJournal:
    """Rank 0: set a replaced run aside, set aside incomplete checkpoints, record the run's settings (with
    the FSDP kind the plan settled, which an ``accelerate launch`` config may have chosen); all of it
    undoable (the returned journal) until the first optimizer step."""
    out, resume_from = Path(cfg.output_dir), plan.resume_from
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
        write_json_atomic(out / RUN_CONFIG, {**cfg.to_dict(), "fsdp": plan.fsdp})
    barrier()
    return journal


def name_base_model(adapter_dir: Path, base_model: str) -> None:
    """Set ``adapter_config.json``'s ``base_model_name_or_path`` (through PEFT's own config class) to
    ``base_model``: the Hub ID or path the user gave, not the folder this machine loaded it from."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(adapter_dir))


def save_adapter(model, target: Path, tokenizer=None, base_model: str | None = None) -> None:
    """A complete PEFT adapter in ``target``, also under ZeRO-3 / FSDP (``checkpoint.save_adapter`` gathers
    the LoRA weights; collective), with ``tokenizer`` saved beside it (the folder alone gives model
    inputs) and ``base_model`` (:func:`.model_sources.model_reference`) as its base, written to a
    temporary folder and renamed: a crash never leaves half an adapter in ``target``."""
    from .. import checkpoint

    tmp = target.with_name(target.name + ".tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if checkpoint.save_adapter(model, tmp):  # every rank gathers; global rank 0 writes
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if base_model is not None:
            name_base_model(tmp, base_model)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    barrier()
