"""DeepSpeed: ZeRO-3 partitions (``ZeRO3Backend``) and ZeRO-2 (plain backend), in real gloo processes.

Each scenario is one launch of ``tests/dist/ds_worker.py`` on 1-3 CPU ranks; the workers compare
against a single-process model of the same seed built in the same process and report numbers that
the tests below assert.  Launches are cached per module, so several tests share one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))

from ds_common import DS_DEFAULT_PERSISTENCE, launch  # noqa: E402

WORKER = DIST / "ds_worker.py"
SCENARIOS = {
    # 2 ranks, every weight partitioned (threshold 0); small noise blocks so the memory bound is tight;
    # 2 micro-batches per optimizer step under one noise draw
    "z3": dict(world=2, config="zero3", dtype="fp32", persistence=0, small_blocks=512, instrument=True, gas=2,
               checks=["perturbation", "train", "adapter", "functional"]),
    # 2 ranks, DeepSpeed's default threshold: the tiny model is fully persistent; bf16; FlatLoRA(engine.module)
    "z3_persistent_bf16": dict(world=2, config="zero3", dtype="bf16", persistence=DS_DEFAULT_PERSISTENCE,
                               wrap="module", checks=["perturbation", "cycles"], cycles=20),
    # 3 ranks: uneven partitions with NaN in the padding; params and optimizer offloaded to CPU
    "z3_offload_3ranks": dict(world=3, config="zero3_offload", dtype="fp32", persistence=0, garbage=True,
                              checks=["perturbation", "train", "cycles"], cycles=5),
    # 1 rank: the gathered persistent copy aliases the partition
    "z3_1rank": dict(world=1, config="zero3", dtype="bf16", persistence=DS_DEFAULT_PERSISTENCE,
                     checks=["perturbation", "cycles", "adapter"], cycles=3),
    # ZeRO-2: whole params, plain backend
    "z2": dict(world=2, config="zero2", dtype="fp32", checks=["perturbation", "train", "cycles"], cycles=3),
}
_CACHE: dict[str, list[dict]] = {}


def run(name: str) -> list[dict]:
    if name not in _CACHE:
        args = dict(SCENARIOS[name])
        _CACHE[name] = launch(WORKER, args.pop("world"), args)
    return _CACHE[name]


def every(name: str, key: str) -> list:
    return [r[key] for r in run(name)]


pytestmark = pytest.mark.slow
ZERO3 = ["z3", "z3_persistent_bf16", "z3_offload_3ranks", "z3_1rank"]


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("scenario", ZERO3 + ["z2"])
@pytest.mark.parametrize("phase", ["cold", "warm"])
def test_perturbation_equals_single_process(scenario, phase):
    """Gathered W'-W equals the single-process perturbation: bitwise given the same row std, and the
    row std (the norms buffer) itself allclose.  ``cold``: nothing gathered at perturb time; ``warm``:
    after forwards, persistent params are gathered and must carry the same noise."""
    res = run(scenario)
    for r in res:
        assert r[f"{phase}.std_finite"]
        assert r[f"{phase}.std_max_rel"] < 1e-5, r[f"{phase}.std_max_rel"]
        assert r[f"{phase}.noise_bit_identical"], f"rank {r['rank']}: gathered W' != round(W + e)"
        assert r[f"{phase}.pert_max_abs"] > 1e-3  # there is a perturbation to compare
        if "bf16" in scenario:  # rows do not straddle partitions here: the std is computed identically
            assert r[f"{phase}.std_max_rel"] == 0 and r[f"{phase}.pert_max_abs_diff"] == 0
        else:
            assert r[f"{phase}.pert_max_abs_diff"] <= 1e-6
        assert r[f"{phase}.restored_bitwise"]
    expected_backend = "plain" if scenario == "z2" else "deepspeed"
    assert every(scenario, "backends") == [expected_backend] * len(res)


def test_persistent_params_get_a_second_region():
    """With the default threshold the gathered persistent copy is perturbed too (2 regions); with
    threshold 0 nothing stays gathered; at world size 1 the gathered copy is the partition (1 region)."""
    for r in run("z3_persistent_bf16"):
        assert r["warm.gathered_before"] == len(r["names"])
        assert r["cold.regions"] == [1] and r["warm.regions"] == [2]
    for r in run("z3"):
        assert r["warm.gathered_before"] == 0 and r["warm.regions"] == [1]
    for r in run("z3_1rank"):
        assert r["warm.gathered_before"] == len(r["names"]) and r["warm.regions"] == [1]


def test_padding_garbage_is_ignored():
    res = run("z3_offload_3ranks")
    assert sum(r["poisoned"] for r in res) > 0, "3 ranks should leave padding on the last rank"
    assert all(r["cold.std_finite"] and r["cold.noise_bit_identical"] for r in res)
    assert all(r["partition_numel"] * 3 > r["weight_numel"] for r in res)


def test_engine_and_module_give_the_same_names():
    for scenario in ("z3", "z3_persistent_bf16", "z2"):
        for r in run(scenario):
            assert r["names_equal_engine_vs_module"]
            assert not any(n.startswith(("module.", "base_model.")) for n in r["names"])


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("scenario", ["z3_persistent_bf16", "z3_offload_3ranks", "z3_1rank", "z2"])
def test_base_weights_bitwise_after_cycles(scenario):
    """perturb/forward/backward/restore/step cycles (20 in bf16 for 2-rank ZeRO-3): every base weight
    is bitwise what was loaded, also the gathered copies read right after each restore."""
    for r in run(scenario):
        assert r["cycles.bitwise"]
        assert r["cycles.dirty"] == 0
        assert r["cycles.lora_trained"]
        if "bf16" in scenario:
            assert r["cycles.fixups"] > 0  # the bf16 round trip is not exact: fix-ups were needed


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("scenario", ["z3", "z3_offload_3ranks", "z2"])
def test_loss_matches_single_process_global_batch(scenario):
    for r in run(scenario):
        ds, ref, plain = r["ds_losses"], r["ref_losses"], r["plain_losses"]
        assert len(ds) == len(ref) == 5
        assert max(abs(a - b) for a, b in zip(ds, ref)) < 1e-4, (ds, ref)
        assert max(abs(a - b) for a, b in zip(ref, plain)) > 1e-3  # the noise matters at this tolerance
        assert r["lora_keys_equal_ref"] and r["lora_max_abs_diff_vs_ref"] < 1e-4


# ---------------------------------------------------------------------------------------------- 4
def test_one_allreduce_per_step_and_bounded_allocations():
    """One norm all-reduce per optimizer step (2 micro-batches each), none in restore; no allocation in
    perturb/restore beyond this rank's partition plus one noise chunk (LoRA factor gathers aside)."""
    for r in run("z3"):
        steps = len(r["ds_losses"])
        assert r["allreduce_counts"].get("perturb") == steps, r["allreduce_counts"]
        assert r["allreduce_counts"].get("restore", 0) == 0
        assert r["norm_allreduces"] == steps + 2  # plus the two perturbations of the equality check
        alloc, bound = r["max_alloc_bytes"], r["alloc_bound_bytes"]
        full_weight = 4 * r["weight_numel"]
        assert bound < full_weight, "the bound must be able to catch a materialised full weight"
        assert alloc["control"] >= full_weight, "the tracker must see a gathered weight"
        assert alloc["perturb"] <= bound and alloc["restore"] <= bound, (alloc, bound)
        assert alloc.get("lora_gather", 0) <= 4 * r["lora_numel"]  # LoRA factors are gathered whole by design


# ---------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("scenario", ["z3", "z3_1rank"])
def test_gathered_lora_state_dict_saves_a_loadable_adapter(scenario):
    res = run(scenario)
    for r in res:
        assert r["adapter.nonempty"] and r["adapter.equal_gathered"]
        assert r["adapter.rank0_only_len"] == (len(r["names"]) * 2 if r["rank"] == 0 else 0)
    assert len({r["adapter.sha"] for r in res}) == 1, "identical on every rank"
    assert res[0]["adapter.loaded_equal"]
    assert "adapter_model.safetensors" in res[0]["adapter.files"]


def test_functional_mode_reads_the_gathered_weight():
    """Functional mode equals in-place mode (loss) and a single-process in-place reference (LoRA and input
    gradients); both run right after an evaluation forward that left ZeRO-3 prefetches in flight (the
    backend completes them before reading or writing)."""
    for r in run("z3"):
        assert r["functional.inflight_before"] > 0
        assert r["functional.functional_loss"] == pytest.approx(r["functional.inplace_loss"], abs=1e-5)
        # LoRA A/B and input gradients vs a single-process in-place reference (ds_worker.GRAD_TOL)
        assert r["functional.lora_grads"] == 2 * len(r["names"])
        assert r["functional.lora_grads_close"], r["functional.lora_grad_max_abs_diff"]
        assert r["functional.input_grad_close"]
        assert r["functional.noise_grad_effect"] > 20 * r["functional.lora_grad_max_abs_diff"], "noise must matter"


# ---------------------------------------------------------------------------------------------- in-process
def _fake_zero3(model: nn.Module, **attrs) -> None:
    """Give every LoRA base weight the attributes a ZeRO-3 param has (for start-up checks only)."""
    for name, p in model.named_parameters():
        if "base_layer.weight" in name:
            p.ds_id = 0
            p.ds_numel = p.numel()
            p.ds_tensor = torch.zeros(p.numel())
            p.ds_process_group = None
            p.ds_zero_partition_world_size = 1
            for k, v in attrs.items():
                if k == "final_location":
                    p.ds_tensor.final_location = v
                else:
                    setattr(p, k, v)


@pytest.mark.parametrize(
    "attrs,match",
    [
        (dict(nvme_swapper=object()), "offload_param.device"),
        (dict(final_location="nvme"), "offload_param.device"),
        (dict(ds_secondary_tensor=torch.zeros(1)), "zero_hpz_partition_size"),
    ],
    ids=["nvme_swapper", "nvme_location", "hpz"],
)
def test_unsupported_zero3_settings_fail_at_start_up(attrs, match):
    from ds_common import tiny_model

    from flatlora_dist import FlatLoRA, FlatLoRAConfig

    model = tiny_model()
    _fake_zero3(model, **attrs)
    with pytest.raises(ValueError, match=match):
        FlatLoRA(model, FlatLoRAConfig(total_steps=10))


def test_backend_module_imports_deepspeed_lazily():
    code = "import sys, flatlora_dist.shards.deepspeed; assert 'deepspeed' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_ds_configs_fill_and_parse():
    from ds_common import load_ds_config

    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        cfg = load_ds_config(name, world=2, dtype="bf16")
        assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"] is True
        assert "optimizer" not in cfg
        if stage == 3:
            assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = load_ds_config("zero3_offload", world=2)["zero_optimization"]
    assert off["offload_param"]["device"] == "cpu" and off["offload_optimizer"]["device"] == "cpu"


class _Status:
    def __init__(self, name: str) -> None:
        self.name = name


def _fake_param(
    numel: int, rank: int, world: int, gathered_device: str | None, alias: bool = False, partition_device: str = "cpu"
):
    """A ZeRO-3-like param: partition ``rank`` of ``world``; optionally AVAILABLE with a gathered copy."""
    part = -(-numel // world)
    p = nn.Parameter(torch.empty(0), requires_grad=False)
    p.ds_id, p.ds_numel, p.ds_zero_partition_rank, p.ds_active_sub_modules = 0, numel, rank, set()
    p.ds_tensor = torch.zeros(part, device=partition_device)
    p.ds_status = _Status("NOT_AVAILABLE")
    p.released = 0

    def partition(param_list=None, has_been_updated=False):
        p.data, p.ds_status = torch.empty(0), _Status("NOT_AVAILABLE")
        p.released += 1

    p.partition = partition
    if alias:
        p.data, p.ds_status = p.ds_tensor.view(-1)[:numel], _Status("AVAILABLE")
    elif gathered_device is not None:
        p.data, p.ds_status = torch.zeros(numel, device=gathered_device), _Status("AVAILABLE")
    return p


def _target(param):
    from types import SimpleNamespace

    from flatlora_dist.layout import RowLayout
    from flatlora_dist.targets import LoraTarget

    return LoraTarget("layer", SimpleNamespace(), SimpleNamespace(weight=param), RowLayout(10, 10))


def test_region_bookkeeping_between_perturb_and_restore():
    """Which regions are written in which phase, and which stale gathered copies are dropped (no processes)."""
    from flatlora_dist.shards import Phase
    from flatlora_dist.shards.deepspeed import ZeRO3Backend

    b = ZeRO3Backend(None)
    # last of 3 ranks: partition of 34, 32 valid elements at global 68
    p = _fake_param(100, rank=2, world=3, gathered_device=None)
    t = _target(p)
    (r,) = b.begin_write(t, Phase.PERTURB)
    assert (r.start, r.tensor.numel()) == (68, 32)
    b.end_write(t, Phase.PERTURB)
    p.data, p.ds_status = torch.zeros(100), _Status("AVAILABLE")  # gathered from noisy partitions in forward
    assert len(b.begin_write(t, Phase.RESTORE)) == 1  # the copy the engine never wrote is not "restored" ...
    b.end_write(t, Phase.RESTORE)
    assert p.released == 1 and p.ds_status.name == "NOT_AVAILABLE"  # ... it is dropped
    # persistent copy present at perturb: written both times, kept
    p = _fake_param(100, rank=0, world=2, gathered_device="cpu")
    t = _target(p)
    assert [x.start for x in b.begin_write(t, Phase.PERTURB)] == [0, 0]
    b.end_write(t, Phase.PERTURB)
    assert [x.tensor.numel() for x in b.begin_write(t, Phase.RESTORE)] == [50, 100]
    b.end_write(t, Phase.RESTORE)
    assert p.released == 0
    # gathered copy on another device type than the partition (offload_param cpu + GPU): dropped at perturb
    p = _fake_param(100, rank=0, world=2, gathered_device="cpu", partition_device="meta")
    t = _target(p)
    assert len(b.begin_write(t, Phase.PERTURB)) == 1
    b.end_write(t, Phase.PERTURB)
    assert p.released == 1
    # world size 1: the gathered data is a view of the partition, written once
    p = _fake_param(100, rank=0, world=1, gathered_device=None, alias=True)
    assert len(b.regions(_target(p))) == 1


def test_write_phases_out_of_order_raise_instead_of_flipping():
    """One extra or missing call used to flip ZeRO-3's perturb/restore inference silently; now every
    out-of-order phase raises, naming the call and the target's state, and changes nothing."""
    from flatlora_dist.shards import Phase
    from flatlora_dist.shards.deepspeed import ZeRO3Backend

    b = ZeRO3Backend(None)
    p = _fake_param(100, rank=0, world=2, gathered_device="cpu")
    t = _target(p)
    with pytest.raises(RuntimeError, match=r"begin_write\('layer', RESTORE\) while the target is clean"):
        b.begin_write(t, Phase.RESTORE)
    with pytest.raises(RuntimeError, match="end_write.*while the target is clean"):
        b.end_write(t, Phase.PERTURB)
    assert len(b.begin_write(t, Phase.PERTURB)) == 2
    with pytest.raises(RuntimeError, match="PERTURB.*while the target is perturbing"):
        b.begin_write(t, Phase.PERTURB)  # the extra call that used to be taken for the restore
    with pytest.raises(RuntimeError, match="end_write.*RESTORE.*perturbing"):
        b.end_write(t, Phase.RESTORE)
    b.end_write(t, Phase.PERTURB)
    with pytest.raises(RuntimeError, match="PERTURB.*while the target is perturbed"):
        b.begin_write(t, Phase.PERTURB)
    with pytest.raises(RuntimeError, match="abort_write.*perturbed"):
        b.abort_write(t)
    # the rejected calls left the bookkeeping intact: the restore still writes the perturbed copy
    assert [x.tensor.numel() for x in b.begin_write(t, Phase.RESTORE)] == [50, 100]
    b.end_write(t, Phase.RESTORE)
    # an aborted perturbation (regions taken, nothing written) leaves the target clean
    b.begin_write(t, Phase.PERTURB)
    b.abort_write(t)
    assert p.released == 0
    with pytest.raises(RuntimeError, match="RESTORE.*clean"):
        b.begin_write(t, Phase.RESTORE)
    assert len(b.begin_write(t, Phase.PERTURB)) == 2
