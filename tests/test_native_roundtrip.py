"""The fused CPU round-trip kernels (``native/roundtrip.c`` via ``roundtrip.py``) against the torch path of
``inplace.py``, bit for bit: perturbed weights, every fix-up record (indices, xors, whole values, dtypes
and order) and the restore, on adversarial data, in float32/bfloat16/float16, both layouts, and regions
that start mid-row and mid-block and span noise-block boundaries.  Plus the build cache and fallbacks."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flatlora_dist import native
from flatlora_dist.inplace import NoiseKey, perturb_region, restore_region
from flatlora_dist.layout import RowLayout
from flatlora_dist.noise import NOISE_BLOCK
from flatlora_dist.shards import Region

ROWS, COLS = 300, 1000  # 300,000 elements: two noise blocks, the boundary mid-row
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REGIONS = [
    (0, ROWS * COLS),  # the whole weight
    (NOISE_BLOCK - 777, NOISE_BLOCK + 5_123),  # mid-row, mid-block, across the block boundary
    (12_345, 12_999),  # inside one row of one block
]


def _adversarial(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the values a round trip handles worst spread through them: signed zeros,
    subnormals and tiny weights far below the noise, values just under powers of two (binade crossings),
    large finite values, exact rounding ties of the storage type."""
    g = torch.Generator().manual_seed(seed)
    n = ROWS * COLS
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    fi = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, fi.smallest_normal, -fi.smallest_normal, fi.smallest_normal / 8, -fi.tiny / 64, 1e-30,
         -1e-30, 2.0**-6 * (1 - fi.eps / 2), -(2.0**-3) * (1 - fi.eps / 2), 1.0, fi.max / 4, -fi.max / 4,
         1 + fi.eps / 2, 0.5 + fi.eps / 4],
        dtype=torch.float64,
    )
    pos = torch.randperm(n, generator=g)[: 40 * specials.numel()]
    w[pos] = specials.repeat(40)
    return w.to(dtype)


def _key(axis: int, scale: float, seed: int = 0) -> NoiseKey:
    """Per-row std varying over four orders of magnitude (large noise on some rows, tiny on others)."""
    g = torch.Generator().manual_seed(seed + 100)
    m = ROWS if axis == 0 else COLS
    std = scale * 10.0 ** (torch.rand(m, generator=g) * 4 - 3)
    return NoiseKey(seed=7, step=11, name="layers.0.q_proj", layout=RowLayout(ROWS, COLS, axis), std=std)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same_records(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    for name in ("index", "xor", "full_index", "full_values"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_native_equals_torch_bit_for_bit(dtype, axis, scale):
    w0 = _adversarial(dtype)
    key = _key(axis, scale)
    for start, stop in REGIONS:
        a, b = w0[start:stop].clone(), w0[start:stop].clone()
        fa = perturb_region(Region(a, start), key, native=False)
        fb = perturb_region(Region(b, start), key, native=True)
        assert torch.equal(_bits(a), _bits(b)), (start, stop)
        _same_records(fa, fb)
        assert fa is not None and fa.count > 0
        # each path restores what the other perturbed, bit-exactly
        restore_region(Region(a, start), key, fa, native=True)
        restore_region(Region(b, start), key, fb, native=False)
        assert torch.equal(_bits(a), _bits(w0[start:stop])) and torch.equal(_bits(b), _bits(w0[start:stop]))


def test_native_records_are_the_compact_encoding():
    """float32: most records are (int32 index, 16-bit xor); the specials need whole values."""
    w = _adversarial(torch.float32)
    fix = perturb_region(Region(w, 0), _key(0, 1e-3), native=True)
    assert fix.index.dtype == fix.full_index.dtype == torch.int32 and fix.xor.dtype == torch.int16
    assert fix.full_index.numel() > 0 and fix.index.numel() > 10 * fix.full_index.numel()
    assert torch.all(fix.index[1:] > fix.index[:-1]) and torch.all(fix.full_index[1:] > fix.full_index[:-1])


def test_native_refuses_what_it_cannot_do():
    w = torch.zeros(ROWS * COLS, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        perturb_region(Region(w, 0), _key(0, 1e-3), native=True)
    perturb_region(Region(w, 0), _key(0, 1e-3))  # auto: the torch path takes float64
    assert w.abs().sum() > 0


def test_off_switch_and_missing_compiler_fall_back(monkeypatch, tmp_path):
    w0 = _adversarial(torch.float32)
    key = _key(0, 1e-3)
    want = w0.clone()
    ref = perturb_region(Region(want, 0), key, native=False)
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_FAILED", None)
    monkeypatch.setenv("FLATLORA_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.ENV, "on")
    with pytest.raises(RuntimeError, match="no C compiler"):
        perturb_region(Region(w0.clone(), 0), key)
    monkeypatch.setenv(native.ENV, "auto")
    w = w0.clone()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fix = perturb_region(Region(w, 0), key)  # falls back to the torch path
    assert torch.equal(w, want)
    _same_records(fix, ref)
    monkeypatch.setenv(native.ENV, "off")
    with pytest.raises(RuntimeError, match="FLATLORA_NATIVE=off"):
        perturb_region(Region(w0.clone(), 0), key, native=True)
    monkeypatch.setenv(native.ENV, "sometimes")
    with pytest.raises(ValueError, match="FLATLORA_NATIVE"):
        native.requested()


def test_concurrent_first_builds_share_one_library(tmp_path):
    """Two processes building into an empty cache at once: both load, one library file, no temp left."""
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('n', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.build())")  # no torch import: fast
    env = {"FLATLORA_NATIVE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code, native.__file__], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".so"] == [Path(outs[0]).name]
    assert not list(tmp_path.glob("*.tmp"))
