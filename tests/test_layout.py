"""``RowLayout``: which output feature each flat element belongs to, on any slice of the storage.

Every helper is compared with a dense reference built from the element's flat index (``k // cols`` for
``out_axis=0``, ``k % cols`` for ``out_axis=1``), on slices that start and end mid-row, cover whole rows,
or sit inside one row.
"""

from __future__ import annotations

import pytest
import torch

from flatlora_dist.layout import RowLayout

ROWS, COLS = 7, 5
SLICES = [(0, 35), (0, 1), (3, 1), (3, 2), (2, 10), (5, 10), (5, 12), (4, 27), (13, 22), (34, 1), (6, 0)]
LAYOUTS = [RowLayout(ROWS, COLS, 0), RowLayout(ROWS, COLS, 1)]


def out_index(layout: RowLayout, start: int, length: int) -> torch.Tensor:
    k = torch.arange(start, start + length)
    return k // layout.cols if layout.out_axis == 0 else k % layout.cols


def test_features_follow_the_out_axis():
    assert (LAYOUTS[0].out_features, LAYOUTS[0].in_features) == (ROWS, COLS)
    assert (LAYOUTS[1].out_features, LAYOUTS[1].in_features) == (COLS, ROWS)
    assert LAYOUTS[0].numel == LAYOUTS[1].numel == ROWS * COLS


@pytest.mark.parametrize("start,length", SLICES)
def test_segments_tile_the_slice_in_row_aligned_pieces(start, length):
    layout = LAYOUTS[0]
    pos = 0
    pieces = list(layout.segments(start, length))
    for i, (off, row, col, nrows, ncols) in enumerate(pieces):
        assert off == pos and (row * COLS + col) == start + off
        if nrows == 1 and ncols < COLS:  # part of one storage row
            assert col + ncols <= COLS
        else:  # whole rows
            assert col == 0 and ncols == COLS and nrows >= 1
            if i:
                prev = pieces[i - 1]
                assert not (prev[2] == 0 and prev[4] == COLS), "consecutive whole rows must be one piece"
        pos += nrows * ncols
    assert pos == length
    assert len(pieces) <= 3  # a partial row, whole rows, a partial row


@pytest.mark.parametrize("layout", LAYOUTS, ids=["out_axis0", "out_axis1"])
@pytest.mark.parametrize("start,length", SLICES)
def test_scale_multiplies_by_the_elements_output_feature(layout, start, length):
    per_out = torch.arange(1, layout.out_features + 1, dtype=torch.float32) * 10
    values = torch.arange(length, dtype=torch.float32) + 0.5
    want = values * per_out[out_index(layout, start, length)]
    got = layout.scale_(values.clone(), start, per_out)
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["out_axis0", "out_axis1"])
@pytest.mark.parametrize("start,length", SLICES)
def test_add_sumsq_sums_squares_per_output_feature(layout, start, length):
    values = torch.randn(length, generator=torch.Generator().manual_seed(start), dtype=torch.float64)
    acc = torch.full((layout.out_features,), 2.0, dtype=torch.float64)
    want = acc.clone().index_add_(0, out_index(layout, start, length), values.square())
    layout.add_sumsq_(acc, values, start)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-12)  # squares are taken in float32


def test_partial_sums_over_any_cut_add_up_to_the_whole():
    """Shards cut anywhere (mid-row, several rows, one element) sum to the whole weight's row sums."""
    for layout in LAYOUTS:
        w = torch.randn(layout.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        whole = layout.add_sumsq_(torch.zeros(layout.out_features, dtype=torch.float64), w, 0)
        parts = torch.zeros_like(whole)
        cuts = [0, 3, 4, 12, 23, 35]
        for lo, hi in zip(cuts, cuts[1:]):
            layout.add_sumsq_(parts, w[lo:hi], lo)
        torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-12)  # squares are taken in float32
        dense = w.view(ROWS, COLS).square().sum(dim=1 - layout.out_axis)
        torch.testing.assert_close(whole, dense, rtol=1e-6, atol=1e-12)  # squares are taken in float32


@pytest.mark.parametrize("layout", LAYOUTS, ids=["out_axis0", "out_axis1"])
@pytest.mark.parametrize("start,length", [s for s in SLICES if s[1] > 0])
def test_delta_slice_is_the_scaled_product_in_storage_layout(layout, start, length):
    g = torch.Generator().manual_seed(7)
    m, n, r = layout.out_features, layout.in_features, 3
    factors = [(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 0.5),
               (torch.randn(2, n, generator=g), torch.randn(m, 2, generator=g), 2.0)]  # fmt: skip
    delta = sum(s * (b.double() @ a.double()) for a, b, s in factors)  # (out, in)
    storage = delta if layout.out_axis == 0 else delta.t()
    want = storage.reshape(-1)[start : start + length].float()
    got = layout.delta_slice(factors, start, start + length)
    assert got.shape == (length,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_delta_slice_needs_a_factor():
    with pytest.raises(ValueError, match="at least one"):
        LAYOUTS[0].delta_slice([], 0, 5)
