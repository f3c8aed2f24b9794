"""QLoRA: Flat-LoRA on bitsandbytes 4-bit / 8-bit bases (functional mode, ``BnbBackend``).

References are built independently of the backend: the 4-bit weight is decoded here from its nibbles,
bitsandbytes' code table and its (nested) absmax; the noise from ``noise_range`` and the row norms in
float64.  4-bit widths are multiples of 64 wherever bitsandbytes' own CPU forward is involved
(DESIGN 3.6: its 2-D CPU dequant kernel is wrong when in_features % blocksize != 0).
"""

from __future__ import annotations

import hashlib
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_PROJ
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora_dist import FlatLoRA, FlatLoRAConfig
from flatlora_dist.noise import noise_range
from flatlora_dist.shards import bnb as bnb_backend

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

SIGMA = 0.05


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny layers: one thread is as fast, and bnb's CPU kernels (whose OpenMP regions follow
    torch.set_num_threads) cost ~10 ms per call at 2 threads on a loaded 2-core machine, 0.03 ms at 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- builders and references
class OneQ(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def qlora_layer(
    n_in: int = 512,
    n_out: int = 128,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
    bias: bool = False,
    blocksize: int = 64,
    seed: int = 0,
    weight_dtype: torch.dtype = torch.float32,
):
    """One bnb ``Linear4bit`` wrapped with PEFT LoRA (r=8); rows of very different scale; s·BA ~ W.
    ``weight_dtype``: the dtype quantized from (becomes ``quant_state.dtype``, what bnb dequantizes to)."""
    torch.manual_seed(seed)
    w = (torch.randn(n_out, n_in) * torch.linspace(0.1, 3.0, n_out)[:, None]).to(weight_dtype)
    lin = bnb.nn.Linear4bit(
        n_in,
        n_out,
        bias=bias,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        compress_statistics=double_quant,
        quant_storage=quant_storage,
    )
    lin.weight = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        quant_storage=quant_storage,
        blocksize=blocksize,
    )
    if bias:
        lin.bias = nn.Parameter(torch.randn(n_out) * 0.5)
    model = get_peft_model(OneQ(lin).to("cpu"), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    _randomise_b(model, 1.0 / math.sqrt(8))
    return model


def _randomise_b(model: nn.Module, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def decode_4bit(weight) -> torch.Tensor:
    """Independent decode of a (non CPU-packed) Params4bit: ``(out, in)`` in ``quant_state.dtype``."""
    qs = weight.quant_state
    raw = weight.data.view(torch.uint8).reshape(-1)
    idx = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()  # high nibble first
    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax.float()
    table = BF.get_4bit_type(qs.quant_type, device=raw.device)
    n = qs.shape.numel()  # the last block may be partial
    vals = table[idx][:n] * absmax.repeat_interleave(qs.blocksize)[:n]
    return vals.reshape(qs.shape).to(qs.dtype)


def lora_parts(model):
    layer = model.base_model.model.lin
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def expected_noise(flat: FlatLoRA, w_deq: torch.Tensor, a, b, s: float, step: int) -> torch.Tensor:
    """``factor(t)·sigma/sqrt(n)·||W_i + s(BA)_i||·z`` with ``z`` from the keyed generator (float32)."""
    cfg, t = flat.config, flat.targets[0]
    m, n = w_deq.shape
    factor = 1.0 if cfg.schedule == "constant" else 0.5 * (1 - math.cos(math.pi * step / cfg.total_steps))
    eff = w_deq.double() + s * (b.double() @ a.double())
    std = factor * cfg.sigma / math.sqrt(n) * eff.norm(dim=1)
    z = noise_range(cfg.seed, step, t.name, m * n, 0, m * n).view(m, n)
    return (z.double() * std[:, None]).float()


def storage_digest(model: nn.Module) -> str:
    """sha256 over every quantized layer's packed bytes and quant-state tensors (and int8 CB/SCB)."""
    h = hashlib.sha256()

    def add(t):
        if isinstance(t, torch.Tensor):
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    for name, mod in sorted(model.named_modules(), key=lambda x: x[0]):
        w = getattr(mod, "weight", None)
        if type(w).__name__ not in ("Params4bit", "Int8Params") or hasattr(mod, "base_layer"):
            continue  # PEFT's LoRA wrapper exposes its base layer's weight: count each layer once
        h.update(name.encode())
        add(w.data)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for v in (qs.absmax, qs.code, qs.offset):
                add(v)
            if qs.nested:
                add(qs.state2.absmax)
                add(qs.state2.code)
        scb = getattr(w, "SCB", None)  # bnb moves the int8 row scales to layer.state on first forward
        add(scb if scb is not None else getattr(getattr(mod, "state", None), "SCB", None))
    return h.hexdigest()


def nonlinear_loss(y: torch.Tensor) -> torch.Tensor:
    """dL/dy depends on y, so A/B gradients depend on the noisy weight (not only on x)."""
    return (torch.tanh(y.float() * 0.1) ** 2).sum()


# ---------------------------------------------------------------------- 0. dequantization itself
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    ("n_in", "blocksize", "quant_type", "double_quant", "storage", "compute"),
    [
        (512, 64, "nf4", True, torch.uint8, FP32),
        (192, 128, "fp4", True, BF16, BF16),  # in % blocksize != 0: bnb's own 2-D CPU kernel is wrong here
        (320, 256, "nf4", False, FP32, BF16),
    ],
)
def test_dequantized_chunks_equal_independent_decode(
    monkeypatch, n_in, blocksize, quant_type, double_quant, storage, compute
):
    """Chunked dequantization (unaligned chunk requests, nested absmax slices) is bit-exact; with a
    16-bit compute dtype ``dense_weight`` is assembled chunk by chunk and rounded like bnb rounds."""
    model = qlora_layer(n_in, 96, quant_type, double_quant, compute, storage, blocksize=blocksize)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4))
    t, backend = flat.targets[0], flat._backend_of[id(flat.targets[0])]
    ref = decode_4bit(t.weight).to(compute)
    monkeypatch.setattr(bnb_backend, "NORM_CHUNK", 3 * n_in + 7)  # many chunks, unaligned request size
    assert len(list(bnb_backend.row_chunks(t))) > 10
    starts, vals = zip(*backend.norm_chunks(t))
    assert list(starts) == [r0 * n_in for r0, _ in bnb_backend.row_chunks(t)]
    assert torch.equal(torch.cat(vals), ref.float().view(-1))
    dense = backend.dense_weight(t)
    assert dense.dtype == compute and torch.equal(dense, ref)
    assert backend.regions(t) == []


# ---------------------------------------------------------------------- 1. gradients
@pytest.mark.parametrize(
    ("quant_type", "double_quant", "compute_dtype", "storage", "bias"),
    [
        ("nf4", True, torch.float32, torch.uint8, True),
        ("fp4", False, torch.float32, torch.bfloat16, False),
        ("nf4", False, torch.bfloat16, torch.bfloat16, True),
        ("fp4", True, torch.bfloat16, torch.uint8, False),
    ],
)
def test_gradients_equal_dense_layer_with_same_noise(quant_type, double_quant, compute_dtype, storage, bias):
    """LoRA A/B and input gradients equal a dense layer's on the decoded weight plus the same noise:
    rtol 1e-4 / atol 1e-5 in fp32 compute, 2e-2 / 2e-3 in bf16 (bnb and the reference round differently)."""
    model = qlora_layer(512, 128, quant_type, double_quant, compute_dtype, storage, bias=bias)
    step = 3
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4, schedule="cosine", seed=7))
    layer, a, b, s = lora_parts(model)
    x = torch.randn(2, 5, 512, generator=torch.Generator().manual_seed(3))  # (batch, seq, hidden), fp32
    x.requires_grad_(True)
    with flat.perturbed(step):
        y = model(x)
        nonlinear_loss(y).backward()
    assert y.dtype == x.dtype and y.shape == (2, 5, 128)
    got = (a.grad.clone(), b.grad.clone(), x.grad.clone())  # LoRA A, B and the input gradient

    w_deq = decode_4bit(layer.base_layer.weight).to(compute_dtype).float()
    bias_t = layer.base_layer.bias
    e = expected_noise(flat, w_deq, a.detach(), b.detach(), s, step)

    def reference(noise: torch.Tensor | None):
        a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        x2 = x.detach().clone().requires_grad_(True)
        w_eff = (w_deq if noise is None else w_deq + noise).to(compute_dtype)
        base = F.linear(x2.to(compute_dtype), w_eff, None if bias_t is None else bias_t.to(compute_dtype)).to(
            x.dtype
        )
        nonlinear_loss(base + s * (x2 @ a2.t() @ b2.t())).backward()
        return a2.grad, b2.grad, x2.grad

    tol = {"rtol": 1e-4, "atol": 1e-5} if compute_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    want = reference(e)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    clean = reference(None)  # the noise matters: without it the gradients are clearly different
    assert any((g - c).norm() > 20 * (g - w).norm() + 1e-3 * c.norm() for g, w, c in zip(got, want, clean))
    gx, wx, cx = got[2], want[2], clean[2]  # the input gradient goes through W + e itself (backward's rebuild)
    assert (gx - cx).norm() > 5 * (gx - wx).norm(), "input gradient does not show the noise"


# ---------------------------------------------------------------------- 2. noise statistics per row
def test_row_std_of_noise_on_dequantized_weight():
    n_in, n_out, steps, total = 1024, 256, 8, 20
    model = qlora_layer(n_in, n_out, "nf4", True, torch.float32, torch.bfloat16)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=total, schedule="cosine", seed=11))
    layer, a, b, s = lora_parts(model)
    w_deq = decode_4bit(layer.base_layer.weight).float()
    eye = torch.eye(n_in)
    pooled = []
    for step in range(10, 10 + steps):
        with flat.perturbed(step), torch.no_grad():
            noisy = layer.base_layer(eye).t()  # (W + e)ᵀ through the functional forward
        e = noisy - w_deq
        torch.testing.assert_close(e, expected_noise(flat, w_deq, a, b, s, step), rtol=0, atol=2e-6)
        factor = 0.5 * (1 - math.cos(math.pi * step / total))
        pooled.append(e.double() / factor)
    e = torch.cat(pooled, dim=1)  # (256, 8·1024) per-row samples at factor 1
    want = SIGMA / math.sqrt(n_in) * (w_deq.double() + s * (b.double() @ a.double())).norm(dim=1)
    ratio = e.std(dim=1) / want
    assert (ratio - 1).abs().max() < 0.05, f"row std off by {(ratio - 1).abs().max():.3f}"
    assert (e.mean(dim=1).abs() / want).max() < 6 / math.sqrt(e.shape[1])
    spread = want.max() / want.min()
    assert spread > 5  # rows really differ, so a per-layer (not per-row) std would fail the 5% check


# ---------------------------------------------------------------------- 3. storage untouched
def test_quantized_storage_bitwise_unchanged_after_20_steps():
    model = qlora_layer(512, 128, "nf4", True, torch.float32, torch.bfloat16, bias=True)
    before = storage_digest(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=20, schedule="constant"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 8, 512)
    for step in range(20):
        with flat.perturbed(step):
            nonlinear_loss(model(x)).backward()
        opt.step()
        opt.zero_grad()
    assert flat.stats()["mean_row_std"] > 0
    assert storage_digest(model) == before
    assert "_flatlora_saved_forward" not in model.base_model.model.lin.base_layer.__dict__


# ---------------------------------------------------------------------- 4. memory
def test_nothing_weight_sized_saved_and_state_is_o_rows():
    """Threshold: m·n/2 bytes, the packed 4-bit weight itself — the smallest form any weight-derived
    tensor (dequantized W, W+e, noise, a copy of the packed data) can take.  The legitimately saved
    activations here are at most tokens·n·4 = 32 KiB, a quarter of it."""
    n_in, n_out, tokens = 1024, 256, 8
    model = qlora_layer(n_in, n_out, "nf4", True, torch.float32, torch.uint8, bias=True)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4, schedule="constant"))
    limit = n_out * n_in // 2
    x = torch.randn(1, tokens, n_in, requires_grad=True)
    saved: list[tuple[int, tuple]] = []

    def pack(t):
        saved.append((t.numel() * t.element_size(), tuple(t.shape)))
        return t

    with flat.perturbed(1), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert saved, "hooks saw nothing: the check would be vacuous"
    assert max(nb for nb, _ in saved) < limit, f"weight-sized tensor saved for backward: {saved}"
    assert any(shape[-1] == n_in for _, shape in saved)  # the layer input is saved, the weight is not
    with flat.perturbed(1):
        nonlinear_loss(y).backward()  # backward rebuilds W+e from the key (same step)
    st = flat.stats()
    assert st["fixup_bytes"] == 0 and st["state_bytes"] <= 16 * n_out


# ---------------------------------------------------------------------- 8-bit and layouts
def test_int8_base_dequant_and_gradients():
    torch.manual_seed(0)
    dense = nn.Linear(256, 128)
    lin = bnb.nn.Linear8bitLt(256, 128, has_fp16_weights=False, threshold=6.0)
    lin.load_state_dict(dense.state_dict())
    model = get_peft_model(OneQ(lin.to("cpu")), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    _randomise_b(model, 0.3)
    before = storage_digest(model)
    x = torch.randn(2, 5, 256)
    model(x)  # bnb moves CB/SCB from the weight to layer.state on its first forward; both must work
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4, schedule="constant", seed=3))
    t, backend = flat.targets[0], flat._backend_of[id(flat.targets[0])]
    layer, a, b, s = lora_parts(model)
    w_deq = layer.base_layer.weight.data.float() * layer.base_layer.state.SCB[:, None].float() / 127
    torch.testing.assert_close(backend.dense_weight(t), w_deq, rtol=1e-6, atol=0)
    x.requires_grad_(True)
    with flat.perturbed(2):
        nonlinear_loss(model(x)).backward()
    e = expected_noise(flat, w_deq, a.detach(), b.detach(), s, 2)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_(True)
    nonlinear_loss(F.linear(x2, w_deq + e, layer.base_layer.bias) + s * (x2 @ a2.t() @ b2.t())).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert storage_digest(model) == before


def test_cpu_packed_4bit_layout_is_dequantized():
    """After an inference forward on an AVX512-BF16 CPU, bitsandbytes repacks the weight for its gemv
    kernel (tiles of 32 rows, bf16 scales); Flat-LoRA must read that layout too."""
    model = qlora_layer(256, 128, "nf4", True, torch.float32, torch.uint8)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4))
    t, backend = flat.targets[0], flat._backend_of[id(flat.targets[0])]
    w = t.weight
    qs = w.quant_state
    absmax = (BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).bfloat16().float()
    raw = w.data.view(torch.uint8).reshape(-1)
    idx = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()
    ref = (
        (BF.get_4bit_type("nf4", device="cpu")[idx].view(-1, 64) * absmax[:, None]).view(128, 256).bfloat16()
    )
    x = torch.randn(3, 256)
    t.base.eval()
    with torch.no_grad():
        y_bnb = t.base(x)  # packs on AVX512-BF16 CPUs
    if not getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = BF._convert_weight_packed_for_cpu(w.data, w.quant_state)
        y_bnb = None
    assert bnb_backend.storage_kind(t) == "4bit_cpu_packed"
    backend.check([t])  # the start-up check accepts the packed layout too
    assert torch.equal(backend.dense_weight(t), ref.float())
    assert torch.equal(torch.cat([v for _, v in backend.norm_chunks(t)]), ref.float().view(-1))
    if y_bnb is not None:  # bnb's own bf16 kernel agrees to bf16 precision
        torch.testing.assert_close(
            x @ ref.float().t(), y_bnb, rtol=2e-2, atol=2e-2 * y_bnb.abs().max().item()
        )


def test_check_refuses_unsupported_setups():
    model = qlora_layer(256, 64)
    layer = model.base_model.model.lin
    layer.merged_adapters.append("default")  # what merge_adapter() records (the merge itself is bnb's)
    assert layer.merged
    with pytest.raises(ValueError, match="unmerge"):
        FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4))
    layer.merged_adapters.clear()
    with pytest.raises(ValueError, match="cannot take noise in place"):
        FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4, mode="inplace"))
    meta = bnb.nn.Linear4bit(256, 64, device="meta")
    model = get_peft_model(OneQ(meta), LoraConfig(r=4, target_modules=["lin"]))
    with pytest.raises(ValueError, match="meta device"):
        FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4))


# ---------------------------------------------------------------------- 5. a tiny 4-bit Llama
@pytest.mark.slow
def test_tiny_4bit_llama_trains_with_flatlora():
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        model = LlamaForCausalLM.from_pretrained(
            d, quantization_config=quant, dtype=torch.float32, device_map="cpu"
        )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ))
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight).__name__ == "Params4bit"
    before = storage_digest(model)
    steps = 30
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=steps, seed=5))
    assert flat.stats()["backends"] == "bnb" and flat.stats()["layers"] == 14
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for step in range(steps):
        with flat.perturbed(step):  # gradient checkpointing recomputes under the same noise
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert flat.stats()["mean_row_std"] > 0
    with torch.no_grad():
        clean = model(input_ids=ids, labels=ids).loss.item()
        with flat.perturbed(steps - 1):
            noisy = model(input_ids=ids, labels=ids).loss.item()
    assert noisy != clean  # the noise reaches the 4-bit layers
    assert storage_digest(model) == before
