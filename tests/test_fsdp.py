"""FSDP: FSDP2 row shards (``FSDP2Backend``), FSDP1 flat params (``FSDP1Backend``) and HSDP, in real gloo
processes on loopback.

Each scenario is one launch of ``tests/dist/fsdp_worker.py`` on 2-4 CPU ranks running several cases in
turn; the workers compare against a single-process model of the same seed built in the same process,
gather full tensors with FSDP's own means, and report numbers that the tests below assert.  Launches
are cached per module, so several tests share one.  The tiny Llama has 4-row ``k_proj``/``v_proj``
(and LoRA A with r=4 rows): a 3-rank ceil row split leaves rank 2 without rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))

from fsdp_common import ROOT, free_port, launch, worker_env  # noqa: E402

from flatlora_dist.checkpoint import state_dict_key  # noqa: E402
from flatlora_dist.shards.fsdp_common import row_covers  # noqa: E402

WORKER = DIST / "fsdp_worker.py"
CYCLES = 20
SCENARIOS = {
    # 2 ranks, per-decoder-layer units + root (what accelerate's transformer auto-wrap builds)
    "w2": dict(world=2, cases=[
        dict(name="fsdp2", kind="fsdp2", checks=["adapter", "perturbation", "functional", "cycles"], cycles=CYCLES),
        dict(name="fsdp1", kind="fsdp1", checks=["adapter", "perturbation", "functional", "cycles"], cycles=CYCLES),
        # SHARD_GRAD_OP keeps unsharded params after an evaluation forward: the backend must reshard them
        dict(name="fsdp1_zero2", kind="fsdp1", strategy="SHARD_GRAD_OP", checks=["perturbation"]),
        # NO_SHARD: whole weights on every rank, no norm reduction (a reduction would double the norms)
        dict(name="fsdp1_noshard", kind="fsdp1", strategy="NO_SHARD", checks=["perturbation"]),
        dict(name="refusals", kind="refusals", checks=[]),
    ]),
    # 3 ranks: uneven rows, empty shards; FSDP2 with the targets in the root unit (left unsharded by an
    # evaluation forward), FSDP1 with nested units (PEFT's save_pretrained finds no keys there)
    "w3": dict(world=3, cases=[
        dict(name="fsdp2_root", kind="fsdp2", layers=False, checks=["adapter", "perturbation", "cycles"], cycles=CYCLES),
        dict(name="fsdp1", kind="fsdp1", checks=["adapter", "perturbation", "cycles"], cycles=CYCLES),
    ]),
    # 4 ranks = 2 replicas x 2 shards: FSDP2 on a 2-D mesh and FSDP1 HYBRID_SHARD over the same mesh
    "hsdp": dict(world=4, cases=[
        dict(name="fsdp2", kind="fsdp2", replicas=2, checks=["adapter", "perturbation", "cycles"], cycles=3),
        dict(name="fsdp1", kind="fsdp1", replicas=2, checks=["adapter", "perturbation"]),
    ]),
}  # fmt: skip
PERTURBED = [(s, c["name"]) for s, v in SCENARIOS.items() for c in v["cases"] if "perturbation" in c["checks"]]
CYCLED = [(s, c["name"]) for s, v in SCENARIOS.items() for c in v["cases"] if "cycles" in c["checks"]]
ADAPTERS = [(s, c["name"]) for s, v in SCENARIOS.items() for c in v["cases"] if "adapter" in c["checks"]]
_CACHE: dict[str, list[dict]] = {}


def run(name: str) -> list[dict]:
    if name not in _CACHE:
        spec = SCENARIOS[name]
        _CACHE[name] = launch(WORKER, spec["world"], {"cases": spec["cases"]})
    return _CACHE[name]


def case(scenario: str, name: str) -> list[dict]:
    """Every rank's results for one case of one scenario."""
    return [r[name] for r in run(scenario)]


def spec(scenario: str, name: str) -> dict:
    return next(c for c in SCENARIOS[scenario]["cases"] if c["name"] == name)


# ---------------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 16, 64, 80])
@pytest.mark.parametrize("ws", [1, 2, 3, 4, 8])
def test_row_covers_match_torch_chunk(rows, ws):
    """The ceil row split used for FSDP2 geometry is torch.chunk's, with empty trailing ranks."""
    t = torch.arange(rows * 3).view(rows, 3)
    chunks = list(t.chunk(ws))
    covers = row_covers(t.shape, ws)
    assert len(covers) == ws
    for q, (start, n) in enumerate(covers):
        want = chunks[q].reshape(-1) if q < len(chunks) else torch.empty(0, dtype=t.dtype)
        assert torch.equal(t.reshape(-1)[start : start + n], want)


def test_state_dict_key_strips_fsdp_wrappers_only():
    name = "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.lora_A.default.weight"
    assert state_dict_key(name) == "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    assert state_dict_key("module.base_model.model.score.modules_to_save.default.weight") == (
        "base_model.model.score.modules_to_save.default.weight"
    )


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.slow
@pytest.mark.parametrize("scenario,name", PERTURBED)
@pytest.mark.parametrize("phase", ["cold", "warm"])
def test_perturbation_equals_single_process(scenario, name, phase):
    """Gathered W' - W equals the single-process perturbation: bitwise given the same row std, the row
    std itself allclose, and the forward sees exactly the reference's noisy weights.  ``warm``: right
    after an evaluation forward, which can leave FSDP units unsharded (reused as-is by the next forward
    unless the backend reshards them)."""
    res = case(scenario, name)
    kind = spec(scenario, name)["kind"]
    for r in res:
        assert r["backends"] == kind
        assert r[f"{phase}.start_equal_ref"], "the sharded model must start from the reference weights"
        assert r[f"{phase}.noise_bit_identical"], f"gathered W' != round(W + std*z) ({scenario}/{name})"
        assert r[f"{phase}.std_max_rel"] < 1e-5, r[f"{phase}.std_max_rel"]
        assert r[f"{phase}.pert_max_abs"] > 1e-3  # there is a perturbation to compare
        assert r[f"{phase}.pert_max_abs_diff"] <= 1e-6
        assert r[f"{phase}.restored_bitwise"]
        assert abs(r[f"{phase}.ref_loss_perturbed"] - r[f"{phase}.ref_loss_clean"]) > 1e-4  # noise is visible
        assert r[f"{phase}.loss_perturbed"] == pytest.approx(r[f"{phase}.ref_loss_perturbed"], abs=1e-6)


@pytest.mark.slow
def test_evaluation_forward_leaves_units_unsharded_and_the_backend_copes():
    """The warm phase really starts from unsharded units (else it would test nothing extra)."""
    for scenario, name in [("w3", "fsdp2_root"), ("w2", "fsdp1_zero2")]:
        for r in case(scenario, name):
            assert r["warm.unsharded_before"] == len(r["names"]), (scenario, name, r["warm.unsharded_before"])
            assert r["cold.unsharded_before"] == 0


@pytest.mark.slow
def test_uneven_rows_and_empty_shards():
    """3 ranks: FSDP2 rank 2 owns no rows of k_proj/v_proj (no region), the others own uneven row counts;
    FSDP1 ranks hold no element of some targets; together the regions tile every weight."""
    res = case("w3", "fsdp2_root")
    names = res[0]["names"]
    kv = [i for i, n in enumerate(names) if n.endswith(("k_proj", "v_proj"))]
    assert kv and all(res[2]["cold.regions"][i] == 0 for i in kv)
    assert all(res[q]["cold.regions"][i] == 1 for q in (0, 1) for i in kv)
    q_proj = names.index("model.layers.0.self_attn.q_proj")  # 16 rows x 64: 6, 6, 4 rows
    assert [r["cold.local_starts"][q_proj] for r in res] == [[0], [6 * 64], [12 * 64]]
    for scenario, name in [("w3", "fsdp1"), ("w2", "fsdp1")]:
        res = case(scenario, name)
        assert any(0 in r["cold.regions"] for r in res), "some rank should hold none of some target"
        for i in range(len(res[0]["names"])):
            assert sum(r["cold.regions"][i] for r in res) >= 1


# ---------------------------------------------------------------------------------------------- 1b
@pytest.mark.slow
@pytest.mark.parametrize("scenario,name", CYCLED)
def test_bf16_base_weights_bitwise_after_cycles(scenario, name):
    """perturb/forward/backward/restore/step cycles on bf16 bases: local shards bitwise after every
    restore, the full weights (gathered by FSDP) bitwise at the end; the bf16 round trip needed fix-ups."""
    for r in case(scenario, name):
        assert r["cycles.dtype"] == "torch.bfloat16"
        assert r["cycles.bitwise"]
        assert r["cycles.dirty"] == 0
        assert r["cycles.fixups"] > 0
        assert r["cycles.lora_trained"]


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_hsdp_replicas_identical_and_norms_not_double_counted(name):
    """2 replicas x 2 shards (mesh [[0, 1], [2, 3]]): rank k and rank 2+k hold the same shard and get
    bitwise the same perturbation; the two shards of a replica differ; the norms are reduced over the
    2-rank shard group only (summing over all 4 ranks would make them sqrt(2) too large)."""
    res = case("hsdp", name)
    for r in res:
        assert r["reduce_group_size"] == 2
        assert r["cold.std_max_rel"] < 1e-5
    for phase in ("cold", "warm"):
        for k in (0, 1):
            assert res[k][f"{phase}.local_sha"] == res[2 + k][f"{phase}.local_sha"]
            assert res[k][f"{phase}.local_starts"] == res[2 + k][f"{phase}.local_starts"]
        assert res[0][f"{phase}.local_starts"] != res[1][f"{phase}.local_starts"]
        assert len({str(r[f"{phase}.full_sha"]) for r in res}) == 1
        assert len({str(r[f"{phase}.std_sha"]) for r in res}) == 1


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.slow
def test_exactly_one_norm_allreduce_per_step():
    """One all-reduce per perturb (counted both by the engine and by intercepting dist.all_reduce), none
    in restore; over the shard group (HSDP: 2 of 4 ranks); none at all under NO_SHARD."""
    for scenario, name in PERTURBED:
        noshard = spec(scenario, name).get("strategy") == "NO_SHARD"
        for r in case(scenario, name):
            counts = r["allreduce_counts"]
            for phase in ("cold", "warm"):
                assert r[f"{phase}.norm_allreduces_delta"] == (0 if noshard else 1)
                assert counts.get(f"{phase}.perturb", 0) == (0 if noshard else 1), counts
                assert counts.get(f"{phase}.restore", 0) == 0
            want = None if noshard else (2 if scenario == "hsdp" else SCENARIOS[scenario]["world"])
            assert r["reduce_group_size"] == want
    for scenario, name in CYCLED:
        n = spec(scenario, name)["cycles"]
        for r in case(scenario, name):
            assert r["cycles.perturb_allreduces"] == n and r["cycles.norm_allreduces"] == n
            assert r["cycles.restore_allreduces"] == 0


# ---------------------------------------------------------------------------------------------- 4
@pytest.mark.slow
@pytest.mark.parametrize("scenario,name", ADAPTERS)
def test_gathered_lora_state_dict_saves_a_loadable_adapter(scenario, name):
    """Complete LoRA tensors equal to the unsharded ones, identical on every rank (rank0_only: {} elsewhere);
    the adapter save_adapter writes loads with PeftModel.from_pretrained with the same weights."""
    res = case(scenario, name)
    for r in res:
        assert r["adapter.keys_equal"] and r["adapter.equal_unsharded"]
        assert r["adapter.rank0_only_len"] == (2 * len(r["names"]) if res.index(r) == 0 else 0)
        assert r["adapter.wrote"] == (res.index(r) == 0)
    assert len({r["adapter.sha"] for r in res}) == 1
    assert res[0]["adapter.loaded_equal"]
    assert "adapter_model.safetensors" in res[0]["adapter.files"]


@pytest.mark.slow
def test_gathered_state_dict_after_training_equals_fsdp_gather():
    for scenario, name in CYCLED:
        for r in case(scenario, name):
            assert r["cycles.adapter_equal_gathered"]


@pytest.mark.slow
def test_functional_mode_reads_the_unsharded_weight():
    """Functional vs in-place at the same step: loss, every local LoRA A/B gradient and the input gradient
    (rtol 1e-5, atol 1e-7; see fsdp_worker.GRAD_TOL)."""
    for name in ("fsdp2", "fsdp1"):
        res = case("w2", name)
        for r in res:
            assert r["functional.functional_loss"] == pytest.approx(r["functional.inplace_loss"], abs=1e-5)
            assert r["functional.lora_grads_close"], f"{name}: LoRA gradients differ from in-place mode"
            assert r["functional.input_grad_close"], f"{name}: input gradient differs from in-place mode"
            assert r["functional.input_grad_max_abs"] > 0
        assert sum(r["functional.lora_grads"] for r in res) > 0
        assert max(r["functional.lora_grad_max_abs"] for r in res) > 0


@pytest.mark.slow
def test_unsupported_layouts_fail_at_start_up_naming_the_fix():
    for r in case("w2", "refusals"):
        assert r["refusal.fsdp1_no_orig_params"].startswith("ValueError")
        assert "use_orig_params=True" in r["refusal.fsdp1_no_orig_params"]
        assert "fsdp_use_orig_params: true" in r["refusal.fsdp1_no_orig_params"]
        assert r["refusal.fsdp2_shard1"].startswith("NotImplementedError")
        assert "shard_placement_fn" in r["refusal.fsdp2_shard1"]


# ---------------------------------------------------------------------------------------------- configs
CONFIGS = {"fsdp2": (2, 2), "fsdp1": (2, 1), "hsdp": (4, 2)}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_accelerate_config_sets_the_fsdp_plugin(config, monkeypatch):
    """The shipped YAML, read by accelerate's own launcher code, exports the FSDP settings Flat-LoRA needs."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = ROOT / "launch" / "accelerate" / f"{config}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--main_process_port", "0", "x.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    procs, version = CONFIGS[config]
    assert args.use_fsdp and args.num_processes == procs
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == str(version)
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_", "PARALLELISM_CONFIG_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == version
    if version == 1:
        assert plugin.use_orig_params is True and not plugin.sync_module_states
    if config == "hsdp":
        assert env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == "2" and env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_accelerate_launch_runs_flatlora_under_the_config(config):
    """``accelerate launch --config_file launch/accelerate/<config>.yaml`` on CPU: real FSDP ranks, the
    expected backend and shard group, complete adapter (see tests/dist/fsdp_accel_probe.py for the CPU
    switch accelerate 1.15 needs)."""
    procs, version = CONFIGS[config]
    env = worker_env(0, procs, free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    env["ACCELERATE_USE_CPU"] = "true"
    accelerate = Path(sys.executable).parent / "accelerate"
    with tempfile.TemporaryDirectory(prefix="flatlora_accel_") as out:
        cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "launch" / "accelerate" / f"{config}.yaml"),
               "--main_process_port", str(free_port()), str(DIST / "fsdp_accel_probe.py"), out]  # fmt: skip
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        res = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(procs)]
    assert [r["process_index"] for r in res] == list(range(procs))
    for r in res:
        assert r["num_processes"] == procs and r["dist_world"] == procs and r["dist_backend"] == "gloo"
        assert r["fsdp_version"] == version
        assert r["backends"] == ("fsdp1" if version == 1 else "fsdp2")
        assert r["reduce_group_size"] == (2 if config == "hsdp" else procs)
        assert r["norm_allreduces"] == 2
        assert r["adapter_equal"]
    if config == "hsdp":
        assert res[0]["mesh_shape"] == [2, 2]
    assert res[0]["adapter_loaded_equal"]
