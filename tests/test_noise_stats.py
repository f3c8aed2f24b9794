"""The noise a perturbation actually applies, normalised by each row's std, is N(0, 1) and independent
across noise blocks, layers, steps and seeds.

Measured on real ``FlatLoRA.perturb`` calls (not on ``noise_range``): two same-shaped layers of 800 x 1000
elements (3.05 noise blocks each, rows of very different scale, ``s·BA`` comparable to ``W``), fp32,
cosine ramp at a step where the factor is neither 0 nor 1.  The row std is recomputed here in float64
from the formula ``factor(t)·sigma/sqrt(n_in)·||W_i + s(BA)_i||``, so any error in the ramp, the
strength, the ``sqrt(n)`` or the row norms shows up as a variance that is not 1.

Tolerances are 5 standard errors of each statistic for ``n`` independent N(0, 1) samples (mean
``1/sqrt(n)``, variance ``sqrt(2/n)``, skewness ``sqrt(6/n)``, excess kurtosis ``sqrt(24/n)``, a Pearson
correlation ``1/sqrt(n)``), so a correct generator fails with probability below 1e-5 per check;
a correlation of 1 (the same draw reused) or a 1% variance error is tens of standard errors away.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomise_lora_b
from peft import LoraConfig, get_peft_model
from scipy import stats
from torch import nn

from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.noise import NOISE_BLOCK

N_IN, N_OUT = 1000, 800  # not square: sqrt(in) and sqrt(out) differ by 12%
SIGMA, TOTAL = 0.05, 10
NAMES = ("a", "b")


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(N_IN, N_OUT, bias=False)
        self.b = nn.Linear(N_IN, N_OUT, bias=False)


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    base = TwoLinear()
    with torch.no_grad():
        base.a.weight.mul_(torch.linspace(0.1, 3.0, N_OUT)[:, None])
        base.b.weight.mul_(torch.linspace(2.0, 0.2, N_OUT)[:, None])
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(NAMES)))
    randomise_lora_b(model, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    return model


def expected_std(model: nn.Module, name: str, step: int) -> torch.Tensor:
    """Row std from the formula, float64, independent of the engine's code."""
    layer = getattr(model.base_model.model, name)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    eff = layer.base_layer.weight.double() + layer.scaling["default"] * (b @ a)
    factor = 0.5 * (1.0 - math.cos(math.pi * step / TOTAL))
    return (factor * SIGMA / math.sqrt(N_IN) * eff.norm(dim=1)).detach()


def applied_noise(model: nn.Module, seed: int, step: int) -> dict[str, torch.Tensor]:
    """``(W' - W) / std_row`` for each layer, flattened, float64, from one real perturbation."""
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=TOTAL, schedule="cosine", seed=seed))
    weights = {n: getattr(model.base_model.model, n).base_layer.weight for n in NAMES}
    clean = {n: w.detach().double().clone() for n, w in weights.items()}
    with flat.perturbed(step):
        diff = {n: w.detach().double() - clean[n] for n, w in weights.items()}
    return {n: (diff[n] / expected_std(model, n, step)[:, None]).reshape(-1) for n in NAMES}


@pytest.fixture(scope="module")
def draws() -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(seed, step) -> layer -> normalised applied noise."""
    model = two_layers()
    return {(seed, step): applied_noise(model, seed, step) for seed, step in [(0, 3), (0, 4), (1, 3)]}


def test_layers_span_several_noise_blocks():
    assert N_IN * N_OUT > 3 * NOISE_BLOCK


@pytest.mark.parametrize("key", [(0, 3), (0, 4), (1, 3)])
def test_normalised_noise_is_standard_normal(draws, key):
    for name, d in draws[key].items():
        n = d.numel()
        x = d.numpy()
        assert abs(float(d.mean())) < 5 / math.sqrt(n), (name, float(d.mean()))
        assert abs(float(d.var()) - 1) < 5 * math.sqrt(2 / n), (name, float(d.var()))
        assert abs(float(stats.skew(x))) < 5 * math.sqrt(6 / n), name
        assert abs(float(stats.kurtosis(x))) < 5 * math.sqrt(24 / n), name
        p = stats.kstest(x, "norm").pvalue
        assert p > 1e-5, f"{name}: Kolmogorov-Smirnov p = {p:.2e} against N(0, 1)"


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def test_no_correlation_between_noise_blocks(draws):
    """Blocks of one weight are drawn from distinct seeds: block k's values are unrelated to block j's."""
    d = draws[(0, 3)]["a"]
    blocks = [d[k * NOISE_BLOCK : (k + 1) * NOISE_BLOCK] for k in range(3)]
    bound = 5 / math.sqrt(NOISE_BLOCK)
    for j in range(3):
        for k in range(j + 1, 3):
            assert abs(_corr(blocks[j], blocks[k])) < bound, (j, k, _corr(blocks[j], blocks[k]))
    assert abs(_corr(d[:-1], d[1:])) < 5 / math.sqrt(d.numel()), "neighbouring elements correlated"


@pytest.mark.parametrize(
    "other,what",
    [(((0, 3), "b"), "layers"), (((0, 4), "a"), "steps"), (((1, 3), "a"), "seeds")],
)
def test_no_correlation_between_layers_steps_and_seeds(draws, other, what):
    d = draws[(0, 3)]["a"]
    e = draws[other[0]][other[1]]
    r = _corr(d, e)
    assert abs(r) < 5 / math.sqrt(d.numel()), f"noise correlated across {what}: r = {r:.4f}"
