"""The CPU row norms through ``native/row_sumsq.c`` (``norms.py``) and the step-wide chunk stream
(``noise.run_ordered``, ``inplace.perturb_regions``): accuracy against float64, independence from chunk
boundaries and threads, agreement with the torch path, and all-or-nothing failure of a perturbation."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import fingerprint, randomise_lora_b, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora_dist import FlatLoRA, FlatLoRAConfig, native, noise, roundtrip
from flatlora_dist.inplace import NoiseKey, perturb_regions
from flatlora_dist.layout import RowLayout
from flatlora_dist.norms import _chunk_sumsq, _stacked, row_norms
from flatlora_dist.shards import Region

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable (no C compiler)")

ROWS, COLS = 300, 1000


def _factors(layout: RowLayout, ranks=(5, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, layout.in_features, generator=g), torch.randn(layout.out_features, r, generator=g),
             0.25 * (i + 1)) for i, r in enumerate(ranks)]  # fmt: skip


def _native_sums(w: torch.Tensor, layout: RowLayout, factors, bounds: list[int]) -> torch.Tensor:
    """Squared row sums of ``W + s·BA`` from chunks ``[bounds[i], bounds[i+1])``, added in chunk order."""
    a, b, s = _stacked(factors)
    bo = b if layout.out_axis == 0 else b.t().contiguous()
    acc = torch.zeros(layout.out_features)
    for lo, hi in zip(bounds, bounds[1:]):
        out, first, part = _chunk_sumsq(native.load(), layout, a, bo, s, lo, w[lo:hi], acc)
        out[first : first + part.numel()] += part
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("ranks", [(5,), (5, 2)])
def test_row_sums_match_float64(dtype, axis, ranks):
    """One or two adapters, chunks that cut rows mid-way and a chunk inside one row: relative error of
    every row sum below 2e-6 against the float64 value of the same stored weight."""
    layout = RowLayout(ROWS, COLS, axis)
    w = (torch.randn(ROWS * COLS, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    factors = _factors(layout, ranks)
    got = _native_sums(w, layout, factors, [0, 777, 1_500, 123_456, 262_144, ROWS * COLS])
    delta = sum(s * (b.double() @ a.double()) for a, b, s in factors)
    full = w.double().view(ROWS, COLS) + (delta if axis == 0 else delta.t())
    want = (full**2).sum(dim=1 - axis)
    assert ((got.double() - want).abs() / want).max() < 2e-6


def test_whole_row_sums_do_not_depend_on_chunk_boundaries():
    """A row lying whole in its chunk gets the same bits wherever the chunk starts (ranks that hold whole
    rows, or a plain model, compute identical row norms)."""
    layout = RowLayout(ROWS, COLS)
    w = torch.randn(ROWS * COLS, generator=torch.Generator().manual_seed(2))
    factors = _factors(layout)
    one = _native_sums(w, layout, factors, [0, ROWS * COLS])
    cut = _native_sums(w, layout, factors, [0, 7 * COLS, 8 * COLS, 150 * COLS, ROWS * COLS])
    assert torch.equal(one, cut)


class TwoLinears(nn.Module):
    """One nn.Linear and one GPT-2 Conv1D (fan_in_fan_out) of 600 x 1000: 3 noise chunks each, rows cut
    at chunk boundaries."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(1000, 600, bias=False)
        self.conv = Conv1D(600, 1000)


def _two_linears():
    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(), LoraConfig(r=4, target_modules=["lin", "conv"]))
    randomise_lora_b(model)
    return model


def _norms(model, threads: int, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(noise, "CPU_DRAW_THREADS", threads)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10))
    with torch.no_grad():
        return row_norms(flat.targets, flat._backend_of, torch.zeros_like(flat._norms), None)[0].clone()


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: fan_in_fan_out set for Conv1D
def test_engine_norms_native_vs_torch_and_threads(monkeypatch):
    """Multi-chunk targets in both layouts: native norms equal themselves bit for bit with 0 or 2 draw
    threads, and the torch path's within float32 rounding."""
    model = _two_linears()
    two, none = _norms(model, 2, monkeypatch), _norms(model, 0, monkeypatch)
    assert torch.equal(two, none)
    monkeypatch.setenv(native.ENV, "off")
    torch_path = _norms(model, 2, monkeypatch)
    assert two.numel() == 1200 and bool((two > 0).all())
    torch.testing.assert_close(two, torch_path, rtol=2e-6, atol=0)


def test_run_ordered_keeps_order_and_bounds_in_flight(monkeypatch):
    """Results come back in task order from the draw threads, never more than threads + 1 tasks taken."""
    monkeypatch.setattr(noise, "CPU_DRAW_THREADS", 2)
    taken, lock, running, peak = [0], threading.Lock(), [0], [0]

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        torch.randn(20_000).sum()  # releases the GIL
        with lock:
            running[0] -= 1
        return i

    def tasks():
        for i in range(40):
            taken[0] += 1
            yield lambda i=i: task(i)

    seen = []
    for r in noise.run_ordered(tasks(), parallel=True):
        seen.append(r)
        assert taken[0] - len(seen) <= noise.CPU_DRAW_THREADS + 1
    assert seen == list(range(40)) and peak[0] <= 2


def test_perturb_regions_failing_chunk_leaves_every_region_clean(monkeypatch):
    """A chunk task failing in the middle of a multi-chunk region, with chunks in flight on both draw
    threads: everything written (the finished chunks of this region, the regions before it) is restored
    bit for bit before the error propagates; records of the successful run match a fresh run."""
    monkeypatch.setattr(noise, "CPU_DRAW_THREADS", 2)
    layout = RowLayout(ROWS * 4, COLS)  # 1.2 M elements: 5 noise blocks
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(layout.numel, generator=g).to(dt) for dt in (torch.float32, torch.bfloat16)]
    clean = [w.clone() for w in weights]
    keys = [NoiseKey(1, 2, f"w{i}", layout, torch.rand(layout.rows, generator=g) * 0.05) for i in range(2)]
    jobs = [(Region(w, 0), k) for w, k in zip(weights, keys)]
    real, calls = roundtrip.perturb_tasks, []

    def failing(lib, region, key, scratch):
        def wrap(task):
            def run():
                calls.append(key.name)
                if key.name == "w1" and calls.count("w1") == 3:
                    raise MemoryError("out of memory in chunk 3")
                return task()

            return run

        return [wrap(t) for t in real(lib, region, key, scratch)]

    monkeypatch.setattr(roundtrip, "perturb_tasks", failing)
    with pytest.raises(MemoryError, match="chunk 3"):
        perturb_regions(jobs)
    assert calls.count("w0") == 5 and calls.count("w1") >= 3
    assert all(torch.equal(w.view(torch.uint8), c.view(torch.uint8)) for w, c in zip(weights, clean))
    monkeypatch.setattr(roundtrip, "perturb_tasks", real)
    fixes = perturb_regions(jobs)
    assert all(f is not None and f.count > 0 for f in fixes)
    assert not torch.equal(weights[0], clean[0])


def test_model_round_trip_is_bitwise_with_native_norms():
    """End to end on a tiny model: perturb moves every target, restore brings back the exact bits."""
    torch.manual_seed(0)
    model = tiny_llama()
    before = fingerprint(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))
    flat.perturb(1)
    assert fingerprint(model) != before
    flat.restore()
    assert fingerprint(model) == before
