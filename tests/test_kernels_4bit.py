"""QLoRA under the fused scheme: one Triton kernel (``flatlora::noisy_4bit``) reads bitsandbytes'
packed 4-bit storage and writes ``round(dequant(W) + e)`` in the layer's compute dtype.

Checked against bitsandbytes itself (its public ``dequantize_4bit``, and its flat-shape call where its
2-D CPU kernel picks the wrong block scale, DESIGN 3.6) and against the two-step path it replaces
(bitsandbytes' dequantize, then the ``noisy`` kernel), bit for bit.  Small layers: the Triton
interpreter runs the kernel on CPU tensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it before triton loads; this keeps the file runnable alone

import pytest  # noqa: E402
import torch  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig, functional  # noqa: E402
from flatlora_dist.kernels import load_ops  # noqa: E402
from flatlora_dist.shards import bnb as bnb_backend  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")
from test_qlora import decode_4bit, nonlinear_loss, qlora_layer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from launches import OpCounter  # noqa: E402


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    monkeypatch.setenv("FLATLORA_KERNELS", "fused")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before the kernels are imported (conftest or the shell)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bnb's CPU kernels are slow at 2 threads on a loaded machine (test_qlora)
    yield
    torch.set_num_threads(before)


def _target(model):
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=4, schedule="constant", seed=5))
    t = flat.targets[0]
    return flat, t, flat._backend_of[id(t)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _dequant(t) -> torch.Tensor:
    """The fused kernel without noise: ``(out, in)`` in the compute dtype."""
    p = bnb_backend.packed_4bit(t)
    return load_ops().noisy_4bit(p, None, t.layout.cols, 0).view(t.layout.rows, t.layout.cols)


def _bnb_flat(weight) -> torch.Tensor:
    """bitsandbytes' dequantize called with a flat shape (right at every width) -> ``(out, in)``."""
    qs = weight.quant_state
    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.view(torch.uint8).reshape(-1), absmax, qs.blocksize, qs.quant_type, (qs.shape.numel(),), qs.dtype
    )
    return flat.view(qs.shape)


# ---------------------------------------------------------------------- dequantization, no noise
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_fused_dequant_equals_bitsandbytes(quant_type, double_quant, weight_dtype, compute_dtype, storage):
    """bitsandbytes' own ``dequantize_4bit`` cast to the compute dtype, bit for bit (blocksize 64)."""
    model = qlora_layer(256, 48, quant_type, double_quant, compute_dtype, storage, weight_dtype=weight_dtype)
    _, t, backend = _target(model)
    assert t.weight.quant_state.dtype == weight_dtype and t.weight.quant_state.nested == double_quant
    got = _dequant(t)
    want = BF.dequantize_4bit(t.weight.data, t.weight.quant_state).to(compute_dtype)
    assert got.dtype == compute_dtype
    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(got), _bits(backend.dense_weight(t)))


@pytest.mark.parametrize(("n_out", "n_in", "blocksize"), [(16, 80, 64), (3, 80, 64), (8, 48, 64), (12, 96, 128)])
def test_fused_dequant_at_widths_off_the_block_size(n_out, n_in, blocksize):
    """Widths that are not a multiple of the block size (bitsandbytes' 2-D CPU call is wrong there) and a
    weight ending in a partial block (3 x 80): equal to bitsandbytes' flat call and an independent decode."""
    model = qlora_layer(n_in, n_out, "nf4", True, torch.bfloat16, torch.uint8, blocksize=blocksize,
                        weight_dtype=torch.float32)
    _, t, _ = _target(model)
    got = _dequant(t)
    assert torch.equal(_bits(got), _bits(_bnb_flat(t.weight).to(torch.bfloat16)))
    assert torch.equal(_bits(got), _bits(decode_4bit(t.weight).to(torch.bfloat16)))


# ---------------------------------------------------------------------- with noise: one op, same values
@pytest.mark.parametrize(
    ("quant_type", "double_quant", "weight_dtype", "compute_dtype", "storage"),
    [
        ("nf4", True, torch.float32, torch.float32, torch.uint8),
        ("nf4", True, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        ("nf4", False, torch.float32, torch.bfloat16, torch.uint8),
        ("fp4", True, torch.bfloat16, torch.float32, torch.uint8),
        ("nf4", True, torch.float16, torch.float16, torch.uint8),
        ("nf4", True, torch.bfloat16, torch.bfloat16, torch.float32),  # any quant_storage: read as bytes
    ],
)
def test_fused_4bit_noisy_weight_is_one_op_equal_to_two_steps(quant_type, double_quant, weight_dtype,
                                                              compute_dtype, storage):
    """``noisy_weight`` on a 4-bit base = one ``flatlora::noisy_4bit`` launch, bit-equal to dequantizing
    with bitsandbytes and then running the ``noisy`` kernel (the path it replaces)."""
    model = qlora_layer(256, 48, quant_type, double_quant, compute_dtype, storage, weight_dtype=weight_dtype)
    flat, t, backend = _target(model)
    flat.perturb(2)
    key = flat._active.keys[id(t)]
    with OpCounter() as c:
        got = functional.noisy_weight(backend, t, key, compute_dtype)
    assert c.launches == 1 and dict(c.ops) == {"flatlora::noisy_4bit": 1}, dict(c.ops)
    two_step = load_ops().noisy(backend.dense_weight(t), key.std, t.layout.cols, key.seed64, 0)
    assert got.dtype == compute_dtype and got.shape == (48, 256)
    assert torch.equal(_bits(got), _bits(two_step))
    assert not torch.equal(got, backend.dense_weight(t))  # the noise is there
    flat.restore()


def test_qlora_layer_call_builds_the_noisy_weight_once_per_pass():
    """A forward + backward through a perturbed 4-bit layer: one fused kernel in each (the backward
    rebuilds W + e), no bitsandbytes dequantize and no separate noise op."""
    model = qlora_layer(256, 48, "nf4", True, torch.bfloat16, torch.uint8)
    flat, _, _ = _target(model)
    x = torch.randn(2, 3, 256, requires_grad=True)
    with flat.perturbed(1), OpCounter() as c:
        nonlinear_loss(model(x)).backward()
    ours = {k: v for k, v in c.ops.items() if k.startswith(("flatlora::", "bitsandbytes::"))}
    assert ours == {"flatlora::noisy_4bit": 2}, ours


def test_formats_without_the_fused_dequant_keep_two_steps():
    """LLM.int8() bases have no 4-bit storage: ``packed_4bit`` is ``None`` and the noisy weight is
    bitsandbytes' dequantize followed by the ``noisy`` kernel."""
    torch.manual_seed(0)
    lin = bnb.nn.Linear8bitLt(128, 32, has_fp16_weights=False, threshold=6.0)
    lin.load_state_dict(torch.nn.Linear(128, 32).state_dict())
    from peft import LoraConfig, get_peft_model
    from test_qlora import OneQ

    model = get_peft_model(OneQ(lin.to("cpu")), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    flat, t, backend = _target(model)
    assert bnb_backend.storage_kind(t) == "int8" and bnb_backend.packed_4bit(t) is None
    flat.perturb(1)
    key = flat._active.keys[id(t)]
    with OpCounter() as c:
        got = functional.noisy_weight(backend, t, key, torch.float32)
    assert c.ops.get("flatlora::noisy") == 1 and "flatlora::noisy_4bit" not in c.ops
    assert torch.equal(got, load_ops().noisy(backend.dense_weight(t), key.std, t.layout.cols, key.seed64, 0))
    flat.restore()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_qlora_counts_do_not_grow_with_size(dtype, monkeypatch):
    """``bench/launches.py --qlora``: a layer call is one launch per target and no host sync; a step
    (perturb + stats() + restore) is the same count at two sizes, one ``noisy_4bit`` (the norms'
    dequantization) and one ``row_sumsq`` per target, one host sync, no bitsandbytes op."""
    from launches import qlora_count

    from flatlora_dist import noise

    monkeypatch.setattr(noise, "CPU_DRAW_THREADS", noise.CPU_DRAW_THREADS)  # qlora_count sets it to 0

    small, large = qlora_count("fused", 128, dtype), qlora_count("fused", 64, dtype)
    for res in (small, large):
        assert res["ops"] == {"flatlora::noisy_4bit": 7}, res["ops"]
        assert (res["launches_per_layer_call"], res["host_syncs_per_layer_call"]) == (7, 0)
        step = res["step_ops"]
        assert step["flatlora::noisy_4bit"] == 7 and step["flatlora::row_sumsq"] == 7, step
        assert not [k for k in step if k.startswith("bitsandbytes::")], step
    assert (small["launches_per_layer"], small["host_syncs_per_layer"]) == (
        large["launches_per_layer"], large["host_syncs_per_layer"])
    assert large["launches_per_layer"] <= 16 * 7 and large["host_syncs_per_layer"] == 1


def test_norm_spans_are_one_kernel_equal_to_the_chunks_and_the_step_count_is_size_free():
    """Under the fused scheme a 4-bit weight's row-norm input is one ``noisy_4bit`` span, bit-equal to
    the chunked bitsandbytes dequantization (3 chunks here), and a step's launches do not depend on how
    many ``NORM_CHUNK``s the weight has."""
    from flatlora_dist.shards.base import NORM_CHUNK

    counts = []
    for n_in, n_out in ((256, 48), (1024, 600)):
        model = qlora_layer(n_in, n_out, "nf4", True, torch.bfloat16, torch.uint8)
        flat, t, backend = _target(model)
        chunks = list(backend.norm_chunks(t))
        spans = backend.norm_spans(t)
        assert len(spans) == 1 and spans[0][0] == 0 and spans[0][1].dtype == torch.bfloat16
        assert torch.equal(spans[0][1].float(), torch.cat([v for _, v in chunks]))
        flat.perturb(0)
        flat.restore()
        with OpCounter() as c:
            flat.perturb(1)
            flat.stats()
            flat.restore()
        counts.append((c.launches, c.syncs, len(chunks)))
    assert counts[1][2] == -(-1024 * 600 // NORM_CHUNK) == 3 and counts[0][2] == 1
    assert counts[0][:2] == counts[1][:2] and counts[0][1] == 1, counts
