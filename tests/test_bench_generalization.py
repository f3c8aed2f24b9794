"""studies/generalization.py: the reference arm's noise, the perturbation windows, and a --quick run.

The reference-noise and window tests use the tiny random Llama (< 5 s); the end-to-end test runs
``studies/generalization.py --study all --quick`` (all-MiniLM-L6-v2, ~25 s on 2 cores) and checks the
JSON schema of both studies and that the plots were written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "studies"), str(ROOT / "bench")]

from generalization import ALT_SEED_OFFSET, Perturber, parse_arm, report, train_loop  # noqa: E402
from reference import ReferenceFlatLoRA  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora_dist.probe import merged_row_norms  # noqa: E402
from flatlora_dist.targets import find_targets  # noqa: E402


def _noise_ratio(model, perturb, restore) -> float:
    """sum ||noise||^2 / sum (expected row std)^2 * n over every target: 1 for the paper's noise law."""
    targets = find_targets(model)
    before = [t.weight.detach().clone() for t in targets]
    expected = sum(float((merged_row_norms(t) ** 2).sum()) for t in targets)  # (rho·||row||/sqrt(n))^2·n / rho^2
    perturb()
    got = sum(float(((t.weight.detach() - b) ** 2).sum()) for t, b in zip(targets, before))
    restore()
    return got / expected


def test_reference_and_library_draw_the_same_noise_law():
    sigma = 0.1
    model = tiny_llama()
    ref = ReferenceFlatLoRA(model, rho=sigma, total_steps=1, schedule="constant", rng=7)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=1, schedule="constant", seed=7))
    r_ref = _noise_ratio(model, ref.perturb, ref.restore) / sigma**2
    r_flat = _noise_ratio(model, lambda: flat.perturb(0), flat.restore) / sigma**2
    # ~40k Gaussian elements each: the ratio of sums of squares is within a few % of 1
    assert r_ref == pytest.approx(1.0, abs=0.05)
    assert r_flat == pytest.approx(1.0, abs=0.05)


def test_reference_private_rng_leaves_dropout_rng_alone_and_restores():
    model = tiny_llama()
    targets = find_targets(model)
    before = [t.weight.detach().clone() for t in targets]
    ref = ReferenceFlatLoRA(model, rho=0.2, total_steps=4, rng=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ref.perturb(step=2)  # factor from the caller's step: 0.5
    assert ref.factor(2) == pytest.approx(0.5)
    moved = max(float((t.weight - b).abs().max()) for t, b in zip(targets, before))
    ref.restore()
    assert torch.equal(torch.get_rng_state(), state)
    back = max(float((t.weight - b).abs().max()) for t, b in zip(targets, before))
    assert moved > 1e-3 and back < 1e-6  # w + e - e: round-off only, as in the original
    assert ref.micro_step == 1 and ref.draws == 1
    with pytest.raises(ValueError, match="rng"):
        ReferenceFlatLoRA(model, rho=0.1, total_steps=1, rng=-1)


@pytest.mark.parametrize("arm,draws", [("lora", 0), ("flat0.1", 3), ("ref0.1", 6)])
def test_windows_per_step_and_per_micro_batch(arm, draws):
    """3 optimizer steps x 2 micro-batches: the library perturbs once per step, the reference per micro."""
    model = tiny_llama()
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    noise = Perturber(model, arm, steps=3, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    seen = []

    def micro(step):
        def fn():
            seen.append(isinstance(noise.impl, FlatLoRA) and noise.impl.is_perturbed)
            return model(input_ids=x, labels=x).loss / 2

        return [fn, fn]

    hist = train_loop(noise, opt, sched, 3, micro)
    assert len(hist) == 3 and all(math.isfinite(h) for h in hist)
    if arm == "lora":
        assert noise.stats() is None
    elif arm.startswith("ref"):
        assert noise.stats() == {"draws": draws}
    else:
        assert all(seen[2:])  # perturbed through both micro-batches once the ramp is > 0
        assert not noise.impl.is_perturbed and noise.stats()["step"] == 2
    assert parse_arm(arm)[0] in ("lora", "flat", "ref")


def test_parse_arm_and_the_second_noise_stream():
    assert parse_arm("flat0.05") == ("flat", 0.05) and parse_arm("ref0.2") == ("ref", 0.2)
    assert parse_arm("alt0.2") == ("alt", 0.2)
    model = tiny_llama()
    assert Perturber(model, "flat0.2", 3, seed=4).impl.config.seed == 4
    assert Perturber(model, "alt0.2", 3, seed=4).impl.config.seed == 4 + ALT_SEED_OFFSET
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arm("sam0.1")


def _fake_run(task: str, arm: str, seed: int) -> dict:
    """A run record with every field the reports read; values differ per (arm, seed)."""
    v = 0.01 * seed + 0.001 * ((len(arm) * (seed + 3)) % 7)  # paired differences vary over seeds
    splits = ("test", "amazon", "tweets", "nyt") if task == "sentiment" else ("test", "validation")
    run = {"loss": {s: 1.0 + v + 0.1 * k for k, s in enumerate(splits)},
           "probe": {"radii": [0.05, 0.1, 0.2], "rise": [v, 2 * v, 4 * v]}}  # fmt: skip
    if task == "sentiment":
        run |= {"acc": {s: 0.7 + v for s in splits}, "train_acc": 1.0, "train_loss": 0.01 + v}
    return run


def test_report_keeps_every_task_and_each_tasks_own_seeds(tmp_path):
    """A math-only run (fewer seeds) must not drop sentiment from the combined report, nor cut
    sentiment to math's seed count (the report once covered only the tasks and --seeds of the last run)."""
    arms = {"sentiment": ["lora", "flat0.05", "flat0.1", "flat0.2", "ref0.2"], "math": ["lora", "flat0.2", "ref0.2"]}
    seeds = {"sentiment": range(5), "math": range(3)}
    for task in arms:
        runs = {f"{a}/{s}": _fake_run(task, a, s) for a in arms[task] for s in seeds[task]}
        (tmp_path / f"generalization_runs_{task}.json").write_text(json.dumps({"meta": {"task": task}, "runs": runs}))
    (tmp_path / "generalization_runs_math.json").write_text(json.dumps({"meta": {}, "runs": {
        **json.loads((tmp_path / "generalization_runs_math.json").read_text())["runs"],
        "lora/3": _fake_run("math", "lora", 3)}}))  # an unfinished seed: not paired  # fmt: skip
    merged = report(tmp_path, "generalization", [0.05, 0.1, 0.2], 0.2)
    assert merged["study_a"]["sentiment"]["seeds"] == [0, 1, 2, 3, 4]
    assert merged["study_a"]["math"]["seeds"] == [0, 1, 2]
    assert merged["study_a"]["math"]["margins"] == {"loss/test": 0.01}
    assert merged["study_b"]["seeds"] == [0, 1, 2, 3, 4]
    md = (tmp_path / "generalization.md").read_text()
    assert "### Study A (sentiment)" in md and "### Study A (math)" in md and "### Study B" in md
    assert "held-out-template CE" in md  # math's split is not labelled as the movie test set
    assert json.loads((tmp_path / "generalization.json").read_text())["study_a"].keys() == {"sentiment", "math"}
    assert (tmp_path / "study_a.png").stat().st_size > 0 and (tmp_path / "study_b.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "studies" / "generalization.py"), "--study", "all", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "generalization_quick.json").read_text())
    runs = data["runs"]["sentiment"]
    arms = ["lora", "flat0.05", "flat0.1", "flat0.2", "ref0.2"]
    assert sorted(runs) == sorted(f"{a}/{s}" for a in arms for s in (0, 1))
    one = runs["ref0.2/0"]
    assert set(one["acc"]) == {"test", "amazon", "tweets", "nyt"} and set(one["loss"]) == set(one["acc"])
    assert one["noise_stats"]["draws"] == one["steps"]  # one micro-batch per step: one draw each
    assert runs["flat0.2/0"]["noise_stats"]["step"] == one["steps"] - 1
    a = data["study_a"]["sentiment"]
    assert a["arms"] == ["lora", "flat0.2", "ref0.2"] and a["seeds"] == [0, 1]
    assert set(a["pairs"]) == {"flat-ref", "flat-lora", "ref-lora"}
    for m, margin in a["margins"].items():
        t = a["pairs"]["flat-ref"][m]["tost"]
        assert t["margin"] == margin == 0.015 and 0 <= t["p"] <= 1
        assert t["equivalent"] == (-margin < t["ci"][0] and t["ci"][1] < margin)
    assert isinstance(a["equivalent_all"], bool)
    b = data["study_b"]
    assert b["sigmas"] == [0.05, 0.1, 0.2] and b["arms"] == arms[:4]
    assert len(b["effects"]["acc"]) == 12 and len(b["effects"]["probe_rise"]) == 9
    e = b["effects"]["acc"]["flat0.1|acc/nyt"]
    assert e["level"] == pytest.approx(1 - 0.05 / 12)
    assert e["ci"][0] <= e["ci_uncorrected"][0] <= e["mean"] <= e["ci_uncorrected"][1] <= e["ci"][1]
    assert 0 <= e["p"] <= e["p_holm"] <= 1
    assert len(b["probe"]["lora"]["mean"]) == 3
    for name in ("study_a_quick.png", "study_b_quick.png", "generalization_quick.md"):
        assert (tmp_path / name).stat().st_size > 0
