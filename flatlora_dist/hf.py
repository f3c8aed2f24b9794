"""`FlatLoRACallback`: Flat-LoRA for ``transformers.Trainer`` (and subclasses such as TRL's ``SFTTrainer``).

What it guarantees, through public hooks only (Trainer callback events and
``torch.optim.Optimizer.register_step_pre_hook``), with no sharding, DDP, DeepSpeed ZeRO-1/2/3 and FSDP2,
with gradient accumulation and gradient checkpointing:

* **One draw per optimizer step.**  ``on_step_begin`` (once per gradient-accumulation window) perturbs
  for step ``global_step``; every micro-batch and any activation recomputation sees the same noise.
  The step index is the Trainer's ``global_step`` (optimizer steps), so a resumed run continues the
  identical noise sequence.
* **Noise out before every update.**  A step pre-hook on the innermost torch optimizer restores the base
  weights right before the real update.  This is the one point every setup passes through: without
  DeepSpeed it runs inside ``trainer.optimizer.step()``; under DeepSpeed accelerate calls
  ``engine.step()`` inside ``accelerator.backward`` (before ``on_pre_optimizer_step``), and the ZeRO
  optimizer calls the torch optimizer from there (once per ZeRO-3 sub-group: the restore is
  idempotent).  ``on_pre_optimizer_step`` restores too (a no-op by then).
* **Noise out before evaluation and saves.**  The Trainer evaluates and saves in
  ``_maybe_log_save_evaluate``, which runs after ``on_step_end`` (restored here), also when a callback
  raised ``should_save``/``should_evaluate`` mid-window; ``on_evaluate`` and ``on_train_end`` restore too.
  A PEFT adapter holds only the LoRA factors, never the perturbed base, so the adapter files are the
  clean ones whenever they are written.  For a save of your own *inside* a step (a full or merged
  model, while the noise is in), wrap it in ``with callback.clean_base():``.
* **Non-finite steps skipped** (``skip_nonfinite_steps=True``, the default).  In the same pre-hook, if
  any gradient the optimizer is about to apply is NaN/inf on any rank (one all-reduce of a flag), every
  gradient is dropped (``p.grad = None``): the torch optimizer leaves the parameters and their state
  (Adam moments, step counts) untouched.  The LR scheduler is rewound at ``on_step_end`` (its
  ``state_dict`` from before the step and the param groups' learning rates), so a skipped step advances
  neither optimizer nor scheduler, as DeepSpeed's and AMP's own overflow skips do.  Steps skipped by
  DeepSpeed (non-finite gradient norm) or by the AMP grad scaler never reach the pre-hook; they are
  recognised from accelerate's public ``optimizer.step_was_skipped`` (their noise stays in until
  ``on_step_end``: nothing is updated in between).  Every skipped step (1-based, the
  ``checkpoint-N`` numbering) is listed in ``skipped_steps`` and logged as a warning.  The step still
  counts: ``global_step``, the noise schedule and the data order go on.

Not covered: a Trainer whose optimizer is not a ``torch.optim.Optimizer`` underneath (one clear error at
``on_train_begin``); saves made by your own code inside a step of a full/merged model (use
``clean_base``); an exception out of ``train()`` mid-window leaves the noise in the weights (call
``callback.restore()`` before using the model); a non-finite loss whose gradients are finite is not
skipped (the check is on what the update would apply).  ``sigma == 0`` creates no engine (plain LoRA)
and keeps the non-finite skipping.

Tested (``tests/test_user_trainers.py``, a user's script running the README's blocks): ``Trainer`` and
``SFTTrainer`` single-process and 2-rank ZeRO-3, ``Trainer`` under FSDP2 via ``accelerate launch``;
the app's tests cover FSDP1/HSDP and resumes.  ZeRO-2 was run by hand with the same worker
(``mode="zero2"``); DDP is untested here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .config import FlatLoRAConfig
from .engine import FlatLoRA
from .targets import find_targets
from .trace import NoiseTrace, trace_path

logger = logging.getLogger(__name__)

LOGGED_STATS = ("factor", "mean_row_std", "max_row_std", "fixups")
STATE_FILE = "flatlora_state.json"
"""Written into every checkpoint: ``FlatLoRA.state_dict()`` (with its ``noise_scheme``; read by a resume)."""


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce; collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that makes the real update, under any ``.optimizer`` wrappers (accelerate's
    ``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizers)."""
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"FlatLoRACallback needs a torch.optim.Optimizer under the Trainer's optimizer, found "
            f"{type(inner).__name__}; use a torch optimizer (or DeepSpeed's, which are torch optimizers)"
        )
    return inner


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite on this rank (one host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class FlatLoRACallback(TrainerCallback):
    """Drive a :class:`FlatLoRA` engine from the Trainer's events (see the module docstring).

    ``total_steps`` defaults to the Trainer's ``max_steps``.  Stats are added to the Trainer's logs
    under ``flatlora/*``; to have them reach TensorBoard too, put this callback before the reporting
    callbacks (``FlatLoRACallback.attach(trainer, cfg)`` does that).  ``skipped_steps`` lists the steps
    (1-based) whose update was skipped in this process's ``train()`` calls.
    """

    def __init__(self, config: FlatLoRAConfig | None = None, *, skip_nonfinite_steps: bool = True) -> None:
        self.config = config if config is not None else FlatLoRAConfig()
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.flat: FlatLoRA | None = None
        self.skipped_steps: list[int] = []
        self._hook: Any = None
        self._scheduler: Any = None
        self._rewind: tuple[dict, list[float]] | None = None  # set when this step's update is dropped
        self._trace: NoiseTrace | None = None  # FLATLORA_TRACE (flatlora_dist.trace)

    @classmethod
    def attach(cls, trainer, config: FlatLoRAConfig | None = None, **kwargs: Any) -> FlatLoRACallback:
        """Create the callback and register it first, so logging callbacks see its stats."""
        cb = cls(config, **kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def _go_first(self) -> None:
        """Move this callback just ahead of the first callback that writes logs (overrides ``on_log``:
        TensorBoard, wandb, the progress bar, a tool's own log writer) in the calling ``CallbackHandler``.

        transformers puts ``Trainer(callbacks=[...])`` after its reporting callbacks and gives callbacks
        no handle on the list, so the handler is found as the ``self`` of the calling frame
        (``CallbackHandler.call_event``).  Callbacks that write no logs keep their order relative to this
        one, and moving an element that was already called forward leaves the handler's running loop
        calling every later callback once.  Where no handler is found (a callback driven by hand)
        nothing changes."""
        frame = sys._getframe(1)
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler):
                break
        else:
            return
        cbs = handler.callbacks
        if self not in cbs:
            return
        mine = cbs.index(self)
        writers = [i for i, cb in enumerate(cbs[:mine]) if type(cb).on_log is not TrainerCallback.on_log]
        if writers:
            cbs.pop(mine)
            cbs.insert(writers[0], self)

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._go_first()  # also when added with trainer.add_callback after the Trainer was built
        if self.flat is None and self.config.sigma > 0:
            if model is None:
                raise ValueError("FlatLoRACallback needs the Trainer's model (on_train_begin got none)")
            cfg = self.config
            if cfg.total_steps is None:
                if not state.max_steps or state.max_steps <= 0:
                    raise ValueError("FlatLoRACallback: set FlatLoRAConfig.total_steps or the Trainer's max_steps")
                cfg = replace(cfg, total_steps=int(state.max_steps))
            self.flat = FlatLoRA(model, cfg)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if optimizer is not None:  # the Trainer always passes it; a callback driven by hand may have none
            self._hook = innermost_optimizer(optimizer).register_step_pre_hook(self._before_update)
        self._scheduler = lr_scheduler
        path = trace_path()
        if path is not None and model is not None:
            if self._trace is None:
                self._trace = NoiseTrace(path, self.flat.targets if self.flat is not None else find_targets(model))
            self._trace.begin(int(state.global_step))

    def on_step_begin(self, args, state, control, **kwargs):
        self._rewind = None
        self._restore()
        if self.flat is not None:
            self.flat.perturb(int(state.global_step))
        if self._trace is not None:
            factor = self.flat.stats()["factor"] if self.flat is not None else 0.0
            self._trace.start_step(int(state.global_step), self.config.sigma, factor)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._restore()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore()
        ours = self._rewind is not None
        if ours:
            self._rewind_scheduler(optimizer)
        if ours or bool(getattr(optimizer, "step_was_skipped", False)):
            self.skipped_steps.append(int(state.global_step))
            if state.is_world_process_zero:
                logger.warning("step %d: non-finite gradients; Flat-LoRA noise removed, optimizer and "
                               "LR-scheduler update skipped", state.global_step)  # fmt: skip

    def on_evaluate(self, args, state, control, **kwargs):
        self._restore()

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        if self._trace is not None:
            self._trace.end()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

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

    # ------------------------------------------------------------------ the update guard
    def _before_update(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook: base weights clean; on a non-finite gradient on any rank, drop every gradient.

        Collective when skipping is on: every rank's optimizer steps the same number of times."""
        self._restore()
        if not self.skip_nonfinite_steps:
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        if self._rewind is None and not any_rank(not _all_finite(params)):
            return
        if self._rewind is None:  # first call of this step (ZeRO-3 calls once per sub-group)
            sched = self._scheduler.state_dict() if self._scheduler is not None else {}
            self._rewind = (sched, [g["lr"] for g in opt.param_groups])
        for p in params:
            p.grad = None

    def _rewind_scheduler(self, optimizer: Any) -> None:
        """Put the LR scheduler and the learning rates back where they were before the skipped step."""
        sched, lrs = self._rewind
        self._rewind = None
        if self._scheduler is not None:
            self._scheduler.load_state_dict(sched)
        if optimizer is not None:
            for g, lr in zip(innermost_optimizer(optimizer).param_groups, lrs):
                g["lr"] = lr

    # ------------------------------------------------------------------ public helpers
    def restore(self) -> None:
        """Take the noise out of the base weights now, if it is in (idempotent)."""
        self._restore()

    @contextmanager
    def clean_base(self) -> Iterator[None]:
        """Base weights clean for the body, then the same step's (identical, deterministic) noise again.

        Collective on sharded models (the re-perturbation reduces row norms): call it on every rank."""
        flat = self.flat
        if flat is None or not flat.is_perturbed:
            yield
            return
        step = flat.stats()["step"]
        flat.restore()
        try:
            yield
        finally:
            flat.perturb(step)

    def _restore(self) -> None:
        if self.flat is not None and self.flat.is_perturbed:
            self.flat.restore()
