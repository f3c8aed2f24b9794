"""Reliability of the application (issue 8): perturbed state never escapes into saves, long-run
bitwise exactness, non-finite values, determinism across runs and world sizes.

Faults are injected by ``tests/dist/app_inject.py`` into real runs of ``main([...])``; multi-process
checks run under the DeepSpeed launcher (``@pytest.mark.slow``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from app_common import (  # noqa: E402
    ZERO3,
    adapter,
    bitwise_equal,
    in_process,
    max_diff,
    per_step,
    single_reference,
    subprocess_run,
    zero3_reference,
)
from conftest import fingerprint, tiny_llama  # noqa: E402
from ds_common import launch  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402

DIST = Path(__file__).parent / "dist"


# ---------------------------------------------------------------------------------------------- 8.4 engine
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_engine_skips_perturbation_on_nonfinite_row_norm(bad):
    """A non-finite LoRA B entry makes a row norm non-finite: the step runs unperturbed with a warning
    (or raises with skip_nonfinite=False), the base stays bitwise clean, the next step perturbs."""
    model = tiny_llama()
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant"))
    clean = fingerprint(model)
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    good = b.data[0, 0].item()
    b.data[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite row norm") as caught:
        flat.perturb(3)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert flat.is_perturbed and flat.stats()["skipped"] == 1 and flat.stats()["mean_row_std"] == 0
    assert fingerprint(model) == clean
    flat.restore()
    assert fingerprint(model) == clean

    strict = FlatLoRA(
        model, FlatLoRAConfig(sigma=0.1, total_steps=10, schedule="constant", skip_nonfinite=False)
    )
    with pytest.raises(FloatingPointError):
        strict.perturb(3)
    assert not strict.is_perturbed and fingerprint(model) == clean

    b.data[0, 0] = good
    flat.perturb(4)
    assert fingerprint(model) != clean and math.isfinite(flat.stats()["mean_row_std"])
    flat.restore()
    assert fingerprint(model) == clean


# ---------------------------------------------------------------------------------------------- 8.4 app
@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory):
    """6 steps, a checkpoint after each: a LoRA B entry is inf while step 1's norms are computed, and
    step 3's loss is NaN (forward hook on layer 0's MLP: NaN activations, loss and gradients)."""
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    args = ["--max_steps", "6", "--save_steps", "1", "--per_device_train_batch_size", "2",
            "--flat_schedule", "constant", "--sigma", "0.1"]  # fmt: skip
    actions = [{"step": 1, "do": "inf_norm"}, {"step": 3, "do": "nan_loss"}]
    logger = logging.getLogger("flatlora_dist.train")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite row norm") as warned:
            code, recs = in_process(out, args, actions)
    finally:
        logger.removeHandler(handler)
    return {
        "out": out,
        "code": code,
        "records": recs,
        "log": seen,
        "warnings": [str(w.message) for w in warned],
    }


def test_nonfinite_loss_skips_the_update_and_training_continues(nonfinite_run):
    out = nonfinite_run["out"]
    assert nonfinite_run["code"] == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_steps"] == [4] and s["base_weights_unchanged"] is True
    assert any("step 4: non-finite loss (nan)" in m and "update skipped" in m for m in nonfinite_run["log"])

    ck = {n: out / f"checkpoint-{n}" for n in range(1, 7)}
    assert bitwise_equal(adapter(ck[4]), adapter(ck[3])), "the NaN step must not move the adapter"
    opt3, opt4 = (torch.load(ck[n] / "optimizer.pt", weights_only=False)["state"] for n in (3, 4))
    assert opt3.keys() == opt4.keys() and all(
        torch.equal(opt3[i][k], opt4[i][k]) for i in opt3 for k in opt3[i]
    ), "Adam moments and step count must not move either"
    epochs = [torch.load(ck[n] / "scheduler.pt", weights_only=False)["last_epoch"] for n in range(1, 7)]
    assert epochs == [1, 2, 3, 3, 4, 5], "the LR scheduler skips the skipped step"
    for n in (5, 6):
        a = adapter(ck[n])
        assert all(torch.isfinite(t).all() for t in a.values())
        assert not bitwise_equal(a, adapter(ck[n - 1])), "training goes on after the skip"

    logs = per_step(nonfinite_run["records"])["logs"]
    assert not math.isfinite(logs[4]["grad_norm"]) and logs[4]["skipped_steps"] == 1
    assert all(math.isfinite(logs[n]["loss"]) and math.isfinite(logs[n]["grad_norm"]) for n in (5, 6))


def test_nonfinite_row_norm_in_a_run_skips_only_the_perturbation(nonfinite_run):
    """Step 1: the engine warns and runs the step unperturbed (factor 1, no noise in the weights);
    the update itself happens; steps 2+ are perturbed again."""
    assert any("non-finite row norm" in w for w in nonfinite_run["warnings"])
    noise = per_step(nonfinite_run["records"])["noise"]
    assert noise[1] == 0 and noise[0] > 0 and noise[2] > 0
    out = nonfinite_run["out"]
    assert not bitwise_equal(adapter(out / "checkpoint-2"), adapter(out / "checkpoint-1"))


# ---------------------------------------------------------------------------------------------- 8.2 saves
def test_saves_never_see_perturbed_weights():
    """Every save of the reference run (checkpoints 2/3/4/6, a save_model() called mid-window with noise
    in the weights, a should_save raised mid-window, the final adapter) found the base bitwise clean;
    the mid-window save put back exactly the same noise afterwards."""
    recs = single_reference()["records"]
    clean = next(r["fingerprint"] for r in recs if r["kind"] == "begin")
    saves = [r for r in recs if r["kind"] == "save"]
    targets = [Path(r["target"]).name for r in saves]
    assert targets == [
        "mid-save",
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
        "checkpoint-6",
        "adapter.tmp",
    ]
    for r in saves:
        assert not r["perturbed"] and r["fingerprint"] == clean and r["noise"] == 0, r
    (mid,) = [r for r in recs if r["kind"] == "save_mid"]
    assert mid["perturbed_before"] and mid["perturbed_after"] and mid["noise_before"] > 0
    assert mid["noise_after"] == mid["noise_before"], "the same noise must be back for the rest of the window"


# ---------------------------------------------------------------------------------------------- 8.5
def test_same_seed_gives_bitwise_identical_adapters(tmp_path):
    """A second run with the same settings (and without the reference's mid-window saves) is bitwise
    the same: runs are deterministic, and saving mid-window does not disturb training."""
    ref = single_reference()
    from app_common import SINGLE

    code, recs = in_process(tmp_path / "run", SINGLE)
    assert code == 0
    assert bitwise_equal(adapter(tmp_path / "run" / "adapter"), adapter(ref["out"] / "adapter"))
    assert per_step(recs)["noise"] == per_step(ref["records"])["noise"]


@pytest.mark.slow
def test_zero3_world_size_1_equals_2(tmp_path):
    """ZeRO-3, same global batch (4 x 1 rank vs 2 x 2 ranks), same NaN step: same adapter within
    tolerance; per step the same factor and LR, and the noise of the single rank equals the sum of
    the two ranks' noise (noise keyed by global index, whatever the world size)."""
    ref = zero3_reference()
    args = [a if a != "2" or i == 0 or ZERO3[i - 1] != "--per_device_train_batch_size" else "4"
            for i, a in enumerate(ZERO3)]  # fmt: skip
    assert args[args.index("--per_device_train_batch_size") + 1] == "4"
    code, recs, tail = subprocess_run(tmp_path / "run", args, [{"step": 1, "do": "nan_loss"}])
    assert code == 0, tail[-5000:]
    one = json.loads((tmp_path / "run" / "summary.json").read_text())
    two = json.loads((ref["out"] / "summary.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["skipped_steps"] == two["skipped_steps"] == [2]
    diff = max_diff(adapter(tmp_path / "run" / "adapter"), adapter(ref["out"] / "adapter"))
    assert diff <= 1e-6, diff  # measured 7e-9: reduction order only
    a, r0, r1 = per_step(recs[0]), per_step(ref["records"][0]), per_step(ref["records"][1])
    for s in range(6):
        la, lb = a["logs"][s + 1], r0["logs"][s + 1]
        assert la["flatlora/factor"] == lb["flatlora/factor"] and la["learning_rate"] == lb["learning_rate"]
        if s != 1:  # HF's NaN filter logs rank-dependent stand-ins for the NaN step's loss
            assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6)
        assert a["noise"][s] == pytest.approx(r0["noise"][s] + r1["noise"][s], rel=1e-6, abs=1e-12)
    assert a["noise"][5] > 0


@pytest.mark.slow
def test_zero3_nonfinite_loss_on_one_rank_skips_the_step_everywhere():
    """ZeRO-3 steps inside backward; a NaN loss on rank 1 at step 2 (warmup makes step 1's LR 0) makes
    ZeRO skip the optimizer and scheduler step on both ranks: the adapter saved at checkpoint-2 is
    still the initial one (B == 0), the LR does not advance, later steps are finite."""
    ref = zero3_reference()
    s = json.loads((ref["out"] / "summary.json").read_text())
    assert s["skipped_steps"] == [2] and s["base_weights_unchanged"] is True
    b = [t for k, t in adapter(ref["out"] / "checkpoint-2").items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(t) == 0 for t in b), "an update leaked through the skipped step"
    assert any(
        torch.count_nonzero(t) for k, t in adapter(ref["out"] / "checkpoint-4").items() if "lora_B" in k
    )
    for r in range(2):
        logs = per_step(ref["records"][r])["logs"]
        assert logs[1]["learning_rate"] == 0 and logs[2]["learning_rate"] == logs[3]["learning_rate"] > 0
        assert not math.isfinite(logs[2]["grad_norm"]) and logs[2]["skipped_steps"] == 1
        assert all(
            math.isfinite(logs[n]["grad_norm"]) and math.isfinite(logs[n]["loss"]) for n in (3, 4, 5, 6)
        )
    assert "step 2: non-finite loss (nan)" in ref["output"]


# ---------------------------------------------------------------------------------------------- 8.3
@pytest.mark.slow
def test_zero3_bf16_thousand_cycles_bitwise(monkeypatch):
    """1,000 perturb/restore cycles (a forward/backward/step every 100) on 2-rank ZeRO-3 with bf16
    bases, persistent and partitioned: every partition, every held gathered copy and the gathered
    weights are bitwise the loaded ones; the noise was real (fix-ups used, weights moved)."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::FutureWarning")  # readable rank logs on failure
    res = launch(DIST / "app_cycles.py", 2, dict(cycles=1000, sigma=0.05, persistence=5000, train_every=100,
                                                 check_every=100, probe_every=50))  # fmt: skip
    for r in res:
        assert r["cycles"] == 1000 and r["checks"] == 10 and r["steps"] == 10
        assert r["bitwise_local"], r.get("dirty")
        assert r["bitwise_gathered"]
        assert r["persistent_bases"] > 0 and r["partitioned_bases"] > 0
        assert r["fixups"] > 0 and r["max_noise"] > 1e-3 and r["lora_trained"]
