"""In-place perturb/restore of one region: fix-up records and bit-exact restore, including edge values."""

from __future__ import annotations

import pytest
import torch

from flatlora_dist.inplace import Fixups, NoiseKey, perturb_region, restore_region
from flatlora_dist.layout import RowLayout
from flatlora_dist.shards import Region

ROWS, COLS = 64, 1000


def _weight(dtype: torch.dtype) -> torch.Tensor:
    """Gaussian weights plus the values a round trip handles worst: -0.0, denormal-small weights far
    below the noise (their difference reaches the exponent bits) and values just under a power of two."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS * COLS, generator=g, dtype=torch.float64) * 0.02
    w[:50] = -0.0
    w[50:100] = 1e-30
    w[100:150] = torch.nextafter(
        torch.tensor(2.0**-6, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    )
    return w.to(dtype)


def _key(std: float) -> NoiseKey:
    return NoiseKey(seed=5, step=3, name="layer", layout=RowLayout(ROWS, COLS), std=torch.full((ROWS,), std))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_is_bit_exact_and_fixups_are_compact(dtype):
    w = _weight(dtype)
    before = w.clone()
    key = _key(1e-3)
    fix = perturb_region(Region(w, 0), key)
    assert not torch.equal(w, before)
    assert fix is not None and fix.count > 0
    restore_region(Region(w, 0), key, fix)
    assert torch.equal(w.view(torch.int8), before.view(torch.int8))
    # most records are (int32 index, 16-bit xor); values are only kept where the xor is wider
    assert fix.index.dtype == fix.full_index.dtype == torch.int32 and fix.xor.dtype == torch.int16
    assert fix.nbytes == 6 * fix.index.numel() + (4 + w.element_size()) * fix.full_index.numel()
    if w.element_size() > 2:
        full = set(fix.full_index.tolist())
        assert set(range(50)) <= full  # -0.0 comes back as +0.0: the sign bit needs the whole value
        assert set(range(50, 100)) <= full  # noise ~1e26 times the weight
        assert fix.index.numel() > 10 * fix.full_index.numel()
    else:
        assert fix.full_index.numel() == 0


def test_overlapping_regions_share_merged_fixups():
    """A ZeRO-3 partition and a gathered copy hold some of the same elements: merged records patch both."""
    w = _weight(torch.float32)
    before = w.clone()
    part, copy = w[: ROWS * COLS // 2 + 7].clone(), w[1000:].clone()
    regions = [Region(part, 0), Region(copy, 1000)]
    key = _key(2e-3)
    fix = Fixups.merge([perturb_region(r, key) for r in regions])
    index = torch.cat([fix.index, fix.full_index])
    assert index.unique().numel() == index.numel()  # one record per global element
    for r in regions:
        restore_region(r, key, fix)
    assert torch.equal(part.view(torch.int32), before[: part.numel()].view(torch.int32))
    assert torch.equal(copy.view(torch.int32), before[1000:].view(torch.int32))
