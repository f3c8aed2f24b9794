"""Paired-comparison statistics for the benches, on top of ``scipy.stats``.

Every function takes per-seed paired differences (arm minus baseline, one value per seed) and is a
thin, documented layer over scipy: the t-based confidence interval and two-sided p-value of the
mean difference, the TOST equivalence test, and multiplicity corrections (Bonferroni intervals,
Holm step-down p-values).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats as st

__all__ = ["bonferroni_level", "holm", "mean_std", "paired", "tost"]


def _check(diffs: Sequence[float]) -> list[float]:
    vals = [float(d) for d in diffs]
    if len(vals) < 2:
        raise ValueError(f"need at least 2 paired differences, got {len(vals)}")
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"paired differences must be finite, got {vals}")
    return vals


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}``; std is the sample std (0 for a single value)."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def paired(diffs: Sequence[float], level: float = 0.95) -> dict:
    """One-sample t on the paired differences: mean, std, t, two-sided p and the ``level`` CI.

    Invariants: ``ci[0] <= mean <= ci[1]``; ``p < 1 - level`` exactly when the CI excludes 0.  A zero
    spread gives a zero-width CI and ``t = ±inf``, ``p = 0`` (all differences equal and non-zero) or
    ``t = 0``, ``p = 1`` (all differences 0: no evidence of any difference).
    """
    vals = _check(diffs)
    n, mean = len(vals), statistics.fmean(vals)
    sd = statistics.stdev(vals)
    se = sd / math.sqrt(n)
    half = st.t.ppf(0.5 + level / 2, n - 1) * se
    if se > 0:
        res = st.ttest_1samp(vals, 0.0)
        t, p = float(res.statistic), float(res.pvalue)
    else:
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
    return {"n": n, "mean": mean, "std": sd, "t": t, "p": p, "level": level, "ci": [mean - half, mean + half],
            "positive": sum(v > 0 for v in vals), "diffs": vals}  # fmt: skip


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests of ``|mean difference| < margin`` (equivalence) at level ``alpha``.

    ``p = max(p_lower, p_upper)``; equivalence is declared when ``p < alpha``, which is the same as the
    ``1 - 2·alpha`` (90 %) t interval lying inside ``(-margin, margin)`` (returned as ``ci``).
    ``min_margin`` = ``max(|ci|)``: the data show equivalence for every margin above it.
    """
    if not margin > 0:
        raise ValueError(f"tost: margin must be > 0, got {margin}")
    vals = _check(diffs)
    if statistics.stdev(vals) == 0:  # no spread: each one-sided test is decided by the mean alone
        mean = vals[0]
        p_lower, p_upper = float(mean <= -margin), float(mean >= margin)
    else:
        p_lower = float(st.ttest_1samp(vals, -margin, alternative="greater").pvalue)
        p_upper = float(st.ttest_1samp(vals, margin, alternative="less").pvalue)
    p = max(p_lower, p_upper)
    ci = paired(vals, level=1 - 2 * alpha)["ci"]
    return {"margin": margin, "alpha": alpha, "p_lower": p_lower, "p_upper": p_upper,
            "p": p, "equivalent": bool(p < alpha), "ci": ci, "ci_level": 1 - 2 * alpha,
            "min_margin": max(abs(ci[0]), abs(ci[1]))}  # fmt: skip


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as the input), capped at 1 and monotone."""
    p = [float(v) for v in pvalues]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def bonferroni_level(level: float, comparisons: int) -> float:
    """Per-comparison confidence level so that ``comparisons`` intervals hold jointly at ``level``."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    return 1 - (1 - level) / comparisons
