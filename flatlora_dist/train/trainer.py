"""The Trainer side of a run: ``TrainingArguments`` from the settings and the plan, :class:`FlatTrainer`
(HF ``Trainer`` + skipped updates on non-finite values + saves of clean weights), the app's callbacks
(checkpoint marker, SIGTERM / Ctrl-C stop, skipped-step report, ``metrics.jsonl``, :class:`RunClock`) and
:func:`build_trainer`, which
puts them together (``extra_callbacks``: hooks a caller adds, e.g. the tests' fault injection)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..checkpoint import base_fingerprint
from ..compat import checkpointing_arguments
from ..hf import FlatLoRACallback
from .config import TrainConfig
from .evaluate import evaluate_all
from .loggers import report_to_names
from .outputs import COMPLETE_MARKER, METRICS_LOG, RUN_STATE, OutputJournal, rotate_checkpoints
from .plan import RunPlan
from .report import strict_json_value, write_json_atomic
from .runtime import StopRequest, agreed_signal, barrier, is_main, logger

TrainerHook = Callable[["FlatTrainer"], None]
"""A caller's addition to the Trainer the app builds, called once the app's callbacks are in place and
before the run clock's: it may add callbacks (``add_callback``, or ahead of the others) or wrap methods."""


def training_arguments(cfg: TrainConfig, plan: RunPlan):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {}
    if plan.fsdp:
        from .fsdp_args import fsdp_training_kwargs

        kwargs.update(fsdp_training_kwargs(plan.fsdp))
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
        **checkpointing_arguments(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=None,  # rotate_checkpoints() does it, after the COMPLETE marker
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        report_to=report_to_names(cfg.report_to),
        deepspeed=plan.ds,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        **kwargs,
    )
    if cfg.fsdp:
        from .fsdp_args import cpu_fsdp_state

    if plan.fsdp:
        from .fsdp_args import cpu_fsdp_state

        cpu_fsdp_state(args, plan.fsdp)  # CPU only: accelerate 1.15 drops FSDP there (see fsdp_args)
    return args


class FlatTrainer(Trainer):
    """A ``Trainer`` for the app, on :class:`FlatLoRACallback`'s public guarantees (see ``run.py``'s
    docstring): the callback removes the noise before every update and skips non-finite ones; this
    class only remembers the first non-finite loss of a window (for the warning), counts skipped steps
    in the logs, and keeps a ``save_model`` called mid-window clean.

    ``flat_callback`` (set by :func:`add_callbacks`) gives access to the engine; ``skipped_steps``
    lists the steps (1-based: the ``checkpoint-N`` numbering) whose update was skipped, across resumes;
    ``metrics_before``: the held-out metrics before training, measured by the first run of this output
    folder (checkpoints carry them to a resumed run; ``None`` until measured).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flat_callback = None
        self.graceful_stop: GracefulStop | None = None
        self.skipped_steps: list[int] = []
        self.metrics_before: dict[str, Any] | None = None
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


# ------------------------------------------------------------------------------------ callbacks
class CheckpointGuard(TrainerCallback):
    """Marks a checkpoint COMPLETE only after every rank has written its part (with the run's own state,
    ``run_state.json``), then rotates complete checkpoints beyond ``--save_total_limit``."""

    def __init__(self, trainer: FlatTrainer, save_total_limit: int | None) -> None:
        self.trainer, self.save_total_limit = trainer, save_total_limit

    def on_save(self, args, state, control, **kwargs):
        barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main() and ckpt.is_dir():
            write_json_atomic(ckpt / RUN_STATE, {"skipped_steps": self.trainer.skipped_steps,
                                                 "metrics_before": self.trainer.metrics_before})  # fmt: skip
            marker = ckpt / COMPLETE_MARKER
            with open(marker, "w") as f:
                f.write(f"step {state.global_step}\n")
                f.flush()
                os.fsync(f.fileno())
            rotate_checkpoints(Path(args.output_dir), self.save_total_limit)
        barrier()


class GracefulStop(TrainerCallback):
    """At the end of an optimizer step, if any rank got SIGTERM or Ctrl-C: all ranks save and stop;
    ``signum`` is then the signal they agreed on (SIGTERM if ranks got different ones)."""

    def __init__(self, stop: StopRequest | None) -> None:
        self.stop = stop
        self.stopped_at: int | None = None
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop is None:
            return
        signum = agreed_signal(self.stop.signum)
        if signum is not None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at, self.signum = state.global_step, signum


class MetricsLog(TrainerCallback):
    """``<output_dir>/metrics.jsonl``: one JSON object per Trainer log call (``step``, ``epoch`` and the
    logged values; non-finite numbers as ``null``), main rank only, flushed at once.  A resumed run appends;
    its first write drops the lines of steps after its checkpoint (redone, so logged again), so the file
    always holds one history, each step once."""

    def __init__(self, output_dir: str, resumed_at: int | None) -> None:
        self.path = Path(output_dir) / METRICS_LOG
        self.resumed_at = resumed_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        if self.resumed_at is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= self.resumed_at]  # fmt: skip
            self.path.write_text("".join(kept))
        self.resumed_at = None
        record = strict_json_value({"step": state.global_step, "epoch": state.epoch, **logs})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False, default=str) + "\n")
            f.flush()


class SkipReport(TrainerCallback):
    """After FlatLoRACallback's ``on_step_end``: a skipped step joins ``trainer.skipped_steps`` (which
    checkpoints carry across resumes), with the non-finite loss seen on this rank if any."""

    def __init__(self, trainer: FlatTrainer, flat: FlatLoRACallback) -> None:
        self.trainer, self.flat = trainer, flat

    def on_step_end(self, args, state, control, **kwargs):
        n, trainer = state.global_step, self.trainer
        if self.flat.skipped_steps and self.flat.skipped_steps[-1] == n:
            trainer.skipped_steps.append(n)
            bad = trainer.bad_loss
            what = f"loss ({bad})" if bad is not None else "gradients (or loss on another rank)"
            if bad is not None or is_main():
                logger.warning("step %d: non-finite %s; Flat-LoRA noise removed, optimizer and LR-scheduler "
                               "update skipped", n, what)  # fmt: skip
        trainer.bad_loss = None


def add_callbacks(trainer: FlatTrainer, cfg: TrainConfig, stop: StopRequest | None = None,
                  resumed_at: int | None = None) -> FlatLoRACallback:  # fmt: skip
    """The app's callbacks, in their order: Flat-LoRA, the skipped-step report, the checkpoint marker, the
    SIGTERM / Ctrl-C stop (``trainer.graceful_stop``), the metrics log (``resumed_at``: the checkpoint's
    step of a resumed run).  Returns the Flat-LoRA callback (``trainer.flat_callback``)."""
    # sigma 0 (plain LoRA) keeps the callback for its non-finite step skipping; it creates no engine
    flat = FlatLoRACallback.attach(trainer, cfg.flat_config())
    trainer.flat_callback = flat
    trainer.add_callback(SkipReport(trainer, flat))
    trainer.add_callback(CheckpointGuard(trainer, cfg.save_total_limit))
    trainer.graceful_stop = GracefulStop(stop)
    trainer.add_callback(trainer.graceful_stop)
    trainer.add_callback(MetricsLog(cfg.output_dir, resumed_at))
    return flat


class RunClock(TrainerCallback):
    """Times the run's training proper: before its first step, the held-out metrics and base fingerprint
    (once the model is wrapped), then the clock and token count start; after the first step, the output
    folder's journal is committed; at the end, the clock stops.  So :meth:`train_seconds` excludes the
    before/after evaluations and the periodic ones (``eval_runtime``)."""

    def __init__(self, trainer, cfg: TrainConfig, tokenizer, heldout, extra, resumed: bool, accuracy: bool,
                 journal: OutputJournal) -> None:  # fmt: skip
        self.trainer, self.cfg, self.tokenizer, self.heldout, self.extra = trainer, cfg, tokenizer, heldout, extra
        self.resumed, self.accuracy, self.journal = resumed, accuracy, journal
        self.before: dict[str, Any] = {}
        self.tokens_at_start = 0
        self.start_step = 0
        self.started = self.ended = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.before["fingerprint"] = base_fingerprint(model)
        if not self.resumed:
            self.trainer.metrics_before = evaluate_all(self.cfg, model, self.tokenizer, self.heldout, self.extra,
                                                       self.accuracy)  # fmt: skip
        self.before["metrics"] = self.trainer.metrics_before
        self.tokens_at_start, self.start_step = state.num_input_tokens_seen, state.global_step
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.journal.commit()

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()

    def train_seconds(self, log_history: list[dict[str, Any]]) -> float:
        evals = sum(r.get("eval_runtime", 0.0) for r in log_history if r.get("step", 0) > self.start_step)
        return max(self.ended - self.started - evals, 0.0)


# ------------------------------------------------------------------------------------ putting it together
def build_trainer(cfg: TrainConfig, plan: RunPlan, args, model, tokenizer, data, journal: OutputJournal,
                  stop: StopRequest | None = None, extra_callbacks: Sequence[TrainerHook] = ()) -> tuple[FlatTrainer, RunClock]:  # fmt: skip
    """The run's Trainer with the app's callbacks, then ``extra_callbacks`` (each called with the Trainer),
    then the run clock; the skipped steps a resumed checkpoint carries.  ``data``: the run's
    :class:`~.sources.RunData`."""
    heldout = data.heldout
    with tensorboard_dir(cfg):
        trainer = FlatTrainer(model=model, args=args, train_dataset=data.train.dataset, data_collator=data.train.collator,
                              eval_dataset=heldout.dataset if heldout is not None and cfg.eval_steps else None)  # fmt: skip
    resume_from = plan.resume_from
    add_callbacks(trainer, cfg, stop, int(resume_from.name.rsplit("-", 1)[-1]) if resume_from is not None else None)
    for hook in extra_callbacks:
        hook(trainer)
    if resume_from is not None and (resume_from / RUN_STATE).is_file():
        state = json.loads((resume_from / RUN_STATE).read_text())
        trainer.skipped_steps, trainer.metrics_before = state["skipped_steps"], state.get("metrics_before")
    # sharded runs take accuracy from one unsharded copy on rank 0 (evaluate.final_evaluation)
    clock = RunClock(trainer, cfg, tokenizer, heldout, data.extra, resume_from is not None, not plan.sharded, journal)
    trainer.add_callback(clock)
    return trainer, clock


def close_tensorboard(trainer) -> None:
    """Close the TensorBoard writer of a Trainer that failed (its ``on_train_end`` hook, which a failed
    ``train()`` never reaches): the writer's thread would otherwise keep creating event files."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.on_train_end(trainer.args, trainer.state, trainer.control)
