"""Interleaved step timing shared by the multi-rank benches (``ds_overhead.py``, ``fsdp_overhead.py``).

Those scripts run both as the driver (``python bench/x.py [flags]``) and as their own rank workers
(``python bench/x.py '<json args>' <out dir>``, started by ``tests/dist``'s launchers); this module sits
next to them, so ``import timing`` works either way (the script's folder is first on ``sys.path``).

- ``parse_args``: the flags both benches take, and the dict of them the workers receive.
- ``interleaved_steps``: 3 warm-up steps per arm, then Flat-LoRA and plain LoRA alternating in ABBA order,
  each step perturb + forward/backward + restore + optimizer step, timed after a barrier.
- ``step_medians``/``step_line``/``setup_line``: the per-rank medians and the report lines built from them.
- ``main_or_worker``: run the worker when started with ``<json args> <out dir>``, else the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARGS = ("pairs", "hidden", "layers", "micro", "seq")


def parse_args(doc: str | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The benches' flags; returns them and the ``{name: value}`` dict of those the workers need."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    return a, {k: getattr(a, k) for k in ARGS}


def interleaved_steps(
    flat, plain, fwd_bwd: Callable[[Any], None], opt_step: Callable[[], None], args: dict[str, Any], rank: int
) -> dict[str, list[float]]:
    """Seconds per recorded step: ``flat``/``plain`` (whole step), ``fb_flat``/``fb_plain`` (forward +
    backward), ``perturb``/``restore`` (Flat-LoRA steps only).

    ``flat``/``plain``: two FlatLoRA on the same model; ``fwd_bwd(input_ids)`` runs forward and backward,
    ``opt_step()`` the optimizer step.  Batches are random tokens below 128, seeded by ``rank``.
    """
    import torch
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {
        k: [] for k in ("flat", "plain", "perturb", "restore", "fb_flat", "fb_plain")
    }

    def step(f, i: int, record: bool) -> None:
        x = torch.randint(0, 128, (args["micro"], args["seq"]), generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        f.perturb(i)
        t1 = time.perf_counter()
        fwd_bwd(x)
        t2 = time.perf_counter()
        f.restore()
        t3 = time.perf_counter()
        opt_step()
        t4 = time.perf_counter()
        if record:
            times["flat" if f is flat else "plain"].append(t4 - t0)
            times["fb_flat" if f is flat else "fb_plain"].append(t2 - t1)
            if f is flat:
                times["perturb"].append(t1 - t0)
                times["restore"].append(t3 - t2)

    for i in range(3):
        step(flat, i, False)
        step(plain, i, False)
    order = [flat, plain, plain, flat]
    for i in range(2 * args["pairs"]):
        step(order[i % 4], 10 + i, True)
    return times


def step_medians(times: dict[str, list[float]], fwd_bwd: bool = False) -> dict[str, float]:
    """``median_<flat|plain|perturb|restore>_s`` (and ``median_fwd_bwd_<flat|plain>_s`` with ``fwd_bwd``)."""
    keys = ["flat", "plain", "perturb", "restore"]
    res = {f"median_{k}_s": statistics.median(times[k]) for k in keys}
    if fwd_bwd:
        res |= {f"median_fwd_bwd_{k}_s": statistics.median(times[f"fb_{k}"]) for k in ("flat", "plain")}
    return res


def setup_line(name: str, a: argparse.Namespace) -> str:
    """``<name>, <world> CPU ranks ..., micro-batch <micro>x<seq>, <pairs> steps per arm (ABBA)``."""
    return (f"{name}, {a.world} CPU ranks (gloo, 1 thread each), Llama hidden {a.hidden}, {a.layers} layers, "
            f"LoRA r=8 on all projections, micro-batch {a.micro}x{a.seq}, {a.pairs} steps per arm (ABBA)")  # fmt: skip


def step_line(r: dict[str, Any]) -> str:
    """One rank's step times: flat / plain, their ratio, perturb and restore and their share of a plain step."""
    ratio = r["median_flat_s"] / r["median_plain_s"]
    share = (r["median_perturb_s"] + r["median_restore_s"]) / r["median_plain_s"]
    return (
        f"rank {r['rank']}: step flat {r['median_flat_s'] * 1e3:.1f} ms / plain {r['median_plain_s'] * 1e3:.1f} ms "
        f"= ratio {ratio:.3f}; perturb {r['median_perturb_s'] * 1e3:.1f} ms, restore "
        f"{r['median_restore_s'] * 1e3:.1f} ms (= {share:.3f} x a plain step)"
    )


def main_or_worker(worker: Callable[[dict, Path], None], main: Callable[[], None]) -> None:
    """``<json args> <out dir>``: one rank, ``worker(args["bench"], out)``; anything else: ``main()``."""
    if len(sys.argv) == 3 and sys.argv[1].startswith("{"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        worker(json.loads(sys.argv[1])["bench"], Path(sys.argv[2]))
    else:
        main()
