"""`FlatLoRA`: finds the LoRA layers, picks a backend and a mode for each, perturbs and restores.

One optimizer step::

    with flat.perturbed(step):          # norms (one all-reduce), then noise into every target
        for batch in window:            # every micro-batch and any recomputation sees the same noise
            model(**batch).loss.backward()
    optimizer.step()                    # base weights are bitwise the loaded ones again
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import functional, fused
from .config import FlatLoRAConfig
from .inplace import perturb_regions, restore_regions
from .kernels import scheme_for, scheme_id
from .norms import reduction_group, row_norms
from .perturbation import Fixups, NoiseKey
from .schedule import noise_factor
from .shards import Phase, ShardBackend, backend_kind, make_backend
from .targets import LoraTarget, find_targets

STATE_VERSION = 1


def _floats(bits: list[int]) -> list[float]:
    """float64 values from their int64 bit patterns."""
    return [struct.unpack("<d", struct.pack("<q", b))[0] for b in bits]


@dataclass
class _Active:
    """What one perturbation left behind for its restore: O(sum of out_features) plus fix-ups."""

    step: int
    factor: float
    keys: dict[int, NoiseKey] = field(default_factory=dict)
    fixups: dict[int, Fixups] = field(default_factory=dict)
    skipped: bool = False


class FlatLoRA:
    """Flat-LoRA for a PEFT model, plain or wrapped by DDP / DeepSpeed / FSDP.

    Every rank must call ``perturb``/``restore`` at the same points with the same step (the norm
    reduction is collective).  Between the two, the frozen base weights carry the noise; outside, they
    are bitwise the loaded weights.
    """

    def __init__(self, model: nn.Module, config: FlatLoRAConfig | None = None) -> None:
        self.config = config if config is not None else FlatLoRAConfig()
        self.config.validate()
        self.model = model
        self.targets: list[LoraTarget] = find_targets(model)
        self._backends: dict[str, ShardBackend] = {}
        self._backend_of: dict[int, ShardBackend] = {}
        self._functional: dict[int, bool] = {}
        for t in self.targets:
            kind = backend_kind(t)
            if kind not in self._backends:
                self._backends[kind] = make_backend(kind, model)
            self._backend_of[id(t)] = self._backends[kind]
            self._functional[id(t)] = self._pick_functional(t)
        for backend in self._backends.values():
            backend.check([t for t in self.targets if self._backend_of[id(t)] is backend])
        self._group = reduction_group(self._backends, set(self._backends))
        total_out = sum(t.layout.out_features for t in self.targets)
        self._norms = torch.zeros(total_out, dtype=torch.float32, device=self._comm_device())
        self._in_features = torch.cat(
            [torch.full((t.layout.out_features,), float(t.layout.in_features)) for t in self.targets]
        ).to(self._norms.device)
        self.scheme = scheme_for(self._storage_device())
        """``"fused"`` or ``"blocks"`` (``FLATLORA_KERNELS``; see ``kernels``): fixed for the engine's life."""
        self._active: _Active | None = None
        self._last_step: int | None = None
        self._stats: dict[str, Any] = {}
        self._std_stats: torch.Tensor | None = None  # (mean, max) row std, on the device until stats()
        self._allreduces = 0
        self._record_hints: dict[str, tuple[int, int]] = {}  # fused scheme: last record totals (capacities)

    # ------------------------------------------------------------------ set-up
    def _pick_functional(self, t: LoraTarget) -> bool:
        mode = self.config.mode
        if mode == "inplace" and t.quantized:
            raise ValueError(
                f"layer {t.name!r} has a quantized base weight, which cannot take noise in place; "
                "use FlatLoRAConfig(mode='auto') or mode='functional'"
            )
        return mode == "functional" or (mode == "auto" and t.quantized)

    def _comm_device(self) -> torch.device:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return self._compute_device()

    def _storage_device(self) -> torch.device:
        """Where the base weights' storage lives: CPU when any target's is (ZeRO-3 ``offload_param``
        keeps partitions in CPU memory), else the compute device.  ``auto`` picks the scheme from it."""
        for t in self.targets:
            store = getattr(t.weight, "ds_tensor", None)
            if (store if store is not None else t.weight).device.type == "cpu":
                return torch.device("cpu")
        return self._compute_device()

    def _compute_device(self) -> torch.device:
        """Where the LoRA factors (and so the layer's compute) live."""
        a = self.targets[0].local_factors() if self.targets else []
        return a[0][0].device if a else torch.device("cpu")

    # ------------------------------------------------------------------ the two halves
    @property
    def is_perturbed(self) -> bool:
        return self._active is not None

    def backend_of(self, target: LoraTarget) -> ShardBackend:
        """The backend that stores ``target``'s base weight (one of ``self.targets``)."""
        return self._backend_of[id(target)]

    def noise_key(self, target: LoraTarget) -> NoiseKey:
        """The key of the noise ``target`` carries now; ``RuntimeError`` outside perturb/restore or for a
        step that was skipped or had no noise (factor 0)."""
        key = self._active.keys.get(id(target)) if self._active is not None else None
        if key is None:
            raise RuntimeError(f"layer {target.name!r} carries no noise now: call perturb(step) with a step whose "
                               "noise factor is > 0 first")  # fmt: skip
        return key

    @torch.no_grad()
    def perturb(self, step: int) -> None:
        """Add step ``step``'s noise to every target (collective over the shard group)."""
        if self._active is not None:
            raise RuntimeError(
                f"FlatLoRA.perturb({step}) called while still perturbed for step {self._active.step}; "
                "call restore() first"
            )
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        cfg = self.config
        if cfg.total_steps is None:
            raise ValueError("FlatLoRAConfig.total_steps is not set: give the number of optimizer steps")
        factor = noise_factor(step, cfg.total_steps, cfg.schedule)
        active = _Active(step, factor)
        amp = factor * cfg.sigma
        self._stats = {"factor": factor, "sigma": cfg.sigma, "mean_row_std": 0.0, "max_row_std": 0.0}
        self._std_stats = None
        if amp > 0:
            std, finite = self._row_std(amp)
            if self.scheme == "fused":
                active.skipped = not self._apply_fused(active, std, finite)
            elif not bool(finite):
                active.skipped = self._nonfinite()
            else:
                self._apply(active, std)
        self._active = active
        self._last_step = step

    def _row_std(self, amp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row std ``amp/sqrt(n)·||W_i + s(BA)_i||`` for all targets and a device flag: all finite.

        No host sync here: the caller reads the flag (the fused scheme with its record counts)."""
        norms, calls = row_norms(self.targets, self._backend_of, self._norms, self._group, self.scheme == "fused")
        self._allreduces += calls
        finite = torch.isfinite(norms).all()
        std = norms.mul_(amp).div_(self._in_features.sqrt())
        self._std_stats = torch.stack([std.mean(), std.max()])
        return std, finite

    def _nonfinite(self) -> bool:
        """Raise, or warn and mark the step skipped (``skip_nonfinite``); returns ``True`` (skipped)."""
        msg = "non-finite row norm of W + s*B*A"
        if not self.config.skip_nonfinite:
            raise FloatingPointError(msg)
        # stacklevel: _nonfinite <- perturb <- torch.no_grad's wrapper <- the caller's line
        warnings.warn(f"Flat-LoRA: {msg}; this step runs without perturbation", RuntimeWarning, stacklevel=4)
        self._stats["skipped"] = 1
        self._std_stats = None
        return True

    def _key(self, t: LoraTarget, step: int, std: torch.Tensor) -> NoiseKey:
        m = t.layout.out_features
        fused_scheme = self.scheme == "fused"
        return NoiseKey(self.config.seed, step, t.name, t.layout, std[t.offset : t.offset + m], fused_scheme)

    def _apply(self, active: _Active, std: torch.Tensor) -> None:
        """The blocks scheme: take every dense target's regions, perturb them all as one stream of noise
        chunks (``perturb_regions``: all or nothing), close the phases, install the functional targets.
        When anything fails, no target carries noise as the exception propagates."""
        keys = {id(t): self._key(t, active.step, std) for t in self.targets}
        dense = [t for t in self.targets if not self._functional[id(t)]]
        taken: list[LoraTarget] = []
        owner: list[int] = []
        try:
            jobs = []
            for t in dense:
                regions = self._backend_of[id(t)].begin_write(t, Phase.PERTURB)
                taken.append(t)
                jobs += [(r, keys[id(t)]) for r in regions]
                owner += [id(t)] * len(regions)
            fixes = perturb_regions(jobs)
        except BaseException:
            self._release(taken)
            raise
        per_target: dict[int, list[Fixups | None]] = {}
        for o, fix in zip(owner, fixes):
            per_target.setdefault(o, []).append(fix)
        self._commit(active, dense, keys, {o: Fixups.merge(f) for o, f in per_target.items()})
        self._install_functional(active, keys)

    def _commit(self, active: _Active, dense: list[LoraTarget], keys: dict[int, NoiseKey],
                fixups: dict[int, Fixups | None]) -> None:  # fmt: skip
        """Close the perturb phase of the written ``dense`` targets and record their keys and fix-ups."""
        for t in dense:
            self._backend_of[id(t)].end_write(t, Phase.PERTURB)
            fix = fixups.get(id(t))
            if fix is not None:
                active.fixups[id(t)] = fix
            active.keys[id(t)] = keys[id(t)]

    def _install_functional(self, active: _Active, keys: dict[int, NoiseKey]) -> None:
        """Install the noise of the functional targets (after the dense ones); on failure undo all."""
        try:
            for t in self.targets:
                if self._functional[id(t)]:
                    functional.install(self._backend_of[id(t)], t, keys[id(t)])
                    active.keys[id(t)] = keys[id(t)]
        except BaseException:
            self._undo(active)
            raise
        self._fixup_stats(active)

    def _fixup_stats(self, active: _Active) -> None:
        fix = active.fixups.values()
        self._stats.update(fixups=sum(f.count for f in fix), fixup_bytes=sum(f.nbytes for f in fix))

    def _apply_fused(self, active: _Active, std: torch.Tensor, finite: torch.Tensor) -> bool:
        """The fused scheme: perturb every region in one pass (gated on ``finite`` on the device), then one
        host read (``finite``, the row-std statistics and the record counters).  Returns ``False`` when the step is skipped (``skip_nonfinite``)."""
        keys = {id(t): self._key(t, active.step, std) for t in self.targets}
        dense = [t for t in self.targets if not self._functional[id(t)]]
        taken = []
        try:
            items = []
            for t in dense:
                items.append((keys[id(t)], self._backend_of[id(t)].begin_write(t, Phase.PERTURB)))
                taken.append(t)
            head, plans = fused.perturb_all(items, self._header(finite), std.device, self._record_hints)
        except BaseException:
            self._release(taken)
            raise
        if not head[0][0]:
            self._release(taken)
            return not self._nonfinite()
        mean, top = _floats(head[1])
        self._stats.update(mean_row_std=mean, max_row_std=top)
        self._record_hints = {p.key.name: p.totals for p in plans}
        self._std_stats = None  # already on the host
        self._commit(active, dense, keys, {id(t): fused.fixups(p) for t, p in zip(dense, plans)})
        self._install_functional(active, keys)
        return True

    def _header(self, finite: torch.Tensor) -> torch.Tensor:
        """``[[finite, finite], [bits(mean), bits(max)]]`` as int64 (2, 2): float64 bit patterns, so the
        statistics travel in the fused scheme's one host read (0.0 has all-zero bits: ``finite`` false)."""
        flag = finite.view(1).double()
        return torch.cat([flag, flag, self._std_stats.double()]).view(torch.int64).view(2, 2)

    def _release(self, targets: list[LoraTarget]) -> None:
        """Abort the perturbation of targets whose regions were taken but not written."""
        for t in targets:
            self._backend_of[id(t)].abort_write(t)

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the noise; every base weight is bitwise what it was before ``perturb``."""
        if self._active is None:
            raise RuntimeError("FlatLoRA.restore() called without a matching perturb()")
        active, self._active = self._active, None
        self._undo(active)

    def _undo(self, active: _Active) -> None:
        """Remove the noise of every target in ``active.keys``: the blocks scheme's regions as one stream
        (``restore_regions``), the fused scheme's region by region, functional targets uninstalled."""
        opened: list[LoraTarget] = []
        jobs = []
        for t in self.targets:
            key = active.keys.get(id(t))
            if key is None:
                continue
            if self._functional[id(t)]:
                functional.uninstall(t)
                continue
            fix = active.fixups.get(id(t))
            regions = self._backend_of[id(t)].begin_write(t, Phase.RESTORE)
            opened.append(t)
            if key.fused:
                for r in regions:
                    fused.restore_region(r, key, fix)
            else:
                jobs += [(r, key, fix) for r in regions]
        restore_regions(jobs)
        for t in opened:
            self._backend_of[id(t)].end_write(t, Phase.RESTORE)

    @contextmanager
    def perturbed(self, step: int) -> Iterator[FlatLoRA]:
        """Perturb for ``step`` on entry, restore on exit (also when the body raises)."""
        self.perturb(step)
        try:
            yield self
        finally:
            self.restore()

    # ------------------------------------------------------------------ reporting and resume
    def stats(self) -> dict[str, Any]:
        """Numbers for logs, about the last perturbation.

        ``fixups`` (elements whose round trip needed a patch) and ``state_bytes`` (norm buffers plus
        fix-ups: the engine's persistent memory) are this rank's; the rest are the same on every rank.
        """
        state_bytes = self._norms.numel() * 4 + self._in_features.numel() * 4 + self._stats.get("fixup_bytes", 0)
        if self._std_stats is not None:  # the device-to-host read of the row-std statistics happens here
            mean, top = self._std_stats.tolist()
            self._stats.update(mean_row_std=mean, max_row_std=top)
            self._std_stats = None
        return {
            "factor": 0.0,
            "sigma": self.config.sigma,
            "mean_row_std": 0.0,
            "max_row_std": 0.0,
            "fixups": 0,
            "fixup_bytes": 0,
            **self._stats,
            "step": self._last_step,
            "layers": len(self.targets),
            "elements": sum(t.layout.numel for t in self.targets),
            "state_bytes": state_bytes,
            "norm_allreduces": self._allreduces,
            "backends": ",".join(sorted(self._backends)),
            "noise_scheme": self.scheme,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the config (seed and schedule) and the last step perturbed.

        The noise is a pure function of (seed, step, name, index), so nothing else is required.
        """
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "last_step": self._last_step,
            "noise_scheme": scheme_id(self.scheme),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a saved state; the saved seed, sigma and schedule win over the current config."""
        if self._active is not None:
            raise RuntimeError("cannot load a FlatLoRA state while perturbed; call restore() first")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "config" not in state:
            raise ValueError(f"not a FlatLoRA state dict (version {STATE_VERSION}): {state!r:.200}")
        scheme = state.get("noise_scheme", "blocks")  # states written before the fused scheme existed
        if scheme != scheme_id(self.scheme):
            raise ValueError(_scheme_mismatch(scheme, scheme_id(self.scheme)))
        saved = FlatLoRAConfig.from_dict(state["config"])
        self.config = replace(saved, total_steps=saved.total_steps or self.config.total_steps)
        self._last_step = state.get("last_step")


def _scheme_mismatch(saved: str, current: str) -> str:
    """Why a state written with noise scheme ``saved`` cannot be resumed by a run drawing ``current``."""
    head = f"this FlatLoRA state was written with the {saved!r} noise scheme but this run uses {current!r} " \
           "(different noise values)"
    if saved.startswith("fused") and current.startswith("fused"):
        return (f"{head}: this flatlora_dist draws only fused-v{current.rsplit('v', 1)[-1]}; resume with the "
                "release that wrote the state, or restart the run")
    return f"{head}; resume with FLATLORA_KERNELS={saved.split('-v')[0]}"
