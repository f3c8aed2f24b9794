"""The training application under FSDP (issue 4, application part): ``launch/train.py --fsdp ...`` through the HF
Trainer's own FSDP integration, on CPU ranks over gloo.

Runs (each a real launcher; shared by the tests through module fixtures; every one records what the Trainer
built, see ``tests/dist/app_fsdp_run.py``):

* ``torchrun --nproc_per_node 2 ... --fsdp fsdp2`` and ``--fsdp fsdp1``;
* two ``torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1 --rdzv_backend c10d`` agents on loopback
  (a real two-node rendezvous), ``--fsdp fsdp2``;
* ``accelerate launch --config_file launch/accelerate/fsdp2.yaml`` (no ``--fsdp``: the YAML decides);
* HSDP 2x2: ``PARALLELISM_CONFIG_DP_SHARD_SIZE=2 torchrun --nproc_per_node 4 ... --fsdp hsdp``;
* determinism: ``--fsdp fsdp2 --lora_dropout 0`` on 1 rank x batch 4 and on 2 ranks x batch 2, with the
  per-step recorder of ``tests/dist/app_inject.py``;
* a SIGTERM to the torchrun agent mid-run (what Slurm's ``--signal`` and ``scancel`` do), then ``--resume``.

All 2-rank runs but the determinism pair are the same computation (same seed, data, global batch), so their
per-step losses (from the checkpoint's ``trainer_state.json``) and adapters must agree.  The fast tests at the
top check ``flatlora_dist.train.fsdp_args`` without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
ROOT = DIST.parent.parent
sys.path.insert(0, str(DIST))

from app_common import max_diff, per_step  # noqa: E402
from app_inject import read_records  # noqa: E402
from fsdp_common import free_port  # noqa: E402

from flatlora_dist.train.config import ConfigError, parse_args  # noqa: E402
from flatlora_dist.train.fsdp_args import (  # noqa: E402
    fsdp_config,
    fsdp_from_env,
    fsdp_kind,
    fsdp_training_kwargs,
    hsdp_sizes,
)

APP = DIST / "app_fsdp_run.py"
STEPS = 3
ARGS = ["--model", "tiny", "--train_limit", "16", "--eval_limit", "4", "--eval_generate_limit", "0",
        "--max_length", "384", "--report_to", "none", "--logging_steps", "1", "--max_steps", str(STEPS),
        "--save_steps", str(STEPS)]  # fmt: skip
LORA_TENSORS = 2 * 7 * 2  # tiny Llama: 2 layers x 7 projections x (A, B)
DETERMINISM = ["--fsdp", "fsdp2", "--lora_dropout", "0"]
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


# ============================================================================================ no processes
@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")) or k in LAUNCH_ENV:
            monkeypatch.delenv(k)
    return monkeypatch


def test_fsdp_from_env_names_the_accelerate_config(clean_env):
    assert fsdp_from_env() is None
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_from_env() is None  # what an Accelerator given a plugin sets in-process: not a launcher config
    clean_env.setenv("FSDP_VERSION", "1")
    assert fsdp_from_env() == "fsdp1"
    clean_env.setenv("FSDP_VERSION", "2")
    assert fsdp_from_env() == "fsdp2"
    clean_env.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    clean_env.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2")
    assert fsdp_from_env() == "hsdp"


def test_fsdp_kwargs_and_refusals(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    cfg = parse_args(["--fsdp", "fsdp1"])
    kw = fsdp_training_kwargs(fsdp_kind(cfg))
    assert kw["fsdp"] is True and kw["fsdp_config"] == fsdp_config("fsdp1")
    assert kw["fsdp_config"]["use_orig_params"] is True and kw["fsdp_config"]["sync_module_states"] is False
    assert fsdp_training_kwargs(fsdp_kind(parse_args(["--fsdp", "fsdp2"])))["fsdp_config"]["version"] == 2
    # under accelerate launch the YAML's settings win (no fsdp arguments), and a contradicting flag is refused
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "2")
    cfg = parse_args([])
    assert fsdp_kind(cfg) == "fsdp2" and fsdp_training_kwargs(fsdp_kind(cfg)) == {} and cfg.fsdp is None
    with pytest.raises(ConfigError, match="contradicts the accelerate config"):
        fsdp_kind(parse_args(["--fsdp", "fsdp1"]))
    clean_env.delenv("ACCELERATE_USE_FSDP")
    clean_env.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="needs a launcher"):
        fsdp_kind(parse_args(["--fsdp", "fsdp2"]))  # one process that no launcher started
    clean_env.setenv("LOCAL_RANK", "0")  # torchrun --nproc_per_node 1: a 1-rank FSDP run
    assert fsdp_training_kwargs(fsdp_kind(parse_args(["--fsdp", "fsdp2"])))["fsdp_config"]["version"] == 2


def test_hsdp_sizes(clean_env):
    assert hsdp_sizes(world=4, per_node=2) == (2, 2)  # 2 nodes x 2 processes
    assert hsdp_sizes(world=16, per_node=8) == (2, 8)
    clean_env.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    assert hsdp_sizes(world=4, per_node=4) == (2, 2)  # one node, 2x2 by request
    clean_env.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "4")
    with pytest.raises(ConfigError, match="replicas x shards"):
        hsdp_sizes(world=6, per_node=6)  # 4 does not divide 6
    clean_env.delenv("PARALLELISM_CONFIG_DP_SHARD_SIZE")
    with pytest.raises(ConfigError):
        hsdp_sizes(world=4, per_node=4)  # one node, nothing to replicate over


# ============================================================================================ launchers
def _env(record: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")) and k not in LAUNCH_ENV}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore::FutureWarning", APP_FSDP_RECORD=str(record), **extra)  # fmt: skip
    return env


def _result(out: Path, procs: list[tuple[subprocess.Popen, Path]], world: int) -> dict:
    for p, _ in procs:
        try:
            p.wait(timeout=400)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
    logs = "\n".join(f"--- {log.name} (exit {p.returncode})\n{log.read_text()[-4000:]}" for p, log in procs)
    assert all(p.returncode == 0 for p, _ in procs), logs
    record = out.parent / f"{out.name}.record"
    return {
        "out": out,
        "summary": json.loads((out / "summary.json").read_text()),
        "ranks": [json.loads((record / f"rank{r}.json").read_text()) for r in range(world)],
        "log": logs,
    }


def _start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), log


def torchrun_cmd(out: Path, args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "--shutdown_timeout", "120",
            str(APP), *ARGS, "--output_dir", str(out), *args]  # fmt: skip


def torchrun(out: Path, args: list[str], nproc: int = 2, **env: str) -> dict:
    cmd = torchrun_cmd(out, args, nproc)
    return _result(out, [_start(cmd, _env(out.parent / f"{out.name}.record", **env), out.parent / f"{out.name}.log")], nproc)


def recorded(out: Path, batch: int) -> dict:
    """``torchrun --fsdp fsdp2 --lora_dropout 0``, global batch 4 (``4 // batch`` ranks x ``batch``), with the
    per-step recorder of ``app_inject`` too: ``records`` per rank (loss, LR, factor, and at each step the sum
    of squared noise in the rank's stored base elements)."""
    nproc = 4 // batch
    record = out.parent / f"{out.name}.steps.rank{{rank}}.jsonl"
    args = [*DETERMINISM, "--per_device_train_batch_size", str(batch)]
    run = torchrun(out, args, nproc, APP_INJECT=json.dumps({"record": str(record)}))
    run["records"] = [read_records(str(record).format(rank=r)) for r in range(nproc)]
    return run


def two_nodes(out: Path, args: list[str]) -> dict:
    """Two torchrun agents (``--nnodes 2``, one process each) meeting through a c10d rendezvous on loopback."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", f"flatlora-{port}", str(APP), *ARGS, "--output_dir", str(out), *args]  # fmt: skip
        procs.append(_start(cmd, _env(out.parent / f"{out.name}.record"), out.parent / f"{out.name}.node{node}.log"))
    return _result(out, procs, 2)


def accelerate_launch(out: Path, config: str, args: list[str]) -> dict:
    nproc = {"fsdp1": 2, "fsdp2": 2, "hsdp": 4}[config]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / f"{config}.yaml"), "--main_process_port", str(free_port()),
           str(APP), *ARGS, "--output_dir", str(out), *args]  # fmt: skip
    env = _env(out.parent / f"{out.name}.record", ACCELERATE_USE_CPU="true")
    return _result(out, [_start(cmd, env, out.parent / f"{out.name}.log")], nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp_app")
    cache: dict[str, dict] = {}
    makers = {
        "fsdp2": lambda: torchrun(base / "fsdp2", ["--fsdp", "fsdp2"]),
        "fsdp1": lambda: torchrun(base / "fsdp1", ["--fsdp", "fsdp1"]),
        "two_nodes": lambda: two_nodes(base / "two_nodes", ["--fsdp", "fsdp2"]),
        "accelerate_fsdp2": lambda: accelerate_launch(base / "accelerate_fsdp2", "fsdp2", []),
        "hsdp": lambda: torchrun(base / "hsdp", ["--fsdp", "hsdp"], nproc=4, PARALLELISM_CONFIG_DP_SHARD_SIZE="2"),
        # LoRA dropout off: each rank draws its masks from its own RNG stream (same seed on every rank), so
        # with dropout 1 x 4 and 2 x 2 are different computations (measured: adapters 1.3e-3 apart)
        "fsdp2_1x4": lambda: recorded(base / "fsdp2_1x4", batch=4),
        "fsdp2_2x2": lambda: recorded(base / "fsdp2_2x2", batch=2),
    }

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = makers[name]()
        return cache[name]

    return get


# ============================================================================================ reading
def losses(run: dict) -> dict[int, float]:
    """Training loss per optimizer step from the final checkpoint's trainer_state.json."""
    state = json.loads((run["out"] / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def adapter(run: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run["out"] / "adapter" / "adapter_model.safetensors"))


def check_adapter_loads(run: dict) -> dict[str, torch.Tensor]:
    """Complete (every LoRA tensor of the tiny model, trained) and loadable with ``PeftModel.from_pretrained``,
    the loaded factors equal to the file's."""
    from peft import PeftModel

    from flatlora_dist.train.model import load_model

    saved = adapter(run)
    assert len(saved) == LORA_TENSORS, sorted(saved)
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(float(v.abs().sum()) > 0 for k, v in saved.items() if ".lora_B." in k)  # trained away from B = 0
    base, _ = load_model("tiny")
    loaded = PeftModel.from_pretrained(base, str(run["out"] / "adapter"))
    got = {n.replace(".default.", "."): p.detach() for n, p in loaded.named_parameters() if ".lora_" in n}
    assert sorted(got) == sorted(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    return saved


def check_run(run: dict, *, kind: str, backend: str, world: int = 2, drawn_steps: int = STEPS - 1) -> None:
    """``drawn_steps``: steps this process perturbed (cosine schedule: step 0 has factor 0, no draw)."""
    s = run["summary"]
    assert s["backend"] == kind and s["world_size"] == world and s["steps"] == STEPS
    assert s["flatlora"]["backends"] == backend
    assert s["flatlora"]["norm_allreduces"] == drawn_steps
    assert s["base_weights_unchanged"] is True
    assert s["base_fingerprint_before"] == s["base_fingerprint_after"]
    assert s["skipped_steps"] == []
    for r in run["ranks"]:
        assert r["world"] == world and r["dist_backend"] == "gloo"
        assert r["accelerate_distributed_type"] == "DistributedType.FSDP"
        assert r["backend"] == backend
    assert (run["out"] / f"checkpoint-{STEPS}" / "COMPLETE").is_file()
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


# ============================================================================================ tests
@pytest.mark.slow
def test_torchrun_fsdp2(runs):
    """torchrun, 2 ranks, --fsdp fsdp2: fully_shard units built by the Trainer, Flat-LoRA through FSDP2Backend,
    base weights bitwise unchanged, complete loadable adapter."""
    run = runs("fsdp2")
    check_run(run, kind="fsdp2", backend="fsdp2")
    for r in run["ranks"]:
        assert r["fsdp_version"] == 2 and r["fsdp2_units"] > 2 and r["fsdp1_units"] == 0
        assert r["weight_type"] == "DTensor" and r["mesh_shape"] == [2] and r["reduce_group_size"] == 2
    check_adapter_loads(run)


@pytest.mark.slow
def test_torchrun_fsdp1(runs):
    """torchrun, 2 ranks, --fsdp fsdp1: FSDP1 use_orig_params with the Trainer's PEFT auto-wrap (every LoRA
    Linear its own unit), FSDP1Backend, same computation as FSDP2 (losses and adapter agree)."""
    run = runs("fsdp1")
    check_run(run, kind="fsdp1", backend="fsdp1")
    for r in run["ranks"]:
        assert r["fsdp_version"] == 1 and r["fsdp1_units"] > 2 and r["reduce_group_size"] == 2
        assert r["lora_units"] == LORA_TENSORS  # PEFT's policy wraps each LoRA A/B: the backend must see through it
        assert "SHARDED_STATE_DICT" in r["state_dict_type"]  # CPU: FULL_STATE_DICT saves segfault in torch 2.13
    saved = check_adapter_loads(run)
    ref = runs("fsdp2")
    assert losses(run) == pytest.approx(losses(ref), rel=1e-5)
    other = adapter(ref)
    assert max_diff(saved, other) < 1e-5


@pytest.mark.slow
def test_two_nodes_match_one_node(runs):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on loopback, one process each) train the same
    3 steps as one node with 2 processes: per-step losses within 1e-5, same adapter."""
    multi = runs("two_nodes")
    check_run(multi, kind="fsdp2", backend="fsdp2")
    single = runs("fsdp2")
    a, b = losses(multi), losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    sa, sb = adapter(multi), adapter(single)
    assert max_diff(sa, sb) < 1e-5
    check_adapter_loads(multi)


@pytest.mark.slow
def test_accelerate_launch_fsdp2_yaml(runs):
    """accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train.py --model tiny (no --fsdp):
    the YAML's FSDP2 settings, the CPU switch, the same computation as torchrun --fsdp fsdp2."""
    run = runs("accelerate_fsdp2")
    check_run(run, kind="fsdp2", backend="fsdp2")
    for r in run["ranks"]:
        assert r["fsdp_version"] == 2 and r["weight_type"] == "DTensor" and r["reduce_group_size"] == 2
    check_adapter_loads(run)
    assert losses(run) == pytest.approx(losses(runs("fsdp2")), rel=1e-5)


@pytest.mark.slow
def test_torchrun_hsdp_2x2(runs):
    """4 ranks as 2 replicas x 2 shards: a (2, 2) mesh, row norms reduced over the 2-rank shard group only."""
    run = runs("hsdp")
    check_run(run, kind="hsdp", backend="fsdp2", world=4)
    for r in run["ranks"]:
        assert r["mesh_shape"] == [2, 2] and r["reduce_group_size"] == 2
    check_adapter_loads(run)


@pytest.mark.slow
def test_fsdp2_world_size_1_equals_2(runs):
    """FSDP2, same global batch (4 x 1 rank vs 2 x 2 ranks; torchrun --nproc_per_node 1 is a real 1-rank FSDP2
    run: DTensor weights on a mesh of 1): same adapter within tolerance; per step the same factor, LR and row
    std, the same loss, and the noise in the single rank's weights equals the sum over the two ranks' shards
    (noise keyed by global index, whatever the world size)."""
    one, two = runs("fsdp2_1x4"), runs("fsdp2_2x2")
    check_run(two, kind="fsdp2", backend="fsdp2")
    s = one["summary"]
    assert s["backend"] == "fsdp2" and s["world_size"] == 1 and s["steps"] == STEPS
    assert s["skipped_steps"] == [] and s["flatlora"]["backends"] == "fsdp2"
    assert s["base_weights_unchanged"] is True
    (r,) = one["ranks"]
    assert r["fsdp_version"] == 2 and r["fsdp2_units"] > 2
    assert r["weight_type"] == "DTensor" and r["mesh_shape"] == [1] and r["backend"] == "fsdp2"
    saved = check_adapter_loads(one)
    other = adapter(two)
    diff = max_diff(saved, other)
    assert diff <= 1e-6, diff  # measured 2e-8 (factors ~0.1): reduction order only
    a, r0, r1 = per_step(one["records"][0]), per_step(two["records"][0]), per_step(two["records"][1])
    assert sorted(a["logs"]) == sorted(r0["logs"]) == list(range(1, STEPS + 1))
    for step in range(STEPS):
        la, lb = a["logs"][step + 1], r0["logs"][step + 1]  # a step's log line is filed under its end step
        assert la["flatlora/factor"] == lb["flatlora/factor"] and la["learning_rate"] == lb["learning_rate"]
        assert la["flatlora/mean_row_std"] == pytest.approx(lb["flatlora/mean_row_std"], rel=1e-6)
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6)  # measured 8e-8 (step 1), equal after
        # measured 0, 2e-16, 8e-10 relative: summation order, then the factors' 2e-8 difference (row norms)
        assert a["noise"][step] == pytest.approx(r0["noise"][step] + r1["noise"][step], rel=1e-6, abs=1e-12)
    assert a["noise"][STEPS - 1] > 0 and r0["noise"][STEPS - 1] > 0 and r1["noise"][STEPS - 1] > 0


@pytest.mark.slow
def test_torchrun_sigterm_checkpoints_then_resume_equals_uninterrupted(runs, tmp_path):
    """SIGTERM to the torchrun agent during step 2 of 3 (as Slurm's --signal=TERM or scancel sends it): the
    agent forwards it to both ranks, which finish the step, write a complete checkpoint-2 and exit 143 within
    --shutdown_timeout, with no adapter or summary; torchrun ... --resume then ends with the per-step losses
    and the adapter of the uninterrupted run."""
    out = tmp_path / "run"
    inject = {"actions": [{"step": 1, "rank": 0, "do": "sigterm_launcher"}]}
    proc, log = _start(torchrun_cmd(out, ["--fsdp", "fsdp2"]), _env(tmp_path / "term.record",
                       APP_INJECT=json.dumps(inject)), tmp_path / "term.log")  # fmt: skip
    proc.wait(timeout=400)
    tail = log.read_text()
    assert proc.returncode != 0, tail[-4000:]  # torchrun reports the signal it got
    assert "stopped: SIGTERM at step 2/3" in tail, tail[-4000:]
    assert "Sending process" in tail and "forcefully exiting" not in tail  # forwarded; exited before SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()

    resumed = torchrun(out, ["--fsdp", "fsdp2", "--resume"])
    check_run(resumed, kind="fsdp2", backend="fsdp2", drawn_steps=1)  # step 3 only
    assert resumed["summary"]["resumed_from"].endswith("checkpoint-2")
    ref = runs("fsdp2")
    assert losses(resumed) == pytest.approx(losses(ref), rel=1e-5)
    saved, other = check_adapter_loads(resumed), adapter(ref)
    assert max_diff(saved, other) <= 1e-5


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2", "hsdp"])
def test_cuda_runs_load_with_cpu_ram_efficient_loading(kind):
    """On CUDA ``--fsdp`` loads through accelerate's CPU-RAM-efficient path (rank 0 reads, others on meta;
    FSDP1 syncs module states); on CPU it stays off (accelerate refuses sync_module_states there)."""
    gpu, cpu = fsdp_config(kind, cuda=True), fsdp_config(kind, cuda=False)
    assert gpu["cpu_ram_efficient_loading"] is True and cpu["cpu_ram_efficient_loading"] is False
    if kind == "fsdp1":
        assert gpu["sync_module_states"] is True and cpu["sync_module_states"] is False
    assert fsdp_config(kind) == (gpu if torch.cuda.is_available() else cpu)
