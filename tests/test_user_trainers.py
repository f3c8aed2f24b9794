"""FlatLoRACallback in a user's own script (``tests/dist/user_trainers.py``, which runs the README's "Use it
with your own Trainer / TRL" blocks as written): a plain ``Trainer`` and TRL's ``SFTTrainer``, single
process and 2-rank ZeRO-3 (``ds_configs/zero3.json``: ``"auto"`` values, bf16 ``"auto"``), and a
``Trainer`` under FSDP2 via ``accelerate launch``; gradient accumulation 2, gradient checkpointing in the
README runs.  Each checks that every forward of a step (recomputations included) sees the same perturbed
weights, that step 0's perturbation is a single-process ``FlatLoRA``'s on an unsharded copy, that the
noise was really in, and that the base is bitwise unchanged afterwards; the guarded runs check that a
NaN step is skipped by the callback alone and that a mid-training checkpoint holds the clean adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))

import user_trainers as ut  # noqa: E402
from ds_common import launch, worker_env  # noqa: E402
from launcher import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def check_noise(rec: dict, *, bitwise: bool, recompute: bool) -> None:
    """Same weights in every forward of a step, a new draw each step, none clean; step 0 as FlatLoRA's."""
    for target in ut.TARGETS:
        r = rec[target]
        steps = r["hashes"]
        assert sorted(steps, key=int) == [str(s) for s in range(ut.STEPS)], steps.keys()
        per_step = ut.GAS * (2 if recompute else 1)
        for s, seen in steps.items():
            assert len(seen) == per_step and len(set(seen)) == 1, (target, s, seen)
        distinct = {seen[0] for seen in steps.values()}
        assert len(distinct) == ut.STEPS and r["clean"] not in distinct, "noise missing or not redrawn"
        assert r["step0_noise"] > 1e-3
        if bitwise:
            assert r["step0_bitwise"], r
        else:  # row norms summed over shards: rounding of the all-reduce only
            assert r["step0_max_diff"] <= 1e-6 * r["step0_noise"], r


def check_guarded(rec: dict, nan_step: int) -> None:
    assert rec["skipped_steps"] == [nan_step + 1]
    assert rec["lora_unchanged_over_nan_step"], "the NaN step's update leaked"
    assert rec["lora_finite"] and rec["base_unchanged"]


def check_readme_run(rec: dict, trainer: str, *, bitwise: bool) -> None:
    """A README block's run: noise as above (gradient checkpointing: two forwards per micro-batch), the
    base clean and bitwise unchanged; the Trainer's NaN step (1) skipped, none in the SFT run."""
    check_noise(rec, bitwise=bitwise, recompute=True)
    assert rec["base_unchanged"] and not rec["perturbed_after"] and rec["lora_finite"]
    if trainer == "trainer":
        check_guarded(rec, 1)
    else:
        assert rec["skipped_steps"] == []


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return ut.run({"mode": "single", "runs": ["trainer", "sft", "guarded"], "nan_step": 1},
                  tmp_path_factory.mktemp("user"))


@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_readme_trainers_single_process(single, trainer):
    """Both README trainers; the plain Trainer's run has a NaN step (skipped by the callback's pre-hook)."""
    assert single[trainer]["backends"] == "plain"
    check_readme_run(single[trainer], trainer, bitwise=True)


def test_callback_alone_skips_nonfinite_step_and_saves_clean_checkpoints(single):
    """A NaN loss at step 1 (0-based): no optimizer update (LoRA and Adam's step count unchanged), the LR
    scheduler does not advance, training goes on; checkpoint-2's adapter is the LoRA after 2 updates, and
    every save (checkpoints, one asked for mid-window, the final adapter) ran with the base clean: the
    Trainer saves after on_step_end, where the callback has restored (no save override needed)."""
    rec = single["guarded"]
    assert rec["backends"] == "plain"
    check_noise(rec, bitwise=True, recompute=False)
    check_guarded(rec, 1)
    assert rec["adam_steps"] == [ut.STEPS - 1] and rec["scheduler_epoch"] == ut.STEPS - 1
    assert rec["checkpoint2_equals_lora"]
    # checkpoint-1: a save asked for mid-window (done at the step end); every save found the base clean
    assert rec["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # 3: the last step
    assert len(rec["saves_saw_clean_base"]) >= 3 and all(rec["saves_saw_clean_base"])


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_readme_trainers_zero3_two_ranks(trainer):
    """Each README trainer on 2 ranks; the Trainer's NaN step is skipped by ZeRO itself (overflow) and
    reported through accelerate's step_was_skipped."""
    res = launch(DIST / "user_trainers.py", 2, {"mode": "zero3", "runs": [trainer], "nan_step": 1}, timeout=400)
    for rank in res:
        assert rank[trainer]["backends"] == "deepspeed", "not a ZeRO-3 run"
        check_readme_run(rank[trainer], trainer, bitwise=False)
    target = ut.TARGETS[0]
    assert res[0][trainer][target]["hashes"] == res[1][trainer][target]["hashes"], "ranks saw different weights"


@pytest.mark.slow
def test_trainer_fsdp2_accelerate_launch():
    """``accelerate launch --config_file launch/accelerate/fsdp2.yaml``: the README's ``train_flat`` on a
    Trainer; a NaN step skipped collectively by the callback's optimizer pre-hook."""
    env = worker_env(0, 2, free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    env["ACCELERATE_USE_CPU"] = "true"
    accelerate = Path(sys.executable).parent / "accelerate"
    spec = {"mode": "fsdp2", "runs": ["guarded"], "nan_step": 1}
    with tempfile.TemporaryDirectory(prefix="flatlora_user_") as out:
        cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "launch" / "accelerate" / "fsdp2.yaml"),
               "--main_process_port", str(free_port()), str(DIST / "user_trainers.py"), json.dumps(spec), out]  # fmt: skip
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        res = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in res:
        rec = rank["guarded"]
        assert rec["backends"] == "fsdp2", "not an FSDP2 run"
        check_noise(rec, bitwise=False, recompute=False)
        check_guarded(rec, 1)
