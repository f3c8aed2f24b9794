"""The run as a recipe: :class:`Recipe` settles the run's facts once (the preflight's
:class:`~.plan.RunPlan`), then :meth:`~Recipe.setup` (process group, model + LoRA, data),
:meth:`~Recipe.train` (output folder, Trainer, training; undone if it fails before its first step) and
:meth:`~Recipe.finish` (adapter, final evaluation, ``summary.json``, ``curves.png``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import base_fingerprint
from .config import TrainConfig
from .model_card import write_model_card
from .model_sources import model_reference
from .outputs import prepare_output_dir, save_adapter
from .plan import RunPlan
from .preflight import preflight
from .report import gather_per_rank, peak_memory_mb, plot_curves, write_json_atomic
from .runtime import RunError, StopRequest, barrier, is_main, signal_name, world_size


def init_distributed(plan: RunPlan) -> None:
    """Start the process group the launcher asked for: DeepSpeed needs it before ``TrainingArguments``
    (torchrun and accelerate runs get theirs from the Trainer)."""
    if plan.ds is None or (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def announce_resume(cfg: TrainConfig, resume_from: Path | None) -> None:
    """Main rank, ``--resume``: say which checkpoint the run continues from (or that none was complete)."""
    if not (cfg.resume and is_main()):
        return
    if resume_from is None:
        print(f"resume: no complete checkpoint in {cfg.output_dir}; starting from step 0", file=sys.stderr, flush=True)
    else:
        step = resume_from.name.rsplit("-", 1)[-1]
        print(f"resume: continuing from {resume_from} (step {step})", file=sys.stderr, flush=True)


class Recipe:
    """One run of the app.  ``extra_callbacks``: functions called with the Trainer once the app's
    callbacks are in place (see :data:`.trainer.TrainerHook`)."""

    def __init__(self, cfg: TrainConfig, stop: StopRequest, extra_callbacks: Sequence = ()) -> None:
        self.t0 = time.time()
        self.cfg, self.stop, self.extra_callbacks = cfg, stop, tuple(extra_callbacks)
        self.plan = preflight(cfg)  # raises before anything is loaded or written

    def setup(self) -> None:
        """Process group, seed, ``TrainingArguments`` (before the model: HF's ZeRO-3 init hooks need it),
        model with LoRA (its target modules checked against it), data.  The output folder is untouched."""
        from transformers import set_seed

        from .model import apply_lora, load_model, target_modules_problem
        from .sources import load_data
        from .trainer import training_arguments

        cfg = self.cfg
        init_distributed(self.plan)
        set_seed(cfg.seed)
        targets = cfg.target_modules()
        self.args = training_arguments(cfg, self.plan)
        model, self.tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                           load_in_4bit=cfg.load_in_4bit, attn_implementation=cfg.attn_implementation,
                                           gradient_checkpointing=cfg.gradient_checkpointing,
                                           trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        problem = target_modules_problem(model, targets)
        if problem:
            raise RunError(problem)
        self.model = apply_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets
        )
        self.data = load_data(cfg, self.tokenizer)

    def train(self) -> None:
        """Prepare the output folder (only now: a failure above leaves it as it was; one from here until
        the first optimizer step undoes what this run did to it), build the Trainer and train."""
        from .trainer import build_trainer, close_tensorboard

        journal = prepare_output_dir(self.cfg, self.plan)
        try:
            self.trainer, self.clock = build_trainer(self.cfg, self.plan, self.args, self.model, self.tokenizer,
                                                     self.data, journal, self.stop, self.extra_callbacks)  # fmt: skip
            resume_from = self.plan.resume_from
            announce_resume(self.cfg, resume_from)
            try:
                self.result = self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except BaseException:
                close_tensorboard(self.trainer)  # before the undo removes tensorboard/: its writer is a thread
                raise
        except BaseException:
            journal.undo()
            raise
        journal.commit()

    def finish(self) -> dict[str, Any]:
        """After a SIGTERM / Ctrl-C stop: report it.  Else: save the adapter, evaluate, write the summary (and
        the merged model if asked); returns the summary (``stopped`` and ``exit_code`` set when a signal cut
        the evaluation).  A resumed run's ``metrics_before`` are the first run's (carried by checkpoints)."""
        from .evaluate import final_evaluation

        cfg, plan, trainer, clock, data = self.cfg, self.plan, self.trainer, self.clock, self.data
        out = Path(cfg.output_dir)
        if trainer.graceful_stop.stopped_at is not None:
            return self.stopped(out)
        fingerprint_after = base_fingerprint(trainer.model)
        save_adapter(trainer.model, out / "adapter", self.tokenizer, model_reference(cfg.model))
        after_metrics = final_evaluation(cfg, plan, trainer, self.tokenizer, data, clock.before, self.stop)
        peaks = gather_per_rank(peak_memory_mb())
        train_s = clock.train_seconds(trainer.state.log_history)
        flat = trainer.flat_callback.flat if trainer.flat_callback is not None else None
        tokens = trainer.state.num_input_tokens_seen - clock.tokens_at_start
        summary = {
            "model": cfg.model,
            "task": cfg.data or cfg.task,
            "sigma": cfg.sigma,
            "world_size": world_size(),
            "backend": plan.backend,
            "resumed_from": str(plan.resume_from) if plan.resume_from else None,
            "steps": trainer.state.global_step,
            "skipped_steps": trainer.skipped_steps,
            "metrics_before": clock.before.get("metrics"),
            "metrics_after": after_metrics,
            "final_evaluation": "complete" if after_metrics is not None else f"stopped by {self.stopped_by()}",
            "train_loss": self.result.training_loss,
            "base_fingerprint_before": clock.before.get("fingerprint"),
            "base_fingerprint_after": fingerprint_after,
            "base_weights_unchanged": clock.before.get("fingerprint") == fingerprint_after,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "tokens_per_second": tokens / train_s if train_s > 0 else None,  # this session's training steps only
            "train_time_s": train_s,
            "train_runtime_s": self.result.metrics.get("train_runtime"),
            "peak_memory_mb_per_rank": peaks,
            "wall_time_s": time.time() - self.t0,
            "flatlora": flat.stats() if flat is not None else None,
            "data": {"train": data.train.stats, "heldout": data.heldout.stats if data.heldout is not None else None,
                     "heldout_from": data.heldout_from},
        }
        if cfg.merge:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(out / "merged"), safe_serialization=True)
            self.tokenizer.save_pretrained(str(out / "merged"))
        if is_main():
            write_model_card(out / "adapter", cfg, summary)  # before summary.json, the "finished" mark
            write_json_atomic(out / "summary.json", summary)
            plot_curves(trainer.state.log_history, out / "curves.png", f"{cfg.model} sigma={cfg.sigma}")
            if after_metrics is None:
                print(f"stopped: {self.stopped_by()} during the final evaluation; training finished, {out / 'adapter'} is complete "
                      f"and {out / 'summary.json'} has no after-metrics", file=sys.stderr)  # fmt: skip
            else:
                print(f"done: {out / 'summary.json'}  before={summary['metrics_before']}  after={after_metrics}")
        barrier()
        if after_metrics is None:
            return {**summary, "stopped": True, "exit_code": self.stop.exit_code}
        return summary

    def stopped_by(self) -> str:
        """The signal that stopped this process, by name (``SIGTERM`` when none reached it here)."""
        return signal_name(self.stop.signum)

    def stopped(self, out: Path) -> dict[str, Any]:
        """After a SIGTERM or Ctrl-C stop: the checkpoint is complete; no final evaluation, adapter or summary
        (the caller prints the command that continues).  The exit code is the agreed signal's."""
        trainer, graceful = self.trainer, self.trainer.graceful_stop
        step = graceful.stopped_at
        ckpt = out / f"checkpoint-{step}"
        if is_main():
            got = signal_name(graceful.signum) + ("" if self.stop.signum is not None else " on another rank")
            print(f"stopped: {got} at step {step}/{trainer.state.max_steps}; {ckpt} is complete",
                  file=sys.stderr, flush=True)  # fmt: skip
        barrier()
        return {"stopped": True, "exit_code": 128 + graceful.signum, "steps": step, "checkpoint": str(ckpt),
                "skipped_steps": trainer.skipped_steps}  # fmt: skip
