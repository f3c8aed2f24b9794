"""The core engine on plain parameters: statistics, exact restore, functional mode, memory, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fingerprint, randomise_lora_b, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flatlora_dist import FlatLoRA, FlatLoRAConfig, native
from flatlora_dist.noise import NOISE_BLOCK


class OneLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, conv1d: bool = False, bias: bool = False):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(n_out, n_in)
        else:
            self.lin = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


def one_layer(n_in=1024, n_out=256, conv1d=False, dtype=torch.float32, seed=0, bias=False):
    torch.manual_seed(seed)
    base = OneLinear(n_in, n_out, conv1d, bias).to(dtype)
    with torch.no_grad():  # rows of very different scale, so a per-row std error would show
        w = base.lin.weight
        scale = torch.linspace(0.1, 3.0, n_out, dtype=torch.float64).to(dtype)
        w.mul_(scale[None, :] if conv1d else scale[:, None])
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], fan_in_fan_out=conv1d))
    randomise_lora_b(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)  # make s*BA comparable to W so the norm really includes it
    return model


def effective_weight(model) -> torch.Tensor:
    """W + s*BA in storage layout, float64."""
    layer = model.base_model.model.lin
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    delta = (b @ a) * layer.scaling["default"]
    w = layer.base_layer.weight.double()
    return w + (delta.t() if layer.fan_in_fan_out else delta)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "fan_in_fan_out"])
def test_row_std_matches_the_formula(conv1d):
    sigma, n_in, n_out, steps = 0.05, 1024, 256, 8
    model = one_layer(n_in, n_out, conv1d)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=100, schedule="constant"))
    w = model.base_model.model.lin.base_layer.weight
    clean = w.detach().double().clone()
    eff = effective_weight(model)
    out_axis = 1 if conv1d else 0
    expected = sigma / math.sqrt(n_in) * eff.norm(dim=1 - out_axis)
    diffs = []
    for step in range(steps):  # pool fresh draws so a 5% bound on every row is ~6 standard errors
        with flat.perturbed(step):
            diffs.append(w.detach().double() - clean)
    d = torch.cat(diffs, dim=1 - out_axis)
    d = d.detach()
    std = d.std(dim=1 - out_axis)
    mean = d.mean(dim=1 - out_axis)
    rel = (std / expected - 1).abs()
    assert float(rel.max()) < 0.05, f"worst row off by {float(rel.max()):.3%}"
    assert float((mean.abs() / (expected / math.sqrt(steps * n_in))).max()) < 5
    assert torch.equal(w.detach().double(), clean)
    st = flat.stats()
    assert st["mean_row_std"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert st["max_row_std"] == pytest.approx(float(expected.max()), rel=1e-4)


def test_cosine_factor_scales_the_noise():
    model = one_layer(256, 64)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10))
    w = model.base_model.model.lin.base_layer.weight
    clean = w.detach().clone()
    with flat.perturbed(0):
        assert torch.equal(w, clean), "factor(0) = 0: no noise at step 0"
        assert flat.stats()["factor"] == 0.0
    with flat.perturbed(5):
        half = (w.detach() - clean).std()
        assert flat.stats()["factor"] == pytest.approx(0.5)
    with flat.perturbed(10):
        full = (w.detach() - clean).std()
        assert flat.stats()["factor"] == pytest.approx(1.0)
    assert float(half / full) == pytest.approx(0.5, rel=0.1)


def exact_restore_cycles(dtype: torch.dtype, steps: int, backward_every: int) -> int:
    """``steps`` perturb/forward/backward/restore/optimizer cycles; asserts the base is bitwise the same
    at the end; returns the fix-ups used."""
    model = tiny_llama(dtype, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    before = fingerprint(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.2, total_steps=steps, schedule="constant", seed=1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 128, (2, 8))
    fixups = 0
    for step in range(steps):
        with flat.perturbed(step):
            assert fingerprint(model) != before if step % 50 == 0 else True
            fixups += flat.stats()["fixups"]
            if step % backward_every == 0:
                model(input_ids=x, labels=x).loss.float().backward()
        opt.step()  # changes A and B, so the norms move from step to step
        opt.zero_grad()
    assert fingerprint(model) == before
    return fixups


# bf16 (the dtype with the most fix-ups) in the fast tier; the other two with the full suite
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, pytest.param(torch.float16, marks=SLOW), pytest.param(torch.float32, marks=SLOW)]
)
def test_exact_restore_after_200_cycles(dtype):
    fixups = exact_restore_cycles(dtype, 200, 10)
    if dtype != torch.float32:
        assert fixups > 0, "the round-trip fix-up path must have been exercised"


def _pair(mode_a: str, mode_b: str, dtype=torch.float32):
    ma, mb = tiny_llama(dtype, seed=3), tiny_llama(dtype, seed=3)
    fa = FlatLoRA(ma, FlatLoRAConfig(sigma=0.5, total_steps=4, schedule="constant", mode=mode_a))
    fb = FlatLoRA(mb, FlatLoRAConfig(sigma=0.5, total_steps=4, schedule="constant", mode=mode_b))
    return ma, mb, fa, fb


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _loss_and_input(model, x: torch.Tensor):
    """Loss on token ids ``x``, fed as embeddings that require grad (their gradient: the input gradient)."""
    emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
    return model(inputs_embeds=emb, labels=x).loss, emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_gradients_equal_inplace(dtype):
    """LoRA A/B gradients and the input gradient of functional mode equal in-place mode's at the same
    step (rtol 1e-5: the same rounded W + e, only the matmul's summation may differ)."""
    ma, mb, fa, fb = _pair("inplace", "functional", dtype)
    x = torch.randint(0, 128, (2, 12))
    with fa.perturbed(2):
        la, xa = _loss_and_input(ma, x)
        la.backward()
    with fb.perturbed(2):
        lb, xb = _loss_and_input(mb, x)
        lb.backward()
    assert torch.equal(la, lb)
    ga, gb = _lora_grads(ma), _lora_grads(mb)
    assert ga.keys() == gb.keys() and len(ga) == 28
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)
    # and the noise really matters: an unperturbed model gives other gradients
    mc = tiny_llama(dtype, seed=3)
    lc, xc = _loss_and_input(mc, x)
    lc.backward()
    gc = _lora_grads(mc)
    assert any(not torch.allclose(ga[n], gc[n]) for n in ga)
    assert not torch.allclose(xa.grad, xc.grad)


def test_functional_saves_nothing_weight_sized():
    model = one_layer(512, 256, bias=True)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.1, total_steps=4, schedule="constant", mode="functional"))
    x = torch.randn(4, 512, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    w = model.base_model.model.lin.base_layer.weight
    before = w.detach().clone()
    with flat.perturbed(1):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        assert torch.equal(w, before), "functional mode never writes the stored weight"
        (y**2).sum().backward()
    assert saved and max(saved) < w.numel(), saved
    assert x.grad is not None and x.grad.shape == x.shape
    # the input gradient used the noisy weight: it differs from the clean-weight one
    x2 = x.detach().clone().requires_grad_(True)
    (model(x2) ** 2).sum().backward()
    assert not torch.allclose(x.grad, x2.grad)


class _LargestAlloc(TorchDispatchMode):
    """Record the largest new storage (in elements of its dtype) any op allocates; views are free."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_memory_state_is_o_rows_and_transients_one_chunk():
    n_in, n_out = 2048, 1536  # 3M elements: three noise chunks
    model = one_layer(n_in, n_out, dtype=torch.bfloat16)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=4, schedule="constant"))
    with _LargestAlloc() as spy:
        flat.perturb(1)
        st = flat.stats()
        flat.restore()
    assert spy.largest <= NOISE_BLOCK + 2 * n_in, spy.largest
    assert st["state_bytes"] <= 8 * n_out + st["fixup_bytes"]
    assert st["fixup_bytes"] <= 6 * st["fixups"]
    assert st["fixups"] < 0.1 * n_in * n_out


def test_bad_config_values():
    for kwargs, match in [
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=-5), "total_steps"),
        (dict(schedule="linear"), "schedule"),
        (dict(mode="sideways"), "mode"),
        (dict(seed=-1), "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            FlatLoRAConfig(**kwargs)


def test_model_without_lora_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = fingerprint(plain, frozen_only=False)
    with pytest.raises(ValueError, match="no PEFT LoRA"):
        FlatLoRA(plain, FlatLoRAConfig(total_steps=10))
    assert fingerprint(plain, frozen_only=False) == before


def test_misuse_of_perturb_and_restore(tiny):
    before = fingerprint(tiny)
    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))
    with pytest.raises(RuntimeError, match="without a matching perturb"):
        flat.restore()
    flat.perturb(1)
    with pytest.raises(RuntimeError, match="still perturbed"):
        flat.perturb(2)
    flat.restore()
    assert fingerprint(tiny) == before
    with pytest.raises(ValueError, match="step"):
        flat.perturb(-1)
    with pytest.raises(ValueError, match="total_steps is not set"):
        FlatLoRA(tiny, FlatLoRAConfig()).perturb(0)
    assert fingerprint(tiny) == before
    assert not flat.is_perturbed


def test_backend_write_phases_follow_the_engine(tiny):
    """The engine names each write's phase; a backend call out of turn raises instead of flipping."""
    from flatlora_dist.shards import Phase

    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))
    (backend,) = flat._backends.values()
    t = flat.targets[0]
    with pytest.raises(RuntimeError, match=r"PlainBackend.begin_write\(.*RESTORE\) while the target is clean"):
        backend.begin_write(t, Phase.RESTORE)
    flat.perturb(2)
    with pytest.raises(RuntimeError, match="PERTURB.*while the target is perturbed"):
        backend.begin_write(t, Phase.PERTURB)
    flat.restore()
    assert backend._state == {}


@pytest.mark.parametrize("path", ["native", "torch"])
def test_failed_perturb_closes_every_phase(tiny, monkeypatch, path):
    """A write that fails half way (third region of the step's stream) undoes what was written, aborts
    every phase, and leaves every target clean: the next perturb/restore pair works and the base is
    bitwise unchanged.  ``native``: a chunk task of the C pass fails; ``torch``: the torch path fails."""
    from flatlora_dist import inplace, roundtrip

    if path == "native" and native.load() is None:
        pytest.skip("native kernels unavailable (FLATLORA_NATIVE=off or no compiler)")
    if path == "torch":
        monkeypatch.setenv(native.ENV, "off")
    before = fingerprint(tiny)
    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))
    (backend,) = flat._backends.values()
    made = []

    def third_fails(real):
        def wrapped(*args):
            made.append(None)
            if len(made) == 3:
                raise OSError("device lost")
            return real(*args)

        return wrapped

    if path == "native":
        real_tasks = roundtrip.perturb_tasks
        monkeypatch.setattr(roundtrip, "perturb_tasks", lambda *a: [third_fails(t) for t in real_tasks(*a)])
    else:
        monkeypatch.setattr(inplace, "_perturb_torch", third_fails(inplace._perturb_torch))
    with pytest.raises(OSError, match="device lost"):
        flat.perturb(3)
    assert len(made) >= 3 and backend._state == {} and not flat.is_perturbed and fingerprint(tiny) == before
    monkeypatch.undo()
    if path == "torch":
        monkeypatch.setenv(native.ENV, "off")
    flat.perturb(3)
    assert fingerprint(tiny) != before
    flat.restore()
    assert fingerprint(tiny) == before


def test_exception_inside_the_window_still_restores(tiny):
    before = fingerprint(tiny)
    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant"))
    with pytest.raises(KeyError):
        with flat.perturbed(3):
            raise KeyError("boom")
    assert fingerprint(tiny) == before and not flat.is_perturbed


def test_state_dict_resume_gives_identical_noise():
    m1, m2 = tiny_llama(seed=5), tiny_llama(seed=5)
    f1 = FlatLoRA(m1, FlatLoRAConfig(sigma=0.1, total_steps=50, seed=9))
    f1.perturb(7)
    f1.restore()
    f2 = FlatLoRA(m2, FlatLoRAConfig(sigma=0.3, total_steps=50, seed=0))
    f2.load_state_dict(f1.state_dict())
    assert f2.config.seed == 9 and f2.config.sigma == 0.1 and f2.stats()["step"] == 7
    w1 = m1.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    w2 = m2.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    with f1.perturbed(8), f2.perturbed(8):
        assert torch.equal(w1, w2)
    with pytest.raises(ValueError, match="not a FlatLoRA state"):
        f2.load_state_dict({"bogus": 1})


def test_sigma_zero_is_plain_lora(tiny):
    before = fingerprint(tiny)
    flat = FlatLoRA(tiny, FlatLoRAConfig(sigma=0.0, total_steps=10, schedule="constant"))
    with flat.perturbed(5):
        assert fingerprint(tiny) == before
    assert flat.stats()["norm_allreduces"] == 0
