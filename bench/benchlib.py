"""What the benches share: timing (device sync, the interleaved multi-rank step timing and its report
lines), the machine description every result records, the CPU multi-rank launcher and the models the
benches build.

Benches run as scripts, ``python bench/x.py [flags]`` (the multi-rank ones also as their own rank workers,
``python bench/x.py '<json args>' <out dir>``, started by :func:`launch`): the script's folder is first on
``sys.path``, so ``from benchlib import ...`` needs no path setup, and ``flatlora_dist`` comes from the
installed project (``make install``; :func:`launch` also puts the repository first on the workers'
``PYTHONPATH``).  Nothing here imports from ``tests/``.

- ``sync``/``machine``: device synchronisation before a clock read; "CPU model, cores, GPU, torch, threads".
- ``launch``/``worker_env``: ``world`` CPU ranks (gloo on loopback, one thread each) of a script, each
  writing ``<out>/rank<r>.json``; ``ds_env`` adds DeepSpeed's CPU settings.
- ``lora_llama``/``with_lora``/``zero3_config``/``fsdp2_wrap``: a PEFT LoRA Llama from a config (no
  download, identical on every rank), ``ds_configs/zero3.json`` with its ``auto`` values filled, FSDP2
  sharding per decoder layer.
- ``parse_args``: the flags of the multi-rank benches, and the dict of them the workers receive.
- ``interleaved_steps``: 3 warm-up steps per arm, then Flat-LoRA and plain LoRA alternating in ABBA order,
  each step perturb + forward/backward + restore + optimizer step, timed after a barrier.
- ``step_medians``/``step_line``/``setup_line``: the per-rank medians and the report lines built from them.
- ``main_or_worker``: run the worker when started with ``<json args> <out dir>``, else the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("pairs", "hidden", "layers", "micro", "seq")
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------ timing, machine
def sync(device) -> None:
    """Wait for ``device``'s queued work (a ``torch.device`` or a name such as ``"cuda:0"``); CPU: nothing."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine(gpu: bool = True, load: bool = True) -> str:
    """``<CPU model>, <n> cores[, <GPU>], torch <version>, <n> threads[, load avg at start <x>]``."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu_name = f", {torch.cuda.get_device_name()}" if gpu and torch.cuda.is_available() else ""
    avg = f", load avg at start {os.getloadavg()[0]:.1f}" if load and hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu_name}, torch {torch.__version__}, {torch.get_num_threads()} threads{avg}"


# ------------------------------------------------------------------------------------ launching ranks
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, paths: Sequence[Path] = (ROOT,)) -> dict[str, str]:
    """Environment of one CPU rank: gloo rendezvous on loopback, one thread, ``paths`` (the repository)
    first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))  # fmt: skip
    return env


def ds_env(rank: int, world: int, port: int) -> dict[str, str]:
    """:func:`worker_env` plus DeepSpeed on CPU with cached JIT builds."""
    env = worker_env(rank, world, port)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.setdefault("DS_BUILD_OPS", "0")
    return env


def launch(script: str | Path, world: int, args: dict[str, Any], *,
           env: Callable[[int, int, int], dict[str, str]] = worker_env, prefix: str = "flatlora_bench_",
           timeout: float = 600) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``script`` as ``world`` ranks (``python script '<json args>' <out dir>``, environment
    ``env(rank, world, port)``); each rank writes ``<out>/rank<r>.json`` in a temporary folder named
    ``prefix...``; return them by rank.  Raises ``RuntimeError`` with the failed ranks and every rank's
    output tail when any rank fails or times out.  The tests' multi-rank runs use this launcher too."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=prefix) as out:
        procs, logs = [], []
        for r in range(world):
            log = open(Path(out) / f"log{r}.txt", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            cmd = [sys.executable, str(script), json.dumps(args), out]
            procs.append(subprocess.Popen(cmd, env=env(r, world, port), stdout=log, stderr=subprocess.STDOUT))
        failed = []
        for r, p in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                rc = "timeout"
            if rc != 0:
                failed.append((r, rc))
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {r} ---\n" + log.read()[-6000:])
            log.close()
        if failed:
            raise RuntimeError(f"ranks failed {failed} for {args}:\n" + "\n".join(tails))
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------ models
def with_lora(model, r: int, seed: int):
    """``model`` under PEFT LoRA (rank ``r``, alpha ``2r``) on all projections, every B drawn
    N(0, 0.05²) from a generator seeded ``seed + 1`` (B = 0 would make s·BA vanish from the norms)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_PROJ))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return model


def lora_llama(dtype=None, seed: int = 0, r: int = 4, *, layers: int = 2, hidden: int = 64, inter: int = 128,
               heads: int = 4, kv_heads: int = 2, head_dim: int | None = None, max_positions: int = 64):  # fmt: skip
    """A PEFT LoRA Llama (vocabulary 128) from a config: no download, identical on every rank for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    extra = {"head_dim": head_dim} if head_dim is not None else {}
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      **extra)  # fmt: skip
    return with_lora(LlamaForCausalLM(cfg).to(dtype or torch.float32), r, seed)


def zero3_config(*, world: int, micro: int, hidden: int, persistence: int = 0) -> dict[str, Any]:
    """``ds_configs/zero3.json`` with every ``"auto"`` filled as the HF integration would (fp32, no
    clipping, one accumulation step), ``stage3_param_persistence_threshold`` = ``persistence``."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    top = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "train_batch_size": micro * world, "gradient_clipping": 0.0}  # fmt: skip
    cfg.update({k: v for k, v in top.items() if cfg.get(k) == "auto"})
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = False
    zero = cfg["zero_optimization"]
    zauto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}  # fmt: skip
    zero.update({k: v for k, v in zauto.items() if zero.get(k) == "auto"})
    zero["stage3_param_persistence_threshold"] = persistence
    return cfg


def fsdp2_wrap(model, world: int):
    """Shard ``model`` in place with FSDP2 (``fully_shard`` per decoder layer, then the whole) on a 1-D CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ------------------------------------------------------------------------------------ multi-rank step timing


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
