"""A user's own training script with ``FlatLoRACallback``: the README's "Use it with your own Trainer /
TRL" blocks, run as written, with a tiny model and data injected.  Not the app.

Used in-process by ``tests/test_user_trainers.py`` (single process) and launched as ranks (2-rank ZeRO-3
with the same rendezvous variables torchrun sets; 2-rank FSDP2 under ``accelerate launch``).  Argument 1:
a JSON spec; argument 2: the output folder, where each rank writes ``rank<r>.json``.

Spec: ``{"mode": "single" | "zero2" | "zero3" | "fsdp2", "runs": [...], "nan_step": int}``; runs: ``trainer`` runs
the README's ``Trainer`` block (with a NaN step), ``sft`` its ``SFTTrainer`` block (gradient accumulation 2,
gradient checkpointing; under ZeRO-3 with the user-style ``ds_configs/zero3.json``: ``"auto"`` values,
``"bf16": {"enabled": "auto"}``; one DeepSpeed trainer per process, as accelerate's state is per process).  ``guarded`` builds a ``Trainer`` here (checkpoints
every 2 steps, a NaN step) and runs only the README's first block (``train_flat``): under FSDP2 on CPU the
Trainer must be built after accelerate's CPU switch (``cpu_fsdp_state``), which sits between the
arguments and the Trainer.

What each run records (per rank): for two LoRA targets' base layers, a hash of the weight every forward
sees (the gathered weight under ZeRO-3, the unsharded one under FSDP2; recomputations included) keyed by
optimizer step; the step-0 weight against a single-process ``FlatLoRA`` on an unsharded copy; whether
the base is bitwise the loaded one afterwards (gathered); the skipped steps; LoRA before/after the NaN step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

DIST = Path(__file__).resolve().parent
ROOT = DIST.parents[1]
sys.path[:0] = [p for p in (str(DIST), str(ROOT)) if p not in sys.path]

import torch  # noqa: E402

README = ROOT / "README.md"
HEADING = "Use it with your own Trainer / TRL"
TARGETS = ("model.layers.0.self_attn.q_proj.base_layer", "model.layers.1.mlp.down_proj.base_layer")
STEPS = 3
GAS = 2
SIGMA = 0.1
SEED = 3


def readme_blocks() -> list[str]:
    """The python blocks of the README's section, verbatim, in order."""
    text = README.read_text()
    section = text[text.index(f"\n## {HEADING}\n") + 1 :]
    section = section[: section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def flat_config():
    from flatlora_dist import FlatLoRAConfig

    return FlatLoRAConfig(sigma=SIGMA, schedule="constant", seed=SEED)


def tiny(seed: int = 0):
    """The same PEFT LoRA tiny Llama (and byte-level tokenizer) on every rank and every call."""
    from tiny_lora import with_lora

    from flatlora_dist.train.tiny import build_tiny_llama

    model, tok = build_tiny_llama(seed=seed)
    model.train()
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    return with_lora(model, 4, seed), tok


def token_data(n: int, length: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 260, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def text_data(n: int):
    from datasets import Dataset

    words = ["flat", "minima", "low", "rank", "noise", "shard", "row", "norm", "step", "adapter"]
    texts = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(6 + i % 5)) for i in range(n)]
    return Dataset.from_dict({"text": texts})


def digest(t: torch.Tensor) -> str:
    """Hash of the raw bytes, from a copy (``numpy()`` would pin FSDP2's unsharded storage: it must stay
    resizable for the reshard after forward)."""
    raw = t.detach().clone().contiguous().view(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's stored part of a parameter (ZeRO-3 partition, FSDP2 shard, or the tensor)."""
    if getattr(p, "ds_tensor", None) is not None:
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def lora_params(model) -> list[torch.Tensor]:
    return [p for n, p in sorted(model.named_parameters()) if "lora_" in n]


class Probe:
    """Hooks on a model (no Trainer internals): counts micro-batches at the root's forward, hashes the
    weight each target base layer's forward sees, injects a NaN into one step's activations, and keeps
    the step-0 weight and LoRA snapshots around the NaN step."""

    def __init__(self, model, nan_step: int | None = None) -> None:
        self.micro = 0
        self.seen: dict[str, dict[int, list[str]]] = {t: {} for t in TARGETS}
        self.step0: dict[str, torch.Tensor] = {}
        self.lora_at: dict[int, list[torch.Tensor]] = {}
        self.nan_step = nan_step
        self.model = model
        model.register_forward_pre_hook(self._root)
        mods = dict(model.named_modules())
        for t in TARGETS:
            (name,) = [n for n in mods if n.endswith(t)]
            mods[name].register_forward_hook(self._base(t))
        (mlp,) = [m for n, m in mods.items() if n.endswith("model.layers.0.mlp")]
        mlp.register_forward_hook(self._nan)

    @property
    def step(self) -> int:
        return (self.micro - 1) // GAS

    def _root(self, module, args) -> None:
        self.micro += 1
        if (self.micro - 1) % GAS == 0 and self.nan_step is not None and self.step in (self.nan_step, self.nan_step + 1):
            self.lora_at[self.step] = [local(p).detach().clone() for p in lora_params(self.model)]

    def _base(self, target: str):
        def hook(module, args, out) -> None:
            w = module.weight
            self.seen[target].setdefault(self.step, []).append(digest(w))
            if self.step == 0 and target not in self.step0:
                self.step0[target] = w.detach().clone()

        return hook

    def _nan(self, module, args, out):
        return out + float("nan") if self.step == self.nan_step else None

    def report(self, reference: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> dict[str, Any]:
        rec: dict[str, Any] = {"micro": self.micro}
        for t in TARGETS:
            fwd, ref, cl = self.step0[t], reference[t], clean[t]
            rec[t] = {
                "hashes": {str(s): h for s, h in self.seen[t].items()},
                "clean": digest(cl),
                "step0_max_diff": float((fwd.double() - ref.double()).abs().max()),
                "step0_noise": float((ref.double() - cl.double()).abs().max()),
                "step0_bitwise": bool(torch.equal(fwd, ref)),
            }
        if self.nan_step is not None:
            a, b = self.lora_at[self.nan_step], self.lora_at[self.nan_step + 1]
            rec["lora_unchanged_over_nan_step"] = all(torch.equal(x, y) for x, y in zip(a, b))
        return rec


def reference(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Single-process FlatLoRA on an unsharded copy: (step-0 perturbed target weights, clean target
    weights, every clean base weight by name)."""
    from flatlora_dist import FlatLoRA

    model, _ = tiny(seed)
    mods = dict(model.named_modules())
    names = {t: next(n for n in mods if n.endswith(t)) for t in TARGETS}
    clean_all = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    clean = {t: mods[names[t]].weight.detach().clone() for t in TARGETS}
    flat = FlatLoRA(model, replace(flat_config(), total_steps=STEPS))
    flat.perturb(0)
    pert = {t: mods[names[t]].weight.detach().clone() for t in TARGETS}
    flat.restore()
    return pert, clean, clean_all


def base_unchanged(model, clean_all: dict[str, torch.Tensor], mode: str) -> bool:
    """Every base weight, gathered, bitwise equal to the loaded one (collective when sharded)."""
    params = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    assert params.keys() == clean_all.keys(), sorted(params.keys() ^ clean_all.keys())
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return all(torch.equal(p.detach(), clean_all[n]) for n, p in params.items())
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in params.items()}
    return all(torch.equal(t, clean_all[n]) for n, t in full.items())


def settings(mode: str) -> dict[str, Any]:
    """What the harness injects into the README blocks besides model and data."""
    ds = str(ROOT / "ds_configs" / f"{mode}.json") if mode in ("zero2", "zero3") else None
    return {"steps": STEPS, "ds_config": ds, "cpu_only": not torch.cuda.is_available()}


def run_readme(kind: str, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The README's ``train_flat`` block, then its ``Trainer`` (``kind="trainer"``, with the spec's NaN
    step) or ``SFTTrainer`` block (``kind="sft"``), as written."""
    define, *blocks = readme_blocks()
    mode = spec["mode"]
    ref, clean, clean_all = reference()
    model, tok = tiny()
    probe = Probe(model, spec["nan_step"] if kind == "trainer" else None)
    n = STEPS * GAS * 2 * int(os.environ.get("WORLD_SIZE", "1"))
    ns: dict[str, Any] = {"out": str(out), "model": model, "tokenizer": tok, **settings(mode),
                          **({"dataset": token_data(n)} if kind == "trainer" else {"texts": text_data(n)})}  # fmt: skip
    exec(define, ns)
    given = ns["train_flat"]  # the README's default config (cosine) has no noise at step 0: constant here
    ns["train_flat"] = lambda trainer: given(trainer, flat_config())
    exec(blocks[0 if kind == "trainer" else 1], ns)
    flat = ns["flat"]
    rec = probe.report(ref, clean)
    rec["base_unchanged"] = base_unchanged(model, clean_all, mode)
    rec["skipped_steps"] = flat.skipped_steps
    rec["perturbed_after"] = bool(flat.flat.is_perturbed)
    rec["backends"] = flat.flat.stats()["backends"]
    rec["lora_finite"] = all(bool(torch.isfinite(local(p)).all()) for p in lora_params(model))
    return rec


def run_guarded(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """A Trainer built here (checkpoints every 2 steps, a NaN step), run by the README's ``train_flat``."""
    from transformers import Trainer, TrainingArguments

    define = readme_blocks()[0]
    mode = spec["mode"]
    ref, clean, clean_all = reference()
    model, _ = tiny()
    probe = Probe(model, spec["nan_step"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=str(out / "guarded"), max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=GAS, gradient_checkpointing=False,
                             save_steps=2, report_to="none", logging_steps=1, learning_rate=1e-3,
                             warmup_steps=0, use_cpu=True)  # fmt: skip
    if mode == "fsdp2":
        from flatlora_dist.train.fsdp_args import cpu_fsdp_state

        cpu_fsdp_state(args, "fsdp2")  # CPU only: accelerate 1.15 drops FSDP under gloo (see fsdp_args)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(STEPS * GAS * 2 * world))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    saves: list[bool] = []  # per state_dict() of the model (every save): is the base clean right then?
    if mode == "single":
        from transformers import TrainerCallback

        class SaveMidWindow(TrainerCallback):
            """Asks for a save in the middle of step 0's window (the Trainer saves at the step's end)."""

            def on_substep_end(self, args, state, control, **kwargs):
                if state.global_step == 0:
                    control.should_save = True

        def snap(module, a) -> None:  # LoRA after 2 updates: at the first forward of step 2
            if probe.micro == 2 * GAS + 1:
                snapshots[2] = {n.replace(".default", ""): p.detach().clone()
                                for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip

        target = next(m for n, m in model.named_modules() if n.endswith(TARGETS[0]))
        model.register_forward_pre_hook(snap)
        model.register_state_dict_pre_hook(lambda m, prefix, keep: saves.append(digest(target.weight) == digest(clean[TARGETS[0]])))
        trainer.add_callback(SaveMidWindow())
    ns: dict[str, Any] = {}
    exec(define, ns)
    flat = ns["train_flat"](trainer, flat_config())
    rec = probe.report(ref, clean)
    rec["base_unchanged"] = base_unchanged(trainer.model, clean_all, mode)
    rec["skipped_steps"] = flat.skipped_steps
    rec["backends"] = flat.flat.stats()["backends"]
    rec["lora_finite"] = all(bool(torch.isfinite(local(p)).all()) for p in lora_params(trainer.model))
    if mode == "single":
        from safetensors.torch import load_file

        saved = load_file(str(out / "guarded" / "checkpoint-2" / "adapter_model.safetensors"))
        rec["checkpoint2_equals_lora"] = saved.keys() == snapshots[2].keys() and all(
            torch.equal(saved[k], snapshots[2][k]) for k in saved
        )
        rec["checkpoints"] = sorted(p.name for p in (out / "guarded").glob("checkpoint-*"))
        rec["saves_saw_clean_base"] = saves
        inner = trainer.optimizer.optimizer
        rec["adam_steps"] = sorted({int(s["step"]) for s in inner.state.values()})
        rec["scheduler_epoch"] = trainer.lr_scheduler.state_dict()["last_epoch"]
    return rec


def run(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every run of ``spec`` in this process; returns (and, launched, writes) this rank's record."""
    torch.set_num_threads(1)
    if spec["mode"] in ("zero2", "zero3"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments on CPU
    rec = {}
    for name in spec["runs"]:
        out_run = out / name  # one folder for all ranks
        rec[name] = run_guarded(spec, out_run) if name == "guarded" else run_readme(name, spec, out_run)
    return rec


def main() -> None:
    spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    rec = run(spec, out / "work")
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
