"""Flatness probe: how much the loss rises when the merged LoRA weights get random filter-wise noise.

For a trained PEFT LoRA model and radii ``rho`` the probe estimates

    rise(rho) = E_eps[ L(W + s·B·A + eps) ] - L(W + s·B·A),
    eps_i ~ N(0, (rho · ||W_i + s·(B·A)_i|| / sqrt(n))^2 · I)    for row (output feature) i,

over every LoRA-wrapped linear at once: the filter-wise noise Flat-LoRA trains with (at factor 1),
so ``rho = sigma`` probes exactly the neighbourhood the training objective averages over.  A flatter
solution has a smaller rise.  The expectation is a mean over ``draws`` draws.

How it works:

* The noise goes into the frozen base weight: the layer computes ``(W + eps)x + s·BAx``, which is
  ``(W + s·BA + eps)x``, so the adapters need not be merged.
* Before the first draw every targeted base weight is copied once; after each evaluation the weight
  is copied back from that backup (also when the loss function raises).  Afterwards every base weight
  is bitwise what it was: no round-off drift, whatever the dtype.  Memory: one copy of the targeted
  base weights plus one layer's noise at a time.
* The directions ``z`` of draw ``d`` (``eps = rho·scale·z``) depend only on ``(seed, d, layer name,
  shape)``: every radius of one draw uses the same directions (smooth curves), and two models of the
  same architecture probed with the same seed get the same directions (common random numbers: a
  paired comparison of two models has much less variance than independent draws).  The global RNG
  is never touched.
* The model is evaluated in eval mode without gradients (no dropout); its training mode is restored.

Scope: an unsharded model in one process (plain or DDP-wrapped), dense base weights.  ZeRO-3 /
FSDP shards and 4-bit bases are refused (gather or dequantize into a plain copy first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .noise import block_seed
from .targets import LoraTarget, find_targets

__all__ = ["ProbeResult", "flatness_probe", "merged_row_norms", "probe_directions"]


@dataclass
class ProbeResult:
    """Losses of one probe: ``losses[k][d]`` is the loss at ``radii[k]`` under draw ``d``."""

    radii: list[float]
    base_loss: float
    losses: list[list[float]]
    draws: int
    seed: int

    @property
    def mean(self) -> list[float]:
        """Mean perturbed loss per radius."""
        return [sum(row) / len(row) for row in self.losses]

    @property
    def rise(self) -> list[float]:
        """Mean loss increase over the unperturbed loss, per radius (the flatness curve)."""
        return [m - self.base_loss for m in self.mean]

    @property
    def stderr(self) -> list[float]:
        """Standard error of each radius' mean over draws (0 with a single draw)."""
        out = []
        for row in self.losses:
            n = len(row)
            if n < 2:
                out.append(0.0)
                continue
            mu = sum(row) / n
            out.append(math.sqrt(sum((v - mu) ** 2 for v in row) / (n - 1) / n))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean=self.mean, rise=self.rise, stderr=self.stderr)
        return d


def _check_target(t: LoraTarget) -> None:
    w = t.weight
    if t.quantized:
        raise ValueError(f"flatness_probe: layer {t.name!r} has a quantized base weight; probe a dequantized copy")
    if hasattr(w, "ds_tensor") or type(w).__name__ == "DTensor" or w.numel() != t.layout.numel:
        raise ValueError(
            f"flatness_probe: layer {t.name!r} holds a shard of its weight (ZeRO-3/FSDP); "
            "probe an unsharded copy of the model in one process"
        )
    if not w.is_floating_point():
        raise ValueError(f"flatness_probe: layer {t.name!r} has a non-float base weight ({w.dtype})")


def _out_major(t: LoraTarget, w: torch.Tensor) -> torch.Tensor:
    """The weight as (out_features, in_features) (a view; transposed for fan_in_fan_out layers)."""
    return w if t.layout.out_axis == 0 else w.t()


@torch.no_grad()
def merged_row_norms(t: LoraTarget) -> torch.Tensor:
    """``||W_i + s·(B·A)_i||_2`` for every output feature ``i`` of one target, float32."""
    merged = _out_major(t, t.weight.detach()).float().clone()
    for a, b, s in t.local_factors():
        merged.addmm_(b.detach().float(), a.detach().float(), alpha=s)
    return merged.norm(dim=1)


def probe_directions(seed: int, draw: int, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Standard-normal directions (out, in) of one layer for one draw: a pure function of the arguments."""
    gen = torch.Generator(device=device)
    gen.manual_seed(block_seed(seed, draw, f"probe:{name}", 0))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


@torch.no_grad()
def flatness_probe(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    radii: Sequence[float] = (0.025, 0.05, 0.1, 0.2),
    draws: int = 4,
    seed: int = 0,
    targets: Sequence[LoraTarget] | None = None,
) -> ProbeResult:
    """Loss of ``model`` under random filter-wise noise of relative size ``rho`` on the merged weights.

    ``loss_fn(model) -> float`` evaluates the loss on fixed data (deterministically: the probe puts
    the model in eval mode and disables gradients around it).  It is called once unperturbed and
    ``len(radii) · draws`` times perturbed.  ``targets`` defaults to every PEFT LoRA linear
    (:func:`flatlora_dist.targets.find_targets`).  Returns a :class:`ProbeResult`; ``.rise`` is the
    flatness curve.  Every base weight is bitwise restored, also on error.
    """
    radii = [float(r) for r in radii]
    if not radii or any(not (r >= 0 and math.isfinite(r)) for r in radii):
        raise ValueError(f"flatness_probe: radii must be finite numbers >= 0, got {radii}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"flatness_probe: draws must be an integer >= 1, got {draws!r}")
    targets = list(targets) if targets is not None else find_targets(model)
    for t in targets:
        _check_target(t)

    was_training = model.training
    model.eval()
    backups = [t.weight.detach().clone() for t in targets]
    try:
        base_loss = float(loss_fn(model))
        scales = [merged_row_norms(t).div_(math.sqrt(t.layout.in_features)) for t in targets]
        losses: list[list[float]] = [[] for _ in radii]
        for d in range(draws):
            for k, rho in enumerate(radii):
                if rho == 0:
                    losses[k].append(base_loss)
                    continue
                for t, backup, scale in zip(targets, backups, scales):
                    w = _out_major(t, t.weight.data)
                    z = probe_directions(seed, d, t.name, tuple(w.shape), w.device)
                    z.mul_(scale.to(z.device)[:, None] * rho)
                    w.copy_((_out_major(t, backup).float() + z).to(w.dtype))
                try:
                    losses[k].append(float(loss_fn(model)))
                finally:
                    for t, backup in zip(targets, backups):
                        t.weight.data.copy_(backup)
    finally:
        for t, backup in zip(targets, backups):
            t.weight.data.copy_(backup)
        model.train(was_training)
    return ProbeResult(radii=radii, base_loss=base_loss, losses=losses, draws=draws, seed=seed)
