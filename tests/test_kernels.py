"""The fused noise scheme (``FLATLORA_KERNELS=fused``): Triton kernels run on CPU tensors through the
Triton interpreter, so every invariant of the blocks scheme is checked on the GPU path here.

Small sizes throughout: the interpreter draws ~0.5 M noise values per second.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it before triton loads; this keeps the file runnable alone

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import fingerprint, tiny_llama  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora_dist import fused as F  # noqa: E402
from flatlora_dist.inplace import NoiseKey  # noqa: E402
from flatlora_dist.kernels import load_ops, scheme_for  # noqa: E402
from flatlora_dist.layout import RowLayout  # noqa: E402
from flatlora_dist.noise import key_seed, noise_range  # noqa: E402
from flatlora_dist.shards import Region  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    monkeypatch.setenv("FLATLORA_KERNELS", "fused")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before the kernels are imported (conftest or the shell)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return load_ops().bits(t)


# ------------------------------------------------------------------------------- selection
def test_scheme_selector(monkeypatch):
    assert scheme_for("cpu") == "fused"
    monkeypatch.setenv("FLATLORA_KERNELS", "auto")
    assert scheme_for("cpu") == "blocks", "auto keeps the blocks scheme on CPU"
    monkeypatch.setenv("FLATLORA_KERNELS", "blocks")
    assert scheme_for("cpu") == "blocks"
    monkeypatch.setenv("FLATLORA_KERNELS", "fast")
    with pytest.raises(ValueError, match="FLATLORA_KERNELS='fast' is not one of auto, fused, blocks"):
        scheme_for("cpu")
    monkeypatch.setenv("FLATLORA_KERNELS", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        scheme_for("cpu")


def test_core_imports_without_triton_and_fused_says_what_is_missing():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import flatlora_dist, flatlora_dist.engine, flatlora_dist.fused, flatlora_dist.norms\n"
        "from flatlora_dist.kernels import scheme_for\n"
        "assert scheme_for('cpu') == 'blocks'\n"
        "import os; os.environ['FLATLORA_KERNELS'] = 'fused'\n"
        "try:\n    scheme_for('cpu')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "FLATLORA_KERNELS": "auto", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "needs Triton, which is not installed" in p.stdout


# ------------------------------------------------------------------------------- the noise
def test_fused_noise_is_pinned():
    """The fused definition (v2): Philox4x32-10 keyed by blake2b(seed, step, name), counter = global index
    // 4, four normals per call.  Pinned on the interpreter's (numpy) float32 math: sha256 of the values
    rounded to bfloat16 (robust to last-bit differences between libm builds) and seven values to 1e-5."""
    z = noise_range(1, 2, "golden.q_proj", 4096, 0, 4096)
    digest = hashlib.sha256(z.bfloat16().view(torch.int16).numpy().tobytes()).hexdigest()
    assert digest == GOLDEN_BF16_SHA256
    assert key_seed(1, 2, "golden.q_proj") == GOLDEN_KEY
    torch.testing.assert_close(z[[0, 1, 2, 1000, 4095]], torch.tensor(GOLDEN_VALUES), rtol=1e-5, atol=1e-6)
    hi = noise_range(1, 2, "w", 2**33, 2**32 + 2, 2**32 + 4)
    torch.testing.assert_close(hi, torch.tensor(GOLDEN_HIGH), rtol=1e-5, atol=1e-6)


GOLDEN_KEY = 3170522715481289402
GOLDEN_BF16_SHA256 = "29901b0b60f312f00e7ec9d868bead2887ff272e9cf998fcd730fb3949b933e8"
GOLDEN_VALUES = [-1.1919954, -1.5655258, 1.165508, -0.5886107, 0.1259851]
GOLDEN_HIGH = [0.93431, -0.2513546]


def _philox(key: int, counter: int) -> list[int]:
    """Philox4x32-10 of counter ``(counter low, counter high, 0, 0)`` and key ``(key low, key high)``."""
    m32 = 0xFFFFFFFF
    c = [counter & m32, counter >> 32 & m32, 0, 0]
    k0, k1 = key & m32, key >> 32 & m32
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p2 >> 32) ^ c[1] ^ k0, p2 & m32, (p0 >> 32) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c


def reference_normal(key: int, k: int) -> float:
    """The fused scheme's ``z_k`` in float64, from the definition in ``kernels/triton_kernels.py``."""
    out = _philox(key, k >> 2)
    a, b = out[2 * ((k & 3) >> 1)], out[2 * ((k & 3) >> 1) + 1]
    u = ((a >> 9) * 2 + 1) / 2**24
    t = (b - 2**32 if b >= 2**31 else b) * math.pi / 2**31
    r = math.sqrt(-2 * math.log(u))
    return r * (math.cos(t) if k % 2 == 0 else math.sin(t))


@pytest.mark.parametrize("start", [0, 3, 2**32 - 2, 2**40 + 1])
def test_fused_noise_equals_an_independent_reference(start):
    """The kernels compute the documented definition (a plain-Python Philox and Box-Muller, float64)."""
    key = key_seed(7, 1, "ref")
    z = noise_range(7, 1, "ref", 2**41, start, start + 40)
    ref = torch.tensor([reference_normal(key, k) for k in range(start, start + 40)], dtype=torch.float64)
    torch.testing.assert_close(z.double(), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("lo,hi", [(0, 5000), (1, 4097), (777, 4999), (4096, 4096), (2**32 - 5, 2**32 + 9)])
def test_any_slice_equals_the_whole_including_64_bit_indices(lo, hi):
    n = 2**33
    base = lo - lo % 7
    whole = noise_range(3, 4, "w", n, base, hi + 11)
    assert torch.equal(noise_range(3, 4, "w", n, lo, hi), whole[lo - base : hi - base])
    if hi > 2**32:  # the counter's high word is used: k and k + 2^32 differ
        low, high = noise_range(3, 4, "w", n, 1, 9), noise_range(3, 4, "w", n, 2**32 + 1, 2**32 + 9)
        assert not torch.equal(low, high)


def test_moments_and_key_components():
    z = noise_range(0, 0, "w", 200_000, 0, 200_000).double()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    other = [noise_range(1, 0, "w", 64, 0, 64), noise_range(0, 1, "w", 64, 0, 64), noise_range(0, 0, "v", 64, 0, 64)]
    assert all(not torch.equal(o, z[:64].float()) for o in other)


def test_the_four_values_of_one_call_are_uncorrelated():
    """Four consecutive indices share one Philox call: their values (both outputs of two Box-Muller pairs)
    are uncorrelated with each other and with the next call's, and bounded by sqrt(2·24·ln 2)."""
    z = noise_range(0, 3, "w", 400_000, 0, 400_000).double().view(-1, 4)
    c = torch.corrcoef(torch.cat([z[:-1], z[1:]], dim=1).T)
    assert float((c - torch.eye(8, dtype=c.dtype)).abs().max()) < 0.01
    assert float(z.abs().max()) <= math.sqrt(2 * 24 * math.log(2)) + 1e-6
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 0.0006  # the normal tail, P(|z| > 3)


# ------------------------------------------------------------------------------- perturb / restore
ROWS, COLS = 64, 1000


def _edge_weight(dtype: torch.dtype) -> torch.Tensor:
    from test_inplace import _weight

    return _weight(dtype)


def _key(std: torch.Tensor, out_axis: int = 0, rows: int = ROWS, cols: int = COLS, step: int = 3) -> NoiseKey:
    return NoiseKey(5, step, "layer", RowLayout(rows, cols, out_axis), std, fused=True)


def _perturb(regions: list[Region], key: NoiseKey):
    head, plans = F.perturb_all([(key, regions)], None, regions[0].tensor.device)
    assert head == [[1, 1]]
    return F.fixups(plans[0])


def _sorted(fix) -> tuple[torch.Tensor, ...]:
    """A target's records in index order, unused slots (index -1) dropped (record order is not defined)."""
    keep = fix.index >= 0
    idx, order = fix.index[keep].sort()
    fkeep = fix.full_index >= 0
    fidx, forder = fix.full_index[fkeep].sort()
    return idx, fix.xor[keep][order], fidx, load_ops().bits(fix.full_values[fkeep][forder])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edge_values_restore_exactly_and_records_are_compact(dtype):
    w = _edge_weight(dtype)
    before = w.clone()
    std = torch.linspace(1e-4, 3e-2, ROWS)
    key = _key(std)
    fix = _perturb([Region(w, 0)], key)
    e = noise_range(5, 3, "layer", w.numel(), 0, w.numel()) * std.repeat_interleave(COLS)
    assert torch.equal(_bits(w), _bits((before.float() + e).to(dtype))), "w' = round(w + e), rounded as torch does"
    back = (w.float() - e).to(dtype)
    idx, _, fidx, _ = _sorted(fix)
    mismatch = (_bits(back) != _bits(before)).nonzero().view(-1)
    assert torch.equal(torch.cat([idx, fidx]).sort().values.long(), mismatch), "exactly the mismatches, once each"
    assert fix.index.dtype == torch.int32 and fix.xor.dtype == torch.int16
    wide = fidx.numel()
    assert fix.nbytes == 6 * fix.index.numel() + (4 + w.element_size()) * fix.full_index.numel()
    if dtype != torch.float32:
        assert wide == 0
    else:
        assert wide > 0, "-0.0 and 1e-30 need whole values (difference above the low 16 bits)"
    F.restore_region(Region(w, 0), key, fix)
    assert torch.equal(_bits(w), _bits(before))


@pytest.mark.parametrize("out_axis", [0, 1])
def test_regions_off_row_boundaries_equal_the_whole(out_axis):
    """Two shards split mid-row (as ZeRO-3 partitions are) get exactly the whole weight's perturbation
    and records, for both layouts."""
    rows, cols = 48, 77
    w = (torch.randn(rows * cols) * 0.02).bfloat16()
    std = torch.rand(cols if out_axis else rows) * 0.05
    key = _key(std, out_axis, rows, cols)
    whole = w.clone()
    fw = _perturb([Region(whole, 0)], key)
    cut = 1234  # not a multiple of cols
    a, b = w[:cut].clone(), w[cut:].clone()
    fa, fb = _perturb([Region(a, 0)], key), _perturb([Region(b, cut)], key)
    assert torch.equal(_bits(torch.cat([a, b])), _bits(whole))
    for x, y in zip(_sorted(F.Fixups.merge([fa, fb])), _sorted(fw)):
        assert torch.equal(x, y)
    F.restore_region(Region(a, 0), key, fw)  # the whole weight's records patch any region
    F.restore_region(Region(b, cut), key, fw)
    assert torch.equal(_bits(torch.cat([a, b])), _bits(w))


@pytest.mark.parametrize("cols", [64, 77])
@pytest.mark.parametrize("out_axis", [0, 1])
def test_regions_starting_at_every_residue_mod_4_equal_the_whole(cols, out_axis):
    """Shards starting at every residue mod 4 (one Philox call serves four indices, so a region may start
    inside a call) get the whole weight's noise, perturbation and records bit for bit; rows that are a
    multiple of 4 long (the kernels' fast path when the start is too) and rows that are not."""
    rows = 40
    w = (torch.randn(rows * cols) * 0.02).bfloat16()
    std = torch.rand(cols if out_axis else rows) * 0.05 + 0.01
    key = _key(std, out_axis, rows, cols)
    whole = w.clone()
    fw = _perturb([Region(whole, 0)], key)
    z = noise_range(5, 3, "layer", w.numel(), 0, w.numel())
    for r in range(4):
        cuts = [0, 4 * 97 + r, 4 * 401 + (r + 1) % 4, 4 * 555 + (r + 3) % 4, w.numel()]
        parts = [w[lo:hi].clone() for lo, hi in zip(cuts, cuts[1:])]
        fixes = [_perturb([Region(p, lo)], key) for p, lo in zip(parts, cuts)]
        for lo, hi in zip(cuts, cuts[1:]):
            assert torch.equal(noise_range(5, 3, "layer", w.numel(), lo, hi), z[lo:hi])
        assert torch.equal(_bits(torch.cat(parts)), _bits(whole)), f"residue {r}"
        for x, y in zip(_sorted(F.Fixups.merge(fixes)), _sorted(fw)):
            assert torch.equal(x, y)
        for p, lo in zip(parts, cuts):
            F.restore_region(Region(p, lo), key, fw)
        assert torch.equal(_bits(torch.cat(parts)), _bits(w))


def test_records_that_do_not_fit_fall_back_without_another_sync(monkeypatch):
    """Capacities far below the record count, many programs: the programs that fit write, the others
    write nothing and are redone into bigger buffers; the result equals an ample run and restores exactly,
    with one host read."""
    from launches import OpCounter

    w = _edge_weight(torch.bfloat16)
    before = w.clone()
    key = _key(torch.full((ROWS,), 2e-2))
    ample = w.clone()
    monkeypatch.setattr(F, "capacity", lambda numel, dtype, hint: (numel, numel))
    _, pa = F.perturb_all([(key, [Region(ample, 0)])], None, w.device)
    fa, records = F.fixups(pa[0]), pa[0].totals[0]
    assert pa[0].used == pa[0].totals == (fa.count, 0)
    monkeypatch.setattr(load_ops(), "BLOCK", 1024)  # 63 programs instead of 2
    monkeypatch.setattr(F, "capacity", lambda numel, dtype, hint: (records // 3, 1))
    with OpCounter() as c:
        head, plans = F.perturb_all([(key, [Region(w, 0)])], None, w.device)
    assert c.syncs == 1 and plans[0].totals == (records, 0)
    assert plans[0].used[0] > records, "the fallback's buffers: the valid prefix, then the redo's tail"
    fix = F.fixups(plans[0])
    assert torch.equal(_bits(w), _bits(ample))
    for x, y in zip(_sorted(fix), _sorted(fa)):
        assert torch.equal(x, y)
    F.restore_region(Region(w, 0), key, fix)
    assert torch.equal(_bits(w), _bits(before))


def test_a_refused_wrap_triton_launches_the_interpreted_kernel(monkeypatch):
    """torch < 2.13's ``wrap_triton`` refuses the interpreter's ``InterpretedFunction``: the op launches the
    kernel directly and is still one dispatched op."""
    from launches import OpCounter

    ops = load_ops()

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    want = noise_range(1, 1, "w", 100, 3, 90)
    monkeypatch.setattr(ops, "wrap_triton", refuse)
    with OpCounter() as c:
        got = noise_range(1, 1, "w", 100, 3, 90)
    assert torch.equal(got, want) and c.ops.get("flatlora::noise") == 1


def test_overlapping_regions_record_each_element_once():
    """A ZeRO-3 partition and a gathered copy of the whole weight: same noise, unique records, both exact."""
    w = _edge_weight(torch.bfloat16)
    before = w.clone()
    part = w[20_000:41_000].clone()
    key = _key(torch.full((ROWS,), 2e-2))
    fix = _perturb([Region(part, 20_000), Region(w, 0)], key)
    assert torch.equal(_bits(part), _bits(w[20_000:41_000]))
    idx = _sorted(fix)[0]
    assert idx.unique().numel() == idx.numel()
    solo = w.clone()
    solo.copy_(before)
    assert torch.equal(idx, _sorted(_perturb([Region(solo, 0)], key))[0])
    F.restore_region(Region(part, 20_000), key, fix)
    F.restore_region(Region(w, 0), key, fix)
    assert torch.equal(_bits(w), _bits(before)) and torch.equal(_bits(part), _bits(before[20_000:41_000]))


@pytest.mark.slow  # interpreter-heavy: the full suite
def test_bf16_restore_is_bit_exact_after_1000_round_trips():
    """1,000 bf16 round trips with different noise and std, run as 1,000 row blocks of one weight (the
    interpreter's cost is per launch), then three sequential cycles of all of them.

    Each round trip starts from the same bits when the previous one was exact, so sequential cycles of
    one block are equivalent to these independent ones: exactness here is exactness after 1,000 cycles.
    """
    blocks, rows, cols = 1000, 8, 40
    w = (torch.randn(blocks * rows * cols) * 0.02).bfloat16()
    w[::97] = -0.0
    before = w.clone()
    records = 0
    for step in range(3):
        std = (0.01 + 0.04 * torch.rand(blocks)).repeat_interleave(rows)  # a different std per round trip
        key = _key(std, 0, blocks * rows, cols, step)
        fix = _perturb([Region(w, 0)], key)
        assert not torch.equal(_bits(w), _bits(before))
        records += fix.count
        F.restore_region(Region(w, 0), key, fix)
        assert torch.equal(_bits(w), _bits(before)), f"cycle {step}"
    assert records > 3000


# ------------------------------------------------------------------------------- the engine
def _one_layer(n_in, n_out, conv1d=False, dtype=torch.float32):
    from test_engine import one_layer

    return one_layer(n_in, n_out, conv1d, dtype)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "fan_in_fan_out"])
def test_row_std_matches_the_formula(conv1d):
    from test_engine import effective_weight

    sigma, n_in, n_out, steps = 0.05, 384, 48, 12
    model = _one_layer(n_in, n_out, conv1d)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=100, schedule="constant"))
    assert flat.scheme == "fused"
    w = model.base_model.model.lin.base_layer.weight
    clean = w.detach().double().clone()
    out_axis = 1 if conv1d else 0
    expected = sigma / math.sqrt(n_in) * effective_weight(model).detach().norm(dim=1 - out_axis)
    diffs = []
    for step in range(steps):
        with flat.perturbed(step):
            diffs.append(w.detach().double() - clean)
    std = torch.cat(diffs, dim=1 - out_axis).std(dim=1 - out_axis)
    rel = (std / expected - 1).abs()
    assert float(rel.max()) < 0.05, f"worst row off by {float(rel.max()):.3%}"
    assert torch.equal(w.detach().double(), clean)
    st = flat.stats()
    assert st["mean_row_std"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert st["max_row_std"] == pytest.approx(float(expected.max()), rel=1e-4)
    assert st["noise_scheme"] == "fused"


@pytest.mark.slow  # interpreter-heavy: the full suite
def test_engine_exact_restore_after_cycles():
    """Through the engine, with optimizer steps moving A and B between cycles (bf16 base)."""
    from test_engine import exact_restore_cycles

    assert exact_restore_cycles(torch.bfloat16, 6, 2) > 0


@pytest.mark.slow  # interpreter-heavy: the full suite
def test_functional_equals_inplace():
    """Same loss and LoRA gradients from the functional and the in-place mode (bf16 base)."""
    from test_engine import test_functional_gradients_equal_inplace

    test_functional_gradients_equal_inplace(torch.bfloat16)


def test_functional_noisy_weight_is_one_kernel():
    """QLoRA's path: ``noisy_weight`` builds round(W + e) with one fused op over the dense weight."""
    from launches import OpCounter

    from flatlora_dist import functional

    model = _one_layer(96, 40)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.1, total_steps=4, schedule="constant", mode="functional"))
    flat.perturb(2)
    t = flat.targets[0]
    key = flat._active.keys[id(t)]
    with OpCounter() as c:
        out = functional.noisy_weight(flat._backend_of[id(t)], t, key, torch.float32)
    assert c.ops.get("flatlora::noisy") == 1 and c.launches <= 3, dict(c.ops)
    w = t.weight.detach()
    e = noise_range(flat.config.seed, 2, t.name, w.numel(), 0, w.numel()).view_as(w) * key.std[:, None]
    assert torch.equal(out, w + e)
    flat.restore()


@pytest.mark.slow  # interpreter-heavy: the full suite
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("quant_type", "double_quant", "storage", "bias"),
                         [("nf4", True, torch.uint8, True), ("fp4", False, torch.bfloat16, False)])
def test_qlora_4bit_gradients_equal_dense_layer_with_the_fused_noise(compute_dtype, quant_type, double_quant,
                                                                     storage, bias):
    """QLoRA (bitsandbytes 4-bit, functional mode) under the fused scheme (``noisy_4bit``: dequant + noise
    in one kernel): the same check as ``test_qlora`` — gradients equal a dense layer holding
    dequant(W) + the fused noise."""
    from test_qlora import test_gradients_equal_dense_layer_with_same_noise as check

    check(quant_type, double_quant, compute_dtype, storage, bias)


def test_nonfinite_norm_is_read_with_the_counts_and_skips(monkeypatch):
    model = tiny_llama(targets=["q_proj"])
    before = fingerprint(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.1, total_steps=4, schedule="constant", skip_nonfinite=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        flat.perturb(1)
    assert flat.stats()["skipped"] == 1 and fingerprint(model) == before
    flat.restore()
    flat.config.skip_nonfinite = False
    with pytest.raises(FloatingPointError):
        flat.perturb(2)
    assert not flat.is_perturbed and fingerprint(model) == before


def test_state_dict_records_the_scheme_and_refuses_another(monkeypatch, tiny):
    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.1, total_steps=5))
    state = flat.state_dict()
    assert state["noise_scheme"] == "fused-v2" and flat.stats()["noise_scheme"] == "fused"
    with pytest.raises(ValueError, match="written with the 'fused' noise scheme .* draws only fused-v2"):
        flat.load_state_dict({**state, "noise_scheme": "fused"})  # the fused scheme's version 1
    monkeypatch.setenv("FLATLORA_KERNELS", "blocks")
    other = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.1, total_steps=5))
    with pytest.raises(ValueError, match="written with the 'fused-v2' noise scheme .* FLATLORA_KERNELS=fused"):
        other.load_state_dict(state)
    old = {k: v for k, v in other.state_dict().items() if k != "noise_scheme"}  # a pre-scheme checkpoint
    other.load_state_dict(old)
    with pytest.raises(ValueError, match="'blocks' noise scheme"):
        flat.load_state_dict(old)


# ------------------------------------------------------------------------------- launches and syncs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_and_sync_bounds_hold_and_do_not_grow_with_size(dtype):
    """One LLaMA-7B layer's seven targets at 1/128 and 1/64 of their size: the same counts, at most 16
    launches per target and one host sync for perturb + stats() + restore."""
    from launches import count

    small, large = count("fused", 128, dtype), count("fused", 64, dtype)
    assert small["fixups"] > 0 and large["fixups"] > 0
    assert (small["launches_per_layer"], small["host_syncs_per_layer"]) == (
        large["launches_per_layer"], large["host_syncs_per_layer"])
    assert large["launches_per_layer"] <= 16 * 7
    assert large["host_syncs_per_layer"] <= 1


# ------------------------------------------------------------------------------- multi-process
def _dist_env(monkeypatch):
    monkeypatch.setenv("FLATLORA_KERNELS", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "tests" / "dist"))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_zero3_ranks_equal_single_process(monkeypatch, world):
    """2- and 3-rank ZeRO-3 with the fused scheme, DeepSpeed's default persistence threshold: ``cold`` perturbs
    the partitions alone, ``warm`` the partitions plus the persistent gathered copies (overlapping
    regions).  Gathered W' equals round(W + e) from the fused noise and the single-process run; bf16
    cycles restore bitwise."""
    _dist_env(monkeypatch)
    from ds_common import DS_DEFAULT_PERSISTENCE, launch

    args = dict(config="zero3", dtype="bf16", persistence=DS_DEFAULT_PERSISTENCE, checks=["perturbation", "cycles"],
                cycles=2)
    res = launch(ROOT / "tests" / "dist" / "ds_worker.py", world, args)
    for r in res:
        for phase in ("cold", "warm"):
            assert r[f"{phase}.noise_bit_identical"] and r[f"{phase}.restored_bitwise"]
            assert r[f"{phase}.std_max_rel"] < 1e-5 and r[f"{phase}.pert_max_abs_diff"] <= 1e-6
            assert r[f"{phase}.pert_max_abs"] > 1e-3
        assert r["cycles.bitwise"] and r["cycles.fixups"] > 0 and r["backends"] == "deepspeed"


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("fsdp2", 2), ("fsdp2", 3), ("fsdp1", 2)])
def test_fsdp_ranks_equal_single_process(monkeypatch, kind, world):
    """2- and 3-rank FSDP2 row shards (uneven at 3) and 2-rank FSDP1 flat parameters (``use_orig_params``)
    with the fused scheme: same checks as ``test_fsdp`` (one small case)."""
    _dist_env(monkeypatch)
    from fsdp_common import launch

    case = dict(name=kind, kind=kind, checks=["perturbation", "cycles"], cycles=2)
    res = [r[kind] for r in launch(ROOT / "tests" / "dist" / "fsdp_worker.py", world, {"cases": [case]})]
    for r in res:
        assert r["backends"] == kind and r["scheme"] == "fused"
        for phase in ("cold", "warm"):
            assert r[f"{phase}.noise_bit_identical"] and r[f"{phase}.restored_bitwise"]
            assert r[f"{phase}.std_max_rel"] < 1e-5 and r[f"{phase}.pert_max_abs_diff"] <= 1e-6
            assert r[f"{phase}.loss_perturbed"] == pytest.approx(r[f"{phase}.ref_loss_perturbed"], abs=1e-6)
        assert r["cycles.bitwise"] and r["cycles.fixups"] > 0


@pytest.mark.slow
def test_hsdp_ranks_equal_single_process(monkeypatch):
    """4 ranks = 2 replicas x 2 shards (FSDP2 on a 2-D mesh, FSDP1 HYBRID_SHARD) with the fused scheme:
    equal to the single process, replicas bitwise identical, norms reduced over the 2-rank shard group."""
    _dist_env(monkeypatch)
    from fsdp_common import launch

    cases = [dict(name="fsdp2", kind="fsdp2", replicas=2, checks=["perturbation", "cycles"], cycles=2),
             dict(name="fsdp1", kind="fsdp1", replicas=2, checks=["perturbation"])]
    out = launch(ROOT / "tests" / "dist" / "fsdp_worker.py", 4, {"cases": cases})
    for name in ("fsdp2", "fsdp1"):
        res = [r[name] for r in out]
        for r in res:
            assert r["backends"] == name and r["scheme"] == "fused" and r["reduce_group_size"] == 2
            for phase in ("cold", "warm"):
                assert r[f"{phase}.noise_bit_identical"] and r[f"{phase}.restored_bitwise"]
                assert r[f"{phase}.std_max_rel"] < 1e-5 and r[f"{phase}.pert_max_abs_diff"] <= 1e-6
        for phase in ("cold", "warm"):
            for k in (0, 1):  # rank k and rank 2 + k hold the same shard: bitwise the same perturbation
                assert res[k][f"{phase}.local_sha"] == res[2 + k][f"{phase}.local_sha"]
            assert res[0][f"{phase}.local_starts"] != res[1][f"{phase}.local_starts"]
            assert len({str(r[f"{phase}.full_sha"]) for r in res}) == 1
    assert all(r["fsdp2"]["cycles.bitwise"] for r in out)
