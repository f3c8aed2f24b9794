"""studies/stats.py against values derived by hand.

With 3 samples (2 degrees of freedom) Student's t has a closed-form CDF, F(t) = 1/2 + t / (2·sqrt(2 + t²)),
and quantile q(P) = c·sqrt(2 / (1 - c²)) with c = 2P - 1, so every expected number below is checkable
on paper, independently of scipy.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

from stats import bonferroni_level, holm, mean_std, paired, tost  # noqa: E402


def cdf_df2(t: float) -> float:
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def quantile_df2(prob: float) -> float:
    c = 2 * prob - 1
    return c * math.sqrt(2 / (1 - c * c))


SAMPLE = [1.0, 2.0, 3.0]  # mean 2, sd 1, standard error 1/sqrt(3)
SE = 1 / math.sqrt(3)


def test_paired_t_matches_closed_form():
    r = paired(SAMPLE)
    assert r["n"] == 3 and r["mean"] == pytest.approx(2.0) and r["std"] == pytest.approx(1.0)
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["p"] == pytest.approx(2 * (1 - cdf_df2(2 * math.sqrt(3))), rel=1e-9)  # 0.07418
    assert r["p"] == pytest.approx(0.074180, abs=1e-6)
    half = quantile_df2(0.975) * SE  # 4.302653 / sqrt(3)
    assert r["ci"] == pytest.approx([2 - half, 2 + half], rel=1e-9)
    assert r["positive"] == 3


def test_paired_ci_level_and_p_agree():
    """The (1 - a) interval excludes 0 exactly when p < a."""
    for diffs in ([0.3, 0.1, 0.2, 0.4], [0.3, -0.1, 0.2, 0.0], [-1.0, -2.0, -1.5]):
        for level in (0.9, 0.95, 0.99):
            r = paired(diffs, level)
            assert (r["ci"][0] > 0 or r["ci"][1] < 0) == (r["p"] < 1 - level)


def test_paired_zero_spread():
    same = paired([0.5, 0.5, 0.5])
    assert same["p"] == 0.0 and same["ci"] == [0.5, 0.5]
    zero = paired([0.0, 0.0])
    assert zero["p"] == 1.0 and zero["t"] == 0.0


def test_tost_matches_closed_form():
    narrow = tost(SAMPLE, margin=3.0)
    assert narrow["p_lower"] == pytest.approx(1 - cdf_df2((2 + 3) / SE), rel=1e-9)
    assert narrow["p_upper"] == pytest.approx(cdf_df2((2 - 3) / SE), rel=1e-9)  # 0.1127
    assert narrow["p"] == pytest.approx(0.112702, abs=1e-6) and not narrow["equivalent"]
    wide = tost(SAMPLE, margin=5.0)
    assert wide["p"] == pytest.approx(cdf_df2((2 - 5) / SE), rel=1e-9)  # 0.01755
    assert wide["equivalent"]
    half = quantile_df2(0.95) * SE  # 90 % interval
    assert wide["ci"] == pytest.approx([2 - half, 2 + half], rel=1e-9)


def test_tost_equivalent_iff_90ci_inside_margin():
    diffs = [0.004, -0.002, 0.006, 0.001, -0.003, 0.002]
    for margin in (0.001, 0.003, 0.005, 0.008, 0.02):
        r = tost(diffs, margin)
        assert r["equivalent"] == (-margin < r["ci"][0] and r["ci"][1] < margin)
        assert r["equivalent"] == (margin > r["min_margin"])


def test_tost_zero_spread_and_bad_margin():
    assert tost([0.0, 0.0, 0.0], 0.01)["equivalent"]
    assert not tost([0.02, 0.02], 0.01)["equivalent"]
    with pytest.raises(ValueError, match="margin"):
        tost(SAMPLE, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        paired([1.0])
    with pytest.raises(ValueError, match="finite"):
        paired([1.0, math.nan])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, 3*0.03, max(2*0.04, 0.09), max(1*0.5, 0.09)
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # capped and monotone
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_bonferroni_level_and_mean_std():
    assert bonferroni_level(0.95, 12) == pytest.approx(1 - 0.05 / 12)
    assert bonferroni_level(0.95, 1) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        bonferroni_level(0.95, 0)
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
