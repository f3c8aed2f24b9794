"""Perturbing a weight shard by shard equals perturbing it whole, bit for bit, and partial row norms add
up to the full ones — in one process, on the code every sharding backend shares.

A weight of 3.2 noise blocks with rows of very different norm is cut into regions that start mid-row and
mid-block (as ZeRO-3 partitions and FSDP1 flat shards do), with the output features on either storage
axis (``nn.Linear`` and ``fan_in_fan_out``).  Each region is a separate tensor, as on separate ranks.
The whole perturbation itself is checked against ``round(W + std[out(k)]·z_k)`` computed densely here.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomise_lora_b
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora_dist.inplace import Fixups, NoiseKey, perturb_region, restore_region
from flatlora_dist.layout import RowLayout
from flatlora_dist.noise import NOISE_BLOCK, noise_range
from flatlora_dist.norms import row_norms
from flatlora_dist.shards import Region, ShardBackend
from flatlora_dist.targets import find_targets

OUT, IN = 640, 1320  # 844,800 elements: 3.2 noise blocks
NUMEL = OUT * IN


def cuts(cols: int) -> list[int]:
    """Region boundaries: none on a row or block boundary except the ends."""
    inner = [5, cols + 3, NOISE_BLOCK - 7, NOISE_BLOCK + 2 * cols + 1, 2 * NOISE_BLOCK + 11, 3 * NOISE_BLOCK + 5, NUMEL - 3]
    assert all(c % cols and c % NOISE_BLOCK for c in inner)
    return [0, *inner, NUMEL]


def layout_of(out_axis: int) -> RowLayout:
    return RowLayout(OUT, IN, 0) if out_axis == 0 else RowLayout(IN, OUT, 1)


def weight(layout: RowLayout, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian storage whose output features have norms spread over 30x (and a few tiny values)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(layout.rows, layout.cols, generator=g, dtype=torch.float64) * 0.02
    scale = torch.linspace(0.1, 3.0, layout.out_features, dtype=torch.float64)
    w = w * (scale[:, None] if layout.out_axis == 0 else scale[None, :])
    w.view(-1)[::997] = 1e-30  # whole-value fix-ups (noise ~1e28 times the weight)
    return w.to(dtype).reshape(-1)


def key_for(layout: RowLayout, w: torch.Tensor) -> NoiseKey:
    norms = w.double().view(layout.rows, layout.cols).norm(dim=1 - layout.out_axis)
    std = (0.1 / math.sqrt(layout.in_features) * norms).float()
    return NoiseKey(seed=11, step=5, name="layers.3.mlp.up_proj", layout=layout, std=std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_axis", [0, 1])
def test_regions_perturb_and_restore_like_the_whole_weight(out_axis, dtype):
    layout = layout_of(out_axis)
    w0 = weight(layout, dtype)
    key = key_for(layout, w0)

    whole = w0.clone()
    fix_whole = perturb_region(Region(whole, 0), key)
    z = noise_range(key.seed, key.step, key.name, NUMEL, 0, NUMEL).view(layout.rows, layout.cols)
    e = z * (key.std[:, None] if out_axis == 0 else key.std[None, :])
    expect = (w0.float() + e.reshape(-1)).to(dtype)
    assert torch.equal(whole, expect), "W' != round(W + std[out(k)]·z_k)"
    assert fix_whole is not None and fix_whole.index.numel() > 0
    assert (fix_whole.full_index.numel() > 0) == (dtype == torch.float32)  # 16-bit xors cover every bit

    bounds = cuts(layout.cols)
    regions = [Region(w0[lo:hi].clone(), lo) for lo, hi in zip(bounds, bounds[1:])]
    fixes = [perturb_region(r, key) for r in regions]
    assert torch.equal(torch.cat([r.tensor for r in regions]), whole), "shards perturbed != whole perturbed"

    merged = Fixups.merge(fixes)
    for got, want in ((merged.index, fix_whole.index), (merged.full_index, fix_whole.full_index)):
        assert torch.equal(got.sort().values, want.sort().values), "fix-ups must be keyed by global index"
    for r, fix in zip(regions, fixes):  # each rank restores with its own records ...
        restore_region(r, key, fix)
    assert torch.equal(torch.cat([r.tensor for r in regions]).view(torch.int16), w0.view(torch.int16))
    for r in regions:  # ... or with everyone's (a partition and a gathered copy share merged records)
        perturb_region(r, key)
        restore_region(r, key, merged)
    assert torch.equal(torch.cat([r.tensor for r in regions]).view(torch.int16), w0.view(torch.int16))


class OneLayer(nn.Module):
    def __init__(self, conv1d: bool):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(OUT, IN)
        else:
            self.lin = nn.Linear(IN, OUT, bias=False)


class SliceBackend(ShardBackend):
    """A rank holding flat ``[lo, hi)`` of every base weight (whole LoRA factors): ZeRO-3-like geometry."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def regions(self, target):
        return [Region(target.weight.data.view(-1)[self.lo : self.hi], self.lo)]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "fan_in_fan_out"])
def test_partial_row_norms_add_up_to_the_full_norms(conv1d):
    """Each slice's ``row_norms`` (through ``norm_chunks``, ``delta_slice``, ``add_sumsq_``) is a partial
    sum of squares; over all slices they give ``||W_i + s(BA)_i||`` computed densely in float64."""
    torch.manual_seed(0)
    base = OneLayer(conv1d)
    w = base.lin.weight
    with torch.no_grad():
        w.copy_(weight(layout_of(1 if conv1d else 0), torch.float32).view_as(w))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], fan_in_fan_out=conv1d))
    randomise_lora_b(model, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
    (target,) = find_targets(model)
    layer = model.base_model.model.lin
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    delta = layer.scaling["default"] * (b @ a)
    eff = w.double() + (delta.t() if conv1d else delta)
    want = eff.norm(dim=1 - target.layout.out_axis).detach()

    bounds = cuts(target.layout.cols)
    sumsq = torch.zeros(OUT, dtype=torch.float64)
    for lo, hi in zip(bounds, bounds[1:]):
        backend = SliceBackend(lo, hi)
        part, calls = row_norms([target], {id(target): backend}, torch.zeros(OUT), None)
        assert calls == 0
        sumsq += part.double().square()
    torch.testing.assert_close(sumsq.sqrt(), want, rtol=2e-6, atol=0)
