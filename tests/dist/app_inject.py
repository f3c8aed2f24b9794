"""Fault injection and per-step recording for runs of the training application (``main([...])``).

Used in-process by the app tests and in subprocesses by ``app_run.py``.  ``hook(spec)`` is a function
for ``main(argv, extra_callbacks=[hook(spec)])`` that gives the Trainer the app builds:

- a record (JSONL, one file per rank: ``spec["record"]`` with ``{rank}`` filled) of every micro-batch
  (optimizer step, index in the window, sha256 of its ``input_ids``: the data order), of the noise
  actually in the base weights at each step (``sum((W' - W)^2)`` over this rank's stored base
  elements), and of every log line (loss, learning rate, ``flatlora/*``);
- ``actions``: ``{"step": global step at step begin, "micro": 1-based micro-batch (default 1),
  "rank": rank (default every rank), "do": ...}`` where ``do`` is one of

  - ``sigkill`` / ``sigterm``: the process sends itself the signal mid-window, noise in the weights;
  - ``sigterm_launcher``: SIGTERM to the parent process (the torchrun agent, which forwards it to every
    rank's process group), then a 3 s wait so the forwarded signal lands within this step;
  - ``nan_loss``: a forward hook puts NaN into one decoder layer's output for that micro-batch (the
    loss and every gradient become non-finite);
  - ``inf_norm``: a LoRA B entry is inf while Flat-LoRA computes the step's row norms, finite again
    for the forward (the engine must skip the perturbation, nothing else);
  - ``save_mid``: ``trainer.save_model(<record dir>/mid-save)`` mid-window (noise in the weights);
  - ``should_save``: ``control.should_save = True`` mid-window (the Trainer saves at the step's end).

Every save (``PeftModel.save_pretrained``: checkpoints, mid-window saves, the final adapter) is
recorded with whether Flat-LoRA was perturbed and the base fingerprint at that moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _base_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad and "base_layer" in n}


def _stored(p: torch.Tensor) -> torch.Tensor:
    from flatlora_dist.shards import make_backend, param_kind

    return make_backend(param_kind(p), None).local_storage(p)


class Recorder:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.path = Path(spec["record"].format(rank=_rank())) if spec.get("record") else None
        self.actions = [a for a in spec.get("actions", []) if a.get("rank") in (None, _rank())]
        self.trainer = None
        self.clean: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.step = 0

    def write(self, **rec: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def due(self, what: str, micro: int | None = None) -> list[dict]:
        return [a for a in self.actions if a["do"] == what and a["step"] == self.step
                and (micro is None or a.get("micro", 1) == micro)]  # fmt: skip

    # ---- what the base weights hold
    def noise(self) -> float:
        model = self.trainer.model
        total = 0.0
        for n, p in _base_params(model).items():
            d = _stored(p).detach().double() - self.clean[n].double()
            total += float((d * d).sum())
        return total

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, p in sorted(_base_params(self.trainer.model).items()):
            h.update(n.encode())
            h.update(_stored(p).detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _callbacks(rec: Recorder):
    from transformers import TrainerCallback

    class Before(TrainerCallback):
        """Runs before FlatLoRACallback: ``inf_norm`` before its perturbation; records whether the
        noise is still in the weights when the Trainer reaches the optimizer step (under DeepSpeed the
        engine has stepped by then)."""

        def on_step_begin(self, args, state, control, **kw):
            rec.step = state.global_step
            rec.micro = 0
            rec.saved_b = []
            for _ in rec.due("inf_norm"):
                for n, p in rec.trainer.model.named_parameters():
                    if "lora_B" in n:
                        rec.saved_b.append((p, p.data.view(-1)[0].item()))
                        p.data.view(-1)[0] = float("inf")
                        break

        def on_pre_optimizer_step(self, args, state, control, **kw):
            flat = rec.trainer.flat_callback.flat if rec.trainer.flat_callback is not None else None
            rec.write(
                kind="pre_opt", step=state.global_step, perturbed=bool(flat is not None and flat.is_perturbed)
            )

    class After(TrainerCallback):
        """Runs after FlatLoRACallback (noise is in the weights at step begin)."""

        def on_train_begin(self, args, state, control, **kw):
            rec.clean = {n: _stored(p).detach().clone() for n, p in _base_params(rec.trainer.model).items()}
            rec.write(kind="begin", step=state.global_step, fingerprint=rec.fingerprint())
            _spy_saves(rec, rec.trainer)

        def on_substep_end(self, args, state, control, **kw):
            if rec.due("should_save", rec.micro):
                control.should_save = True

        def on_step_begin(self, args, state, control, **kw):
            for p, v in rec.saved_b:
                p.data.view(-1)[0] = v
            flat = rec.trainer.flat_callback.flat if rec.trainer.flat_callback is not None else None
            rec.write(kind="noise", step=state.global_step, value=rec.noise(),
                      perturbed=bool(flat is not None and flat.is_perturbed))  # fmt: skip

        def on_log(self, args, state, control, logs=None, **kw):
            rec.write(kind="log", step=state.global_step, logs=dict(logs or {}))

    return Before(), After()


def _wrap_training_step(rec: Recorder, trainer) -> None:
    step_fn = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        rec.micro += 1
        ids = inputs["input_ids"].detach().cpu().contiguous()
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        rec.write(kind="micro", step=rec.step, micro=rec.micro, data=digest)
        for _ in rec.due("sigkill", rec.micro):
            os.kill(os.getpid(), signal.SIGKILL)
        for _ in rec.due("sigterm", rec.micro):
            os.kill(os.getpid(), signal.SIGTERM)
        for _ in rec.due("sigterm_launcher", rec.micro):
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(3)
        for _ in rec.due("save_mid", rec.micro):
            _save_mid(rec, trainer)
        hooks = []
        for _ in rec.due("nan_loss", rec.micro):
            layer = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.mlp"))
            hooks.append(layer.register_forward_hook(lambda m, i, o: o + float("nan")))
        try:
            return step_fn(model, inputs, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    trainer.training_step = training_step


def _spy_saves(rec: Recorder, trainer) -> None:
    peft_model = trainer.model
    save = peft_model.save_pretrained

    def spy(*args, **kwargs):
        flat = trainer.flat_callback.flat if trainer.flat_callback is not None else None
        rec.write(kind="save", step=rec.step, micro=rec.micro, target=str(args[0] if args else kwargs.get("save_directory")),
                  perturbed=bool(flat is not None and flat.is_perturbed), fingerprint=rec.fingerprint(),
                  noise=rec.noise())  # fmt: skip
        return save(*args, **kwargs)

    peft_model.save_pretrained = spy


def _save_mid(rec: Recorder, trainer) -> None:
    flat = trainer.flat_callback.flat
    before = rec.noise()
    was = flat.is_perturbed
    trainer.save_model(str(rec.path.parent / "mid-save"))
    rec.write(kind="save_mid", step=rec.step, perturbed_before=was, noise_before=before,
              noise_after=rec.noise(), perturbed_after=flat.is_perturbed)  # fmt: skip


def hook(spec: dict[str, Any]):
    """The recorder and fault injection of ``spec``, as an ``extra_callbacks`` entry of ``main``."""

    def add(trainer) -> None:
        rec = Recorder(spec)
        rec.trainer = trainer
        before, after = _callbacks(rec)
        trainer.callback_handler.callbacks.insert(0, before)
        trainer.add_callback(after)
        _wrap_training_step(rec, trainer)

    return add


def read_records(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
