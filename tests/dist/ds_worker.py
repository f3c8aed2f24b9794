"""One rank of a DeepSpeed Flat-LoRA check; driven by tests/test_deepspeed.py through ds_common.launch.

argv: ``<json args> <out dir>``; writes ``<out dir>/rank<r>.json`` with what it measured.  Args:

- ``config``: ds_configs file name (``zero2``, ``zero3``, ``zero3_offload``); ``dtype``: fp32 | bf16;
  ``persistence``: stage3_param_persistence_threshold (``null``: HF auto = 10·hidden).
- ``checks``: which of ``perturbation``, ``train``, ``cycles``, ``adapter``, ``functional`` to run.
- ``garbage``: fill ZeRO-3 partition padding with NaN first (it must never reach a norm or a weight).
- ``small_blocks``: shrink NOISE_BLOCK / NORM_CHUNK so the memory bound is smaller than a weight.
- ``gas``: gradient accumulation steps (one noise draw per optimizer step spans them all).
- ``instrument``: count all-reduces and track allocations inside perturb()/restore() while training.
- ``wrap``: ``engine`` (default) or ``module``: what FlatLoRA is given (both are built and compared).

Each check compares against a plain single-process model of the same seed, built in this process.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from ds_common import load_ds_config, tiny_model
from tiny_lora import capture_input_grad
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flatlora_dist.noise as noise_mod
import flatlora_dist.shards.base as base_mod
from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.inplace import NoiseKey
from flatlora_dist.checkpoint import gathered_lora_state_dict

SEED, SIGMA, LR, SEQ = 1234, 0.2, 1e-2, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- helpers
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def gathered(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full copies of (possibly ZeRO-3) params, collective; read-only gather.  Params already gathered
    (persistent ones after a forward) are read in place and left gathered."""
    zp = [p for p in params.values() if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    with deepspeed.zero.GatheredParameters(zp, modifier_rank=None, enabled=bool(zp)):
        return {n: p.data.detach().clone() for n, p in params.items()}


def base_weights(flat: FlatLoRA) -> dict[str, torch.Tensor]:
    return {t.name: t.weight for t in flat.targets}


def sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        h.update(n.encode())
        h.update(bits(tensors[n]).view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batch(step: int, rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + 97 * step + rank)
    return torch.randint(0, 128, (micro, SEQ), generator=g)


def make_engine(args: dict):
    world = dist.get_world_size() if dist.is_initialized() else 1
    dtype = DTYPES[args["dtype"]]
    cfg = load_ds_config(
        args["config"], world=world, micro=args.get("micro", 2), gas=args.get("gas", 1), dtype=args["dtype"],
        persistence=args.get("persistence"),
    )
    model = tiny_model(dtype, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def flat_config(sigma: float = SIGMA, mode: str = "inplace") -> FlatLoRAConfig:
    return FlatLoRAConfig(sigma=sigma, total_steps=5, schedule="constant", seed=SEED, mode=mode)


class RegionLog:
    """Wraps ``backend.begin_write`` to record how many regions each write phase got (1 or 2)."""

    def __init__(self, flat: FlatLoRA) -> None:
        self.counts: list[int] = []
        for backend in flat._backends.values():
            orig = backend.begin_write

            def wrapped(target, phase, _orig=orig):
                regs = _orig(target, phase)
                self.counts.append(len(regs))
                return regs

            backend.begin_write = wrapped


# ---------------------------------------------------------------------------------------------- check 1
def reference_model(engine):
    """A plain single-process model with the engine's base weights (same seed) and its current LoRA
    weights (gathered: collective; call it while no ZeRO-3 gather is in flight)."""
    ref = tiny_model(DTYPES_OF[id(engine)], seed=0)
    lora = gathered({n: p for n, p in engine.module.named_parameters() if p.requires_grad})
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(lora[n])
    return ref


def check_perturbation(engine, flat: FlatLoRA, step: int, tag: str) -> dict:
    """Gathered W'-W under DeepSpeed vs the plain single-process engine on the same weights."""
    ref = reference_model(engine)
    ref_flat = FlatLoRA(ref, flat.config)
    w0 = gathered(base_weights(flat))
    ref0 = {t.name: t.weight.detach().clone() for t in ref_flat.targets}
    assert all(torch.equal(bits(w0[n]), bits(ref0[n])) for n in w0), "ZeRO weights differ from the reference"
    flat.perturb(step)
    std = flat._norms.clone()
    w1 = gathered(base_weights(flat))
    ref_flat.perturb(step)
    ref_std = ref_flat._norms.clone()
    ref1 = {t.name: t.weight.detach().clone() for t in ref_flat.targets}
    out = {
        "std_max_rel": float(((std - ref_std).abs() / ref_std.abs().clamp_min(1e-30)).max()),
        "std_finite": bool(torch.isfinite(std).all()),
        "noise_bit_identical": True,
        "pert_max_abs_diff": 0.0,
        "pert_max_abs": 0.0,
    }
    for t in flat.targets:
        n, m = t.name, t.layout.out_features
        key = NoiseKey(SEED, step, n, t.layout, std[t.offset : t.offset + m], fused=flat.scheme == "fused")
        e = torch.cat([z for _, z in key.chunks(0, t.layout.numel, torch.device("cpu"))])
        cd = torch.float64 if w0[n].dtype == torch.float64 else torch.float32
        expect = (w0[n].reshape(-1).to(cd) + e).to(w0[n].dtype)
        if not torch.equal(bits(expect), bits(w1[n].reshape(-1))):
            out["noise_bit_identical"] = False
        d, dr = (w1[n].float() - w0[n].float()), (ref1[n].float() - ref0[n].float())
        out["pert_max_abs_diff"] = max(out["pert_max_abs_diff"], float((d - dr).abs().max()))
        out["pert_max_abs"] = max(out["pert_max_abs"], float(dr.abs().max()))
    flat.restore()
    ref_flat.restore()
    w2 = gathered(base_weights(flat))
    out["restored_bitwise"] = sha(w2) == sha(w0)
    return {f"{tag}.{k}": v for k, v in out.items()}


DTYPES_OF: dict[int, torch.dtype] = {}


def poison_padding(flat: FlatLoRA) -> int:
    """Write NaN into every ZeRO-3 partition's padding tail; return how many elements were poisoned."""
    n = 0
    for t in flat.targets:
        w = t.weight
        if not hasattr(w, "ds_tensor"):
            continue
        ds = w.ds_tensor.data.view(-1)
        start = w.ds_zero_partition_rank * ds.numel()
        valid = max(0, min(ds.numel(), w.ds_numel - start))
        ds[valid:] = float("nan")
        n += ds.numel() - valid
    return n


# ---------------------------------------------------------------------------------------------- instrumentation
class AllocTracker(TorchDispatchMode):
    """Largest fresh storage (bytes) produced by any op, by phase; outputs aliasing an input are not new."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.max_bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                nb = t.untyped_storage().nbytes()
                self.max_bytes[self.phase] = max(self.max_bytes.get(self.phase, 0), nb)
        return out


@contextmanager
def instrumented(flat: FlatLoRA, counts: dict, tracker: AllocTracker | None):
    """Count torch.distributed.all_reduce calls inside perturb()/restore(); track allocations there."""
    real_ar = dist.all_reduce
    phase = {"name": None}

    def counting_all_reduce(*a, **k):
        if phase["name"]:
            counts[phase["name"]] = counts.get(phase["name"], 0) + 1
        return real_ar(*a, **k)

    gp = deepspeed.zero.GatheredParameters
    real_enter = gp.__enter__

    def enter(self):
        if tracker is not None and phase["name"]:
            tracker.phase = "lora_gather"
        try:
            return real_enter(self)
        finally:
            if tracker is not None and phase["name"]:
                tracker.phase = phase["name"]

    def wrap(fn, name):
        def inner(*a, **k):
            phase["name"] = name
            if tracker is not None:
                tracker.phase = name
                with tracker:
                    r = fn(*a, **k)
            else:
                r = fn(*a, **k)
            phase["name"] = None
            if tracker is not None:
                tracker.phase = "other"
            return r

        return inner

    orig_p, orig_r = flat.perturb, flat.restore
    dist.all_reduce, gp.__enter__ = counting_all_reduce, enter
    flat.perturb, flat.restore = wrap(orig_p, "perturb"), wrap(orig_r, "restore")
    try:
        yield
    finally:
        dist.all_reduce, gp.__enter__ = real_ar, real_enter
        flat.perturb, flat.restore = orig_p, orig_r


# ---------------------------------------------------------------------------------------------- check 3/4
def optimizer_step(engine, flat: FlatLoRA, step: int, xs: list[torch.Tensor]) -> torch.Tensor:
    """One optimizer step of DeepSpeed gradient accumulation under one noise draw: perturb before the
    first micro-batch, restore after the last backward and before that micro-batch's ``engine.step()``
    (the boundary one, which updates the LoRA weights).  Returns the mean micro-batch loss."""
    losses = []
    flat.perturb(step)
    try:
        for k, x in enumerate(xs):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            losses.append(loss.detach().float())
            if k == len(xs) - 1:
                flat.restore()
            engine.step()
    finally:
        if flat.is_perturbed:
            flat.restore()
    return torch.stack(losses).mean()


def train_ds(engine, flat: FlatLoRA, steps: int, micro: int, gas: int, instrument: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    counts: dict[str, int] = {}
    tracker = AllocTracker() if instrument else None
    losses = []
    ctx = instrumented(flat, counts, tracker) if instrument else _null()
    with ctx:
        for step in range(steps):
            xs = [batch(step * gas + k, rank, micro) for k in range(gas)]
            mean = optimizer_step(engine, flat, step, xs)
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
    if tracker is not None:  # control: the tracker does see a gathered full weight
        tracker.phase = "control"
        with tracker:
            gathered(base_weights(flat))
    out = {"ds_losses": losses, "allreduce_counts": counts, "norm_allreduces": flat.stats()["norm_allreduces"]}
    if tracker is not None:
        out["max_alloc_bytes"] = tracker.max_bytes
    return out


@contextmanager
def _null():
    yield


def train_ref(steps: int, micro: int, gas: int, world: int, sigma: float, dtype) -> tuple[list[float], dict]:
    """Single-process Flat-LoRA on the same global batch (plain torch loop, ``gas`` micro-batches of all
    ranks' data concatenated, gradients averaged over them)."""
    model = tiny_model(dtype, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    flat = FlatLoRA(model, flat_config(sigma))
    losses = []
    for step in range(steps):
        total = 0.0
        with flat.perturbed(step):
            for k in range(gas):
                x = torch.cat([batch(step * gas + k, r, micro) for r in range(world)])
                loss = model(input_ids=x, labels=x).loss
                (loss / gas).backward()
                total += float(loss) / gas
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def partition_numel(flat: FlatLoRA) -> int:
    return max(t.weight.ds_tensor.numel() if hasattr(t.weight, "ds_tensor") else t.weight.numel() for t in flat.targets)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    args, out_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.get("small_blocks"):
        noise_mod.NOISE_BLOCK = base_mod.NORM_CHUNK = args["small_blocks"]
    engine, _ = make_engine(args)
    DTYPES_OF[id(engine)] = DTYPES[args["dtype"]]
    res: dict = {"rank": rank, "world": world}
    flat = FlatLoRA(engine, flat_config())
    module_flat = FlatLoRA(engine.module, flat_config())
    if args.get("wrap") == "module":
        flat, module_flat = module_flat, flat
    res["backends"] = flat.stats()["backends"]
    res["names_equal_engine_vs_module"] = [t.name for t in flat.targets] == [t.name for t in module_flat.targets]
    res["names"] = [t.name for t in flat.targets]
    res["state_bytes"] = flat.stats()["state_bytes"]
    res["partition_numel"] = partition_numel(flat)
    res["weight_numel"] = max(t.layout.numel for t in flat.targets)
    log = RegionLog(flat)
    if args.get("garbage"):
        res["poisoned"] = poison_padding(flat)
    checks = args["checks"]
    if "perturbation" in checks:
        res.update(check_perturbation(engine, flat, 3, "cold"))  # nothing gathered: partitions only
        res["cold.regions"] = sorted(set(log.counts))
        log.counts.clear()
        with torch.no_grad():  # forwards after the first (trace recording) leave persistent params gathered
            for _ in range(3):
                x = batch(0, rank, 2)
                engine(input_ids=x, labels=x)
        res["warm.gathered_before"] = sum(
            t.weight.ds_status.name == "AVAILABLE" for t in flat.targets if hasattr(t.weight, "ds_status")
        )
        res.update(check_perturbation(engine, flat, 4, "warm"))
        res["warm.regions"] = sorted(set(log.counts))
    if "train" in checks:
        steps, micro, gas = args.get("steps", 5), args.get("micro", 2), args.get("gas", 1)
        res.update(train_ds(engine, flat, steps, micro, gas, instrument=args.get("instrument", False)))
        res["alloc_bound_bytes"] = 4 * (partition_numel(flat) + noise_mod.NOISE_BLOCK)
        res["lora_numel"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)
        ref_losses, ref_lora = train_ref(steps, micro, gas, world, SIGMA, DTYPES[args["dtype"]])
        plain_losses, _ = train_ref(steps, micro, gas, world, 0.0, DTYPES[args["dtype"]])
        res["ref_losses"], res["plain_losses"] = ref_losses, plain_losses
        sd = gathered_lora_state_dict(engine)
        res["lora_max_abs_diff_vs_ref"] = max(float((sd[n].float() - ref_lora[n].float()).abs().max()) for n in ref_lora)
        res["lora_keys_equal_ref"] = sorted(sd) == sorted(ref_lora)
    if "cycles" in checks:
        res.update(check_cycles(engine, flat, args.get("cycles", 20), args.get("gas", 1)))
    if "adapter" in checks:
        res.update(check_adapter(engine, out_dir))
    if "functional" in checks:
        res.update(check_functional(engine, flat, args.get("gas", 1)))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()


def check_cycles(engine, flat: FlatLoRA, cycles: int, gas: int) -> dict:
    """perturb / forward / backward / restore / step, ``cycles`` times; base weights must not move."""
    rank = dist.get_rank()
    before = sha(gathered(base_weights(flat)))
    lora0 = sha(gathered({n: p for n, p in engine.module.named_parameters() if p.requires_grad}))
    fixups = dirty = 0
    for step in range(cycles):
        xs = [batch(100 + step * gas + k, rank, 2) for k in range(gas)]
        with flat.perturbed(step):
            for x in xs[:-1]:
                engine.backward(engine(input_ids=x, labels=x).loss)
                engine.step()  # not an accumulation boundary
            engine.backward(engine(input_ids=xs[-1], labels=xs[-1]).loss)
            fixups += flat.stats()["fixups"]
        dirty += sha(gathered(base_weights(flat))) != before  # reads gathered (persistent) copies in place
        engine.step()
    after = sha(gathered(base_weights(flat)))
    lora1 = sha(gathered({n: p for n, p in engine.module.named_parameters() if p.requires_grad}))
    return {"cycles.bitwise": before == after, "cycles.lora_trained": lora0 != lora1, "cycles.fixups": fixups, "cycles.dirty": dirty}


def check_adapter(engine, out_dir: Path) -> dict:
    """gathered_lora_state_dict -> PEFT save_pretrained on rank 0 -> PeftModel.from_pretrained."""
    from peft import PeftModel

    rank = dist.get_rank()
    sd = gathered_lora_state_dict(engine)
    direct = gathered({n: p for n, p in engine.module.named_parameters() if p.requires_grad})
    res = {
        "adapter.nonempty": bool(sd) and all(v.numel() > 0 for v in sd.values()),
        "adapter.equal_gathered": sorted(sd) == sorted(direct) and all(torch.equal(sd[n], direct[n]) for n in sd),
        "adapter.sha": sha(sd),
    }
    sd0 = gathered_lora_state_dict(engine, rank0_only=True)
    res["adapter.rank0_only_len"] = len(sd0)
    path = out_dir / "adapter"
    if rank == 0:
        engine.module.save_pretrained(str(path), state_dict=sd)
        loaded = PeftModel.from_pretrained(tiny_model(sd[next(iter(sd))].dtype, seed=0).get_base_model(), str(path))
        got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
        res["adapter.loaded_equal"] = sorted(got) == sorted(sd) and all(torch.equal(got[n], sd[n]) for n in sd)
        res["adapter.files"] = sorted(p.name for p in path.iterdir())
    dist.barrier()
    return res


GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
"""fp32; the reference's row norms are summed in another order than the 2 ranks' all-reduce (std equal to
~1e-7 relative), and its LoRA gradients are averaged over ranks by hand."""


def reference_grads(engine, x_of_rank: list[torch.Tensor], sigma: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Single process, in place, same LoRA weights and step: LoRA gradients averaged over the ranks'
    batches (what data parallelism computes) and this rank's input gradient."""
    rank = dist.get_rank()
    ref = reference_model(engine)
    ref_flat = FlatLoRA(ref, flat_config(sigma))
    handle, store = capture_input_grad(ref)
    with ref_flat.perturbed(2):
        for q, x in enumerate(x_of_rank):
            (ref(input_ids=x, labels=x).loss / len(x_of_rank)).backward()
            if q == rank:
                dx_index = len(store) - 1
    handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    return grads, store[dx_index].grad * len(x_of_rank)  # undo the 1/world of the averaged loss


def check_functional(engine, flat: FlatLoRA, gas: int) -> dict:
    """Functional mode reads the gathered weight inside forward and backward: same loss as in place, and
    LoRA A/B gradients (full, ``safe_get_full_grad``) and the input gradient equal a single-process
    in-place reference at the same step (``GRAD_TOL``); without noise they would differ.

    Run after an evaluation-style forward without backward, which leaves ZeRO-3 prefetches in flight.
    """
    from deepspeed.utils import safe_get_full_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    func = FlatLoRA(engine, flat_config(mode="functional"))
    x = batch(7, rank, 2)
    xs = [batch(7, q, 2) for q in range(world)]
    want, want_dx = reference_grads(engine, xs, SIGMA)  # before the forward that leaves gathers in flight
    clean, _ = reference_grads(engine, xs, 0.0)
    with torch.no_grad():
        engine(input_ids=x, labels=x)
    status = [p.ds_status.name for p in engine.module.parameters() if hasattr(p, "ds_status")]
    bases = [t.weight.ds_status.name for t in flat.targets if hasattr(t.weight, "ds_status")]
    with torch.no_grad(), flat.perturbed(2):
        out = {"functional.inplace_loss": float(engine(input_ids=x, labels=x).loss)}
    out["functional.inflight_before"] = status.count("INFLIGHT")
    out["functional.base_not_partitioned_before"] = len(bases) - bases.count("NOT_AVAILABLE")
    handle, store = capture_input_grad(engine.module)
    with func.perturbed(2):
        for k in range(gas):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            if k < gas - 1:
                engine.step()  # not an accumulation boundary
    handle.remove()
    lora = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    grads = {n: safe_get_full_grad(p) for n, p in lora.items()}  # collective: every rank, same order
    got_dx = store[-1].grad * gas  # engine.backward scales each micro-batch's loss by 1/gas
    out["functional.functional_loss"] = float(loss)
    out["functional.lora_grads"] = sum(g is not None for g in grads.values())
    out["functional.lora_grads_close"] = grads.keys() == want.keys() and all(
        g is not None and torch.allclose(g.float(), want[n], **GRAD_TOL) for n, g in grads.items()
    )
    out["functional.input_grad_close"] = torch.allclose(got_dx, want_dx, **GRAD_TOL)
    diff = max(float((grads[n].float() - want[n]).abs().max()) for n in want if grads[n] is not None)
    noise = max(float((want[n] - clean[n]).abs().max()) for n in want)
    out["functional.lora_grad_max_abs_diff"], out["functional.noise_grad_effect"] = diff, noise
    engine.step()
    return out


if __name__ == "__main__":
    main()
