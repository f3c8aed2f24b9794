"""One rank of an FSDP scenario: runs the cases in ``args["cases"]`` and writes ``<out>/rank<r>.json``.

Every case builds a fresh model, shards it (FSDP2 / FSDP1 / HSDP, see ``fsdp_common.wrap``) and
compares with a single-process model of the same seed built in this very process.  Full tensors are
gathered with FSDP's own means (``DTensor.full_tensor``, ``FSDP.summon_full_params``), never with the
backend under test.  The pytest driver asserts on the numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_common import base_model, tiny_model, wrap
from tiny_lora import capture_input_grad

from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.noise import noise_range
from flatlora_dist.checkpoint import gathered_lora_state_dict, save_adapter, state_dict_key
from flatlora_dist.shards.fsdp1 import unsharded

SEED, STEP = 7, 3

# ---------------------------------------------------------------------------------------------- helpers
_COUNTS: dict[str, int] = {}
_PHASE = [None]
_orig_all_reduce = dist.all_reduce


def _counting_all_reduce(*a, **k):
    if _PHASE[0] is not None:
        _COUNTS[_PHASE[0]] = _COUNTS.get(_PHASE[0], 0) + 1
    return _orig_all_reduce(*a, **k)


dist.all_reduce = _counting_all_reduce


@contextmanager
def phase(name: str):
    _PHASE[0] = name
    try:
        yield
    finally:
        _PHASE[0] = None


def sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().view(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and sha(a) == sha(b)


def cfg(**kw) -> FlatLoRAConfig:
    return FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant", seed=SEED, **kw)


def full_weights(model, flat: FlatLoRA, kind: str) -> dict[str, torch.Tensor]:
    """Every target's full base weight, gathered by FSDP itself."""
    if kind == "fsdp2":
        out = {}
        for t in flat.targets:
            w = t.weight
            out[t.name] = (w.full_tensor() if type(w).__name__ == "DTensor" else w.detach()).clone()
        return out
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {t.name: t.weight.detach().clone().view(t.layout.rows, t.layout.cols) for t in flat.targets}


def full_lora(model, kind: str) -> dict[str, torch.Tensor]:
    """Every trainable parameter complete, keyed like the PEFT model, gathered by FSDP itself."""
    if kind == "fsdp2":
        return {
            n: (p.full_tensor() if type(p).__name__ == "DTensor" else p.detach()).clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {state_dict_key(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1000 * step + rank))


def unsharded_targets(flat: FlatLoRA, kind: str) -> int:
    """How many targets sit in an FSDP unit whose unsharded parameters a forward would reuse as they are
    (FSDP2: module attribute not the DTensor; FSDP1: unsharded flat param still allocated)."""
    backend = flat._backend_of[id(flat.targets[0])]
    if kind == "fsdp2":
        return sum(type(t.weight).__name__ != "DTensor" for t in flat.targets)
    return sum(unsharded(backend._weight_entry(t).handle) for t in flat.targets)


def loss_on(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


# ---------------------------------------------------------------------------------------------- checks
def check_perturbation(model, flat: FlatLoRA, ref, kind: str, tag: str) -> dict:
    """W' gathered vs round(W + std·z) (bitwise, same std) and vs the single-process W' (allclose)."""
    res = {f"{tag}.unsharded_before": unsharded_targets(flat, kind)}
    w0 = full_weights(model, flat, kind)
    before = flat.stats()["norm_allreduces"]
    with phase(f"{tag}.perturb"):
        flat.perturb(STEP)
    std = {t.name: flat._active.keys[id(t)].std.clone() for t in flat.targets}
    backend = flat._backend_of[id(flat.targets[0])]
    regions = [backend.regions(t) for t in flat.targets]
    res[f"{tag}.regions"] = [len(r) for r in regions]
    res[f"{tag}.local_sha"] = [sha(torch.cat([x.tensor for x in r])) if r else "" for r in regions]
    res[f"{tag}.local_starts"] = [[x.start for x in r] for r in regions]
    x = batch(0, 77)  # the same batch on every rank: the forward must see exactly the reference's noise
    loss_pert = loss_on(model, x)
    w1 = full_weights(model, flat, kind)
    with phase(f"{tag}.restore"):
        flat.restore()
    w2 = full_weights(model, flat, kind)
    res[f"{tag}.norm_allreduces_delta"] = flat.stats()["norm_allreduces"] - before

    ref_flat = FlatLoRA(ref, cfg())
    r0 = {t.name: t.weight.detach().clone() for t in ref_flat.targets}
    ref_flat.perturb(STEP)
    ref_std = {t.name: ref_flat._active.keys[id(t)].std.clone() for t in ref_flat.targets}
    r1 = {t.name: t.weight.detach().clone() for t in ref_flat.targets}
    ref_loss_pert = loss_on(ref, x)
    ref_flat.restore()
    res[f"{tag}.loss_perturbed"] = loss_pert
    res[f"{tag}.ref_loss_perturbed"] = ref_loss_pert
    res[f"{tag}.ref_loss_clean"] = loss_on(ref, x)

    bit_ok, start_ok, rel, diff, amax = True, True, 0.0, 0.0, 0.0
    for t in flat.targets:
        n = t.name
        lay = t.layout
        z = noise_range(SEED, STEP, n, lay.numel, 0, lay.numel)
        e = lay.scale_(z, 0, std[n])
        expect = (w0[n].reshape(-1).float() + e).to(w0[n].dtype).view_as(w0[n])
        bit_ok &= bits_equal(expect, w1[n])
        rel = max(rel, float(((std[n] - ref_std[n]).abs() / ref_std[n].abs().max()).max()))
        diff = max(diff, float(((w1[n] - w0[n]).float() - (r1[n] - r0[n]).float()).abs().max()))
        amax = max(amax, float((w1[n] - w0[n]).float().abs().max()))
        start_ok &= bits_equal(w0[n], r0[n])
    res.update(
        {
            f"{tag}.noise_bit_identical": bit_ok,
            f"{tag}.start_equal_ref": start_ok,
            f"{tag}.std_max_rel": rel,
            f"{tag}.pert_max_abs_diff": diff,
            f"{tag}.pert_max_abs": amax,
            f"{tag}.restored_bitwise": all(bits_equal(w0[n], w2[n]) for n in w0),
            f"{tag}.full_sha": {n: sha(w) for n, w in w1.items()},
            f"{tag}.std_sha": {n: sha(s) for n, s in std.items()},
        }
    )
    return res


def check_adapter(model, ref, kind: str, out_dir: str, seed: int) -> dict:
    """gathered_lora_state_dict == the unsharded LoRA weights; the adapter save_adapter writes from it loads
    back with PeftModel.from_pretrained; PEFT's own save_pretrained is compared for the record."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    sd = gathered_lora_state_dict(model)
    sd0 = gathered_lora_state_dict(model, rank0_only=True)
    want = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    res = {
        "adapter.keys_equal": sorted(sd) == sorted(want),
        "adapter.equal_unsharded": sorted(sd) == sorted(want) and all(bits_equal(sd[n], want[n]) for n in want),
        "adapter.rank0_only_len": len(sd0),
        "adapter.sha": sha(torch.cat([sd[n].reshape(-1) for n in sorted(sd)])),
    }
    wrote = save_adapter(model, out_dir, state_dict=sd)
    res["adapter.wrote"] = wrote
    if wrote:
        peft_model = model.module if kind == "fsdp1" else model
        res["adapter.peft_save_pretrained_keys"] = len(get_peft_model_state_dict(peft_model, state_dict=sd))
        loaded = PeftModel.from_pretrained(base_model(seed=seed), out_dir)
        got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
        res["adapter.files"] = sorted(p.name for p in Path(out_dir).iterdir())
        res["adapter.loaded_equal"] = sorted(got) == sorted(sd) and all(bits_equal(got[n], sd[n]) for n in sd)
    return res


def _local_lora_grads(model) -> dict[str, torch.Tensor]:
    """This rank's part of every LoRA gradient (FSDP2: the local shard; FSDP1: the local flat view)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.to_local() if type(p.grad).__name__ == "DTensor" else p.grad
            out[state_dict_key(n)] = g.detach().clone()
    return out


def _grads_at_step(model, flat: FlatLoRA, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    handle, store = capture_input_grad(model)
    try:
        with flat.perturbed(STEP):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
    finally:
        handle.remove()
    grads = _local_lora_grads(model)
    model.zero_grad(set_to_none=True)
    return float(loss), grads, store[0].grad.detach().clone()


GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}
"""fp32, the same rounded ``W + e`` in both modes: only the matmuls' summation order may differ."""


def check_functional(model, flat: FlatLoRA, kind: str) -> dict:
    """Functional mode (noisy weight built inside forward/backward from the unsharded weight) gives the
    in-place loss, LoRA A/B gradients and input gradient at the same step (``GRAD_TOL``)."""
    x = batch(dist.get_rank(), 99)
    inplace_loss, inplace_grads, inplace_dx = _grads_at_step(model, flat, x)
    func = FlatLoRA(model, cfg(mode="functional"))
    loss, grads, dx = _grads_at_step(model, func, x)
    lora_close = grads.keys() == inplace_grads.keys() and all(
        torch.allclose(grads[n], inplace_grads[n], **GRAD_TOL) for n in grads
    )
    return {
        "functional.inplace_loss": inplace_loss,
        "functional.functional_loss": loss,
        "functional.lora_grads": len(grads),
        "functional.lora_grads_close": lora_close,
        "functional.lora_grad_max_abs": max((float(g.abs().max()) for g in grads.values() if g.numel()), default=0.0),
        "functional.input_grad_close": torch.allclose(dx, inplace_dx, **GRAD_TOL),
        "functional.input_grad_max_abs": float(dx.abs().max()),
    }


def check_cycles(case: dict, world: int, n: int) -> dict:
    """``n`` bf16 perturb/forward/backward/restore/step cycles: local shards bitwise after every restore,
    full weights bitwise at the end, fix-ups needed, LoRA trained, one norm all-reduce per perturb."""
    kind = case["kind"]
    plain = tiny_model(torch.bfloat16, seed=11)  # PEFT keeps the adapters in fp32 over bf16 bases
    if kind == "fsdp1":  # FSDP1 flattens one dtype per FlatParameter
        plain.to(torch.bfloat16)
    orig = {n_: p.detach().clone() for n_, p in plain.named_parameters() if "base_layer.weight" in n_}
    model = wrap(plain, kind, world=world, replicas=case.get("replicas", 1), layers=case.get("layers", True),
                 strategy=case.get("strategy", "FULL_SHARD"))  # fmt: skip
    flat = FlatLoRA(model, cfg())
    backend = flat._backend_of[id(flat.targets[0])]
    saved = {t.name: [(r.start, r.tensor.clone()) for r in backend.regions(t)] for t in flat.targets}
    lora0 = full_lora(model, kind)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dirty, fixups = 0, 0
    counts_before = dict(_COUNTS)
    for s in range(n):
        with phase("cycles.perturb"):
            flat.perturb(s)
        fixups += flat.stats()["fixups"]
        x = batch(dist.get_rank(), s)
        model(input_ids=x, labels=x).loss.backward()
        with phase("cycles.restore"):
            flat.restore()
        for t in flat.targets:
            now = [(r.start, r.tensor) for r in backend.regions(t)]
            same = len(now) == len(saved[t.name]) and all(
                a == c and bits_equal(b, d) for (a, b), (c, d) in zip(now, saved[t.name])
            )
            dirty += not same
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = full_weights(model, flat, kind)
    by_key = {t.name: o for t in flat.targets for k_, o in orig.items() if k_.startswith(f"base_model.model.{t.name}.")}
    lora1 = full_lora(model, kind)
    sd = gathered_lora_state_dict(model)
    return {
        "cycles.bitwise": len(by_key) == len(flat.targets) and all(bits_equal(final[k], by_key[k]) for k in by_key),
        "cycles.dirty": dirty,
        "cycles.fixups": fixups,
        "cycles.lora_trained": any(not bits_equal(lora0[k], lora1[k]) for k in lora0),
        "cycles.perturb_allreduces": _COUNTS.get("cycles.perturb", 0) - counts_before.get("cycles.perturb", 0),
        "cycles.restore_allreduces": _COUNTS.get("cycles.restore", 0) - counts_before.get("cycles.restore", 0),
        "cycles.norm_allreduces": flat.stats()["norm_allreduces"],
        "cycles.adapter_equal_gathered": sorted(sd) == sorted(lora1) and all(bits_equal(sd[k], lora1[k]) for k in sd),
        "cycles.dtype": str(final[flat.targets[0].name].dtype),
    }


def check_refusals(world: int) -> dict:
    """Configurations the backends must refuse at start-up, with the error text (``None``: accepted)."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def error(make) -> str | None:
        try:
            FlatLoRA(make(), cfg())
        except (ValueError, NotImplementedError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def fsdp1_flat():  # FSDP1 accepts mixed requires_grad only with LoRA modules in units of their own
        m = tiny_model(seed=3)
        return FSDP(m, auto_wrap_policy=fsdp_auto_wrap_policy(m), use_orig_params=False, device_id=torch.device("cpu"))

    def fsdp2_columns():  # weights sharded by columns: not whole rows per rank
        m = tiny_model(seed=3)
        fully_shard(m, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else None)
        return m

    return {"refusal.fsdp1_no_orig_params": error(fsdp1_flat), "refusal.fsdp2_shard1": error(fsdp2_columns)}


def run_case(case: dict, world: int, out: str) -> dict:
    kind = case["kind"]
    checks = case["checks"]
    if kind == "refusals":
        return check_refusals(world)
    ref = tiny_model(seed=case.get("seed", 0))
    model = wrap(tiny_model(seed=case.get("seed", 0)), kind, world=world, replicas=case.get("replicas", 1),
                 layers=case.get("layers", True), strategy=case.get("strategy", "FULL_SHARD"))  # fmt: skip
    flat = FlatLoRA(model, cfg())
    backend = flat._backend_of[id(flat.targets[0])]
    group = backend.reduce_group()
    res: dict = {
        "backends": flat.stats()["backends"],
        "scheme": flat.scheme,  # FLATLORA_KERNELS as the engine resolved it (fused / blocks)
        "names": [t.name for t in flat.targets],
        "reduce_group_size": None if group is None else dist.get_world_size(group),
    }
    if "adapter" in checks:  # before any step: the LoRA weights are the freshly built ones
        with tempfile.TemporaryDirectory() as d:
            res.update(check_adapter(model, ref, kind, d, case.get("seed", 0)))
    if "perturbation" in checks:
        res.update(check_perturbation(model, flat, ref, kind, "cold"))
        with torch.no_grad():  # evaluation forward: FSDP keeps the root's unsharded params afterwards
            x = batch(dist.get_rank(), 50)
            model(input_ids=x, labels=x)
        res.update(check_perturbation(model, flat, ref, kind, "warm"))
    if "functional" in checks:
        res.update(check_functional(model, flat, kind))
    if "cycles" in checks:
        res.update(check_cycles(case, world, case.get("cycles", 20)))
    res["allreduce_counts"] = dict(_COUNTS)
    _COUNTS.clear()
    return res


def main() -> None:
    args, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    results = {"rank": rank, "world": world}
    for case in args["cases"]:
        results[case["name"]] = run_case(case, world, out)
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
