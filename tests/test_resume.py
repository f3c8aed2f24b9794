"""Interrupted runs (issue 6 + 8.1/8.2): SIGKILL mid-step, SIGTERM, partial checkpoints, --resume.

A resumed run must equal the uninterrupted one: same final adapter (fp32, atol 1e-5), same data
order (hash of every micro-batch), same noise schedule and noise actually applied (sum of squared
noise in the base weights at every step), same LR and loss per step.  Kills are real signals, sent by
the process to itself at a chosen micro-batch (``tests/dist/app_inject.py``), so they land while
Flat-LoRA noise is in the base weights.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from app_common import (  # noqa: E402
    SINGLE,
    ZERO3,
    ZERO3_NAN,
    adapter,
    assert_same_steps,
    checkpoint_float_tensors,
    in_process,
    lora_shapes,
    max_diff,
    per_step,
    single_reference,
    subprocess_run,
    zero3_reference,
)

from flatlora_dist.train.run import STOPPED_EXIT_CODE  # noqa: E402


def complete(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if (p / "COMPLETE").is_file())


def assert_only_lora_state(out: Path, lora: dict[str, torch.Tensor]) -> None:
    """Every float tensor in every complete checkpoint is LoRA-shaped (adapter, Adam moments) or, in
    DeepSpeed's ``global_step*/`` files, a flat partition (fp32 master, Adam moments) no larger than
    all LoRA weights together: no base weight anywhere (a tiny base layer alone is 4096+ elements
    of a 64-wide shape no LoRA factor has)."""
    shapes, total = lora_shapes(lora), sum(t.numel() for t in lora.values())
    for ckpt in (out / c for c in complete(out)):
        for name, t in checkpoint_float_tensors(ckpt):
            flat_partition = name.startswith("global_step") and t.dim() == 1 and t.numel() <= total
            ok = tuple(t.shape) in shapes or flat_partition
            assert ok, f"{ckpt.name}/{name}: {tuple(t.shape)} is not LoRA state"
        saved = adapter(ckpt)
        assert saved and all("lora_" in k for k in saved), sorted(saved)[:3]


def assert_merged_is_base_plus_lora(out: Path) -> None:
    """merged == an independent PEFT merge of the saved adapter into a freshly built base, bitwise;
    so the merged model's base part is exactly the original base (no noise escaped)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from flatlora_dist.train.tiny import build_tiny_llama

    merged = {}
    for f in (out / "merged").glob("*.safetensors"):
        merged.update(load_file(str(f)))
    base, _ = build_tiny_llama()
    clean = {k: v.clone() for k, v in base.state_dict().items()}
    independent = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload().state_dict()
    assert merged.keys() == independent.keys()
    for k in merged:
        assert torch.equal(merged[k], independent[k]), k
        if not any(t in k for t in ("_proj.",)):  # not a LoRA target: the original base, untouched
            assert torch.equal(merged[k], clean[k]), k
    changed = [k for k in merged if "_proj." in k and not torch.equal(merged[k], clean[k])]
    assert changed, "the merge must contain the trained s*BA"


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.slow  # end to end: the app in a subprocess, killed and resumed
def test_sigkill_mid_window_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL at micro-batch 2 of 3 of step 5 (after checkpoint-4, noise in the weights); partial
    checkpoints 6 and 9 lie around; --resume --merge continues from checkpoint-4 and ends where the
    uninterrupted run ends.  --save_total_limit 2 on the resume: only complete checkpoints count, and
    the set-aside folders (which HF's own rotation would take for the newest) are left alone."""
    ref = single_reference()
    out = tmp_path / "run"
    code, recs, tail = subprocess_run(out, SINGLE, [{"step": 4, "micro": 2, "do": "sigkill"}])
    assert code == -signal.SIGKILL, tail[-5000:]
    assert complete(out) == ["checkpoint-2", "checkpoint-4"] and not (out / "summary.json").exists()
    killed = [r for r in recs[0] if r["kind"] == "micro" and r["step"] == 4]
    assert [r["micro"] for r in killed] == [1, 2], "the kill must land inside the window"

    # a save killed half way (no COMPLETE) and a stray folder from some other attempt
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (out / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6')
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "optimizer.pt").write_bytes(b"garbage")

    code, resumed = in_process(out, [*SINGLE, "--resume", "--merge", "--save_total_limit", "2"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from"].endswith("checkpoint-4") and s["steps"] == 6
    assert s["base_weights_unchanged"] is True
    aside = sorted(p.name.rsplit("-", 1)[0] for p in out.glob("incomplete-checkpoint-*"))
    assert aside == ["incomplete-checkpoint-6", "incomplete-checkpoint-9"]
    assert complete(out) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    final, expected = adapter(out / "adapter"), adapter(ref["out"] / "adapter")
    assert max_diff(final, expected) <= 1e-5
    assert_same_steps(per_step(recs[0], resumed), per_step(ref["records"]), range(6))
    assert_only_lora_state(out, final)
    assert_merged_is_base_plus_lora(out)


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.slow  # end to end: the app in a subprocess, killed and resumed
def test_sigterm_writes_complete_checkpoint_exits_143_and_resumes(tmp_path):
    """SIGTERM mid-window at step 3 (not a save step), twice (as when both the process group and the
    DeepSpeed launcher signal a rank): the step finishes, checkpoint-3 is written and marked
    COMPLETE, the process exits 143 with no summary/adapter; --resume ends as uninterrupted."""
    ref = single_reference()
    out = tmp_path / "run"
    twice = [{"step": 2, "micro": 1, "do": "sigterm"}, {"step": 2, "micro": 2, "do": "sigterm"}]
    code, recs, tail = subprocess_run(out, SINGLE, twice)
    assert code == STOPPED_EXIT_CODE == 143, tail[-5000:]
    assert "stopped: SIGTERM at step 3/6" in tail and "Traceback" not in tail
    assert complete(out) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert max(r["step"] for r in recs[0] if r["kind"] == "micro") == 2, "stops at the end of that step"

    code, resumed = in_process(out, [*SINGLE, "--resume"])
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("checkpoint-3")
    assert max_diff(adapter(out / "adapter"), adapter(ref["out"] / "adapter")) <= 1e-5
    assert_same_steps(per_step(recs[0], resumed), per_step(ref["records"]), range(6))


def test_resume_without_complete_checkpoint_starts_fresh_and_sets_partial_aside(tmp_path):
    """Only an unmarked checkpoint: --resume loads nothing (fresh start) and moves it aside."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    code, _ = in_process(out, ["--max_steps", "1", "--resume"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from"] is None and s["steps"] == 1
    assert [p.name.rsplit("-", 1)[0] for p in out.glob("incomplete-*")] == ["incomplete-checkpoint-2"]


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.slow
def test_zero3_two_ranks_sigkill_sigterm_resume_equals_uninterrupted(tmp_path):
    """2-rank ZeRO-3 under the DeepSpeed launcher: SIGKILL to rank 1 mid-step 4 (after checkpoint-2);
    --resume with SIGTERM to rank 1 only at step 3: both ranks agree, save checkpoint-3 and exit 143;
    --resume again finishes equal to the uninterrupted run, rank by rank, step by step."""
    ref = zero3_reference()
    out = tmp_path / "run"
    code, killed, tail = subprocess_run(out, ZERO3, [*ZERO3_NAN, {"step": 3, "rank": 1, "do": "sigkill"}],
                                        world=2, launcher=True)  # fmt: skip
    assert code != 0, tail[-5000:]
    assert complete(out) == ["checkpoint-2"] and not (out / "summary.json").exists()

    code, termed, tail = subprocess_run(out, [*ZERO3, "--resume"], [{"step": 2, "rank": 1, "do": "sigterm"}],
                                        world=2, launcher=True)  # fmt: skip
    assert code == STOPPED_EXIT_CODE, tail[-5000:]
    assert "stopped: SIGTERM on another rank at step 3/6" in tail  # rank 0 never got the signal
    assert complete(out) == ["checkpoint-2", "checkpoint-3"] and not (out / "summary.json").exists()
    for r in range(2):
        assert max(x["step"] for x in termed[r] if x["kind"] == "micro") == 2, f"rank {r} went on"

    code, resumed, tail = subprocess_run(out, [*ZERO3, "--resume"], world=2, launcher=True)
    assert code == 0, tail[-5000:]
    s = json.loads((out / "summary.json").read_text())
    expected = json.loads((ref["out"] / "summary.json").read_text())
    assert s["resumed_from"].endswith("checkpoint-3") and s["base_weights_unchanged"] is True
    assert s["skipped_steps"] == expected["skipped_steps"] == [2]  # carried over by the checkpoints
    final = adapter(out / "adapter")
    assert max_diff(final, adapter(ref["out"] / "adapter")) <= 1e-5
    # under DeepSpeed the engine has stepped inside backward by on_pre_optimizer_step: the noise must be out
    # of every step whose update ran; the NaN step's update never ran (ZeRO skipped it before the torch
    # optimizer, whose step pre-hook restores), so its noise stays until on_step_end
    pre_opt = [x for recs in (killed, termed, resumed) for x in recs[0] + recs[1] if x["kind"] == "pre_opt"]
    ran = [x for x in pre_opt if x["step"] + 1 not in s["skipped_steps"]]
    assert len(ran) >= 12 and not any(x["perturbed"] for x in ran), "engine.step ran on noisy weights"
    for r in range(2):
        chain = per_step(killed[r], termed[r], resumed[r])
        assert_same_steps(chain, per_step(ref["records"][r]), range(6))
    assert_only_lora_state(out, final)
