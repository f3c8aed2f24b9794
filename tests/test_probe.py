"""The flatness probe: exact restore, the noise it applies, determinism, bad input (tiny models, < 5 s)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fingerprint, tiny_llama

from flatlora_dist.probe import ProbeResult, flatness_probe, merged_row_norms
from flatlora_dist.targets import find_targets


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _loss_fn(x: torch.Tensor):
    def fn(model) -> float:
        return float(model(input_ids=x, labels=x).loss)

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restores_bitwise_and_calls(dtype):
    model = tiny_llama(dtype)
    model.train()
    before = fingerprint(model)
    calls = []
    fn = _loss_fn(_batch())

    def counted(m):
        calls.append(m.training)
        assert not torch.is_grad_enabled()
        return fn(m)

    res = flatness_probe(model, counted, radii=(0.0, 0.05, 0.2), draws=2, seed=3)
    assert fingerprint(model) == before
    assert model.training  # mode restored
    assert len(calls) == 1 + 2 * 2  # radius 0 reuses the unperturbed loss
    assert not any(calls)  # evaluated in eval mode
    assert res.rise[0] == 0.0
    assert all(len(row) == 2 for row in res.losses)
    assert all(v != res.base_loss for v in res.losses[2])  # the noise reached the loss
    d = res.to_dict()
    assert d["radii"] == [0.0, 0.05, 0.2] and len(d["stderr"]) == 3


def test_noise_is_filterwise_relative_to_merged_rows():
    model = tiny_llama(torch.float32)
    targets = find_targets(model)
    orig = {t.name: t.weight.detach().clone() for t in targets}
    norms = {t.name: merged_row_norms(t) for t in targets}
    rho = 0.1
    ratios = []

    def capture(m) -> float:
        for t in targets:
            e = t.weight.detach() - orig[t.name]
            if e.abs().sum() == 0:
                return 0.0  # the unperturbed call
            # row i of e has norm ~ rho * ||W_i + s(BA)_i|| (n = 64 or 128 elements per row)
            ratios.append(e.norm(dim=1) / (rho * norms[t.name]))
        return 0.0

    flatness_probe(model, capture, radii=(rho,), draws=3)
    r = torch.cat(ratios)
    assert abs(float(r.mean()) - 1.0) < 0.03, float(r.mean())
    assert float(r.min()) > 0.6 and float(r.max()) < 1.4


def test_merged_norm_includes_adapter():
    model = tiny_llama(torch.float32)
    t = find_targets(model)[0]
    a, b, s = t.local_factors()[0]
    expected = (t.weight.detach() + s * b.detach() @ a.detach()).norm(dim=1)
    torch.testing.assert_close(merged_row_norms(t), expected)
    assert not torch.allclose(merged_row_norms(t), t.weight.detach().norm(dim=1))


def test_deterministic_and_common_directions():
    x = _batch(1)
    a = flatness_probe(tiny_llama(seed=0), _loss_fn(x), radii=(0.1,), draws=2, seed=7)
    b = flatness_probe(tiny_llama(seed=0), _loss_fn(x), radii=(0.1,), draws=2, seed=7)
    c = flatness_probe(tiny_llama(seed=0), _loss_fn(x), radii=(0.1,), draws=2, seed=8)
    assert a.losses == b.losses
    assert a.losses != c.losses
    assert a.base_loss == c.base_loss


def test_restores_when_loss_fn_raises():
    model = tiny_llama(torch.float32)
    before = fingerprint(model)
    n = []

    def boom(m) -> float:
        n.append(1)
        if len(n) == 2:  # the first perturbed evaluation
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        flatness_probe(model, boom, radii=(0.3,), draws=1)
    assert fingerprint(model) == before


@pytest.mark.parametrize(
    "kwargs", [{"radii": ()}, {"radii": (-0.1,)}, {"radii": (math.nan,)}, {"draws": 0}, {"draws": 1.5}]
)
def test_bad_input(kwargs):
    with pytest.raises(ValueError):
        flatness_probe(tiny_llama(), lambda m: 0.0, **kwargs)


def test_result_stats():
    r = ProbeResult(radii=[0.1], base_loss=1.0, losses=[[1.5, 2.5]], draws=2, seed=0)
    assert r.mean == [2.0] and r.rise == [1.0]
    assert r.stderr[0] == pytest.approx(0.5)
