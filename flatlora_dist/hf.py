"""`FlatLoRACallback`: Flat-LoRA for ``transformers.Trainer``.

Perturbs at the start of every optimizer step (``on_step_begin``: once per gradient-accumulation
window, so every micro-batch and any activation recomputation sees the same noise) and restores
before the optimizer step (``on_pre_optimizer_step``), with safety restores before any evaluation,
save, or the end of training.  The step index is the Trainer's ``global_step`` (optimizer steps), so
a resumed run continues the identical noise sequence.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from transformers import TrainerCallback

from .config import FlatLoRAConfig
from .engine import FlatLoRA

LOGGED_STATS = ("factor", "mean_row_std", "max_row_std", "fixups")
STATE_FILE = "flatlora_state.json"
"""Written into every checkpoint: ``FlatLoRA.state_dict()`` (with its ``noise_scheme``; read by a resume)."""


class FlatLoRACallback(TrainerCallback):
    """Drive a :class:`FlatLoRA` engine from the Trainer's events.

    ``total_steps`` defaults to the Trainer's ``max_steps``.  Stats are added to the Trainer's logs
    under ``flatlora/*``; to have them reach TensorBoard too, put this callback before the reporting
    callbacks (``FlatLoRACallback.attach(trainer, cfg)`` does that).
    """

    def __init__(self, config: FlatLoRAConfig | None = None) -> None:
        self.config = config if config is not None else FlatLoRAConfig()
        self.flat: FlatLoRA | None = None

    @classmethod
    def attach(cls, trainer, config: FlatLoRAConfig | None = None) -> FlatLoRACallback:
        """Create the callback and register it first, so logging callbacks see its stats."""
        cb = cls(config)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.flat is None:
            if model is None:
                raise ValueError("FlatLoRACallback needs the Trainer's model (on_train_begin got none)")
            cfg = self.config
            if cfg.total_steps is None:
                if not state.max_steps or state.max_steps <= 0:
                    raise ValueError("FlatLoRACallback: set FlatLoRAConfig.total_steps or the Trainer's max_steps")
                cfg = replace(cfg, total_steps=int(state.max_steps))
            self.flat = FlatLoRA(model, cfg)

    def on_step_begin(self, args, state, control, **kwargs):
        self._restore()
        self.flat.perturb(int(state.global_step))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._restore()

    def on_step_end(self, args, state, control, **kwargs):
        self._restore()

    def on_evaluate(self, args, state, control, **kwargs):
        self._restore()

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def on_save(self, args, state, control, **kwargs):
        self._restore()
        if self.flat is None or not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            with open(os.path.join(ckpt, STATE_FILE), "w") as f:
                json.dump(self.flat.state_dict(), f)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.flat is None or logs is None or "loss" not in logs:
            return
        stats = self.flat.stats()
        extra = {f"flatlora/{k}": stats[k] for k in LOGGED_STATS}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _restore(self) -> None:
        if self.flat is not None and self.flat.is_perturbed:
            self.flat.restore()
