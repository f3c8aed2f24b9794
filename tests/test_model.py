"""flatlora_dist.train.model: tiny model, offline loading, clear errors, LoRA, SmolLM2 cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from flatlora_dist.compat import is_checkpointing
from flatlora_dist.train import cache, tiny
from flatlora_dist.train import model as M
from flatlora_dist.train import model_sources as S
from flatlora_dist.train.model import ModelLoadError, apply_lora, load_model
from flatlora_dist.train.tiny import build_tiny_llama


def test_tiny_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, tok = build_tiny_llama(seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = build_tiny_llama(seed=5)
    c, _ = build_tiny_llama(seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    cfg = a.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 128 and a.dtype == torch.float32
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0


def test_tiny_tokenizer_round_trips_and_chats():
    tok = tiny.build_tiny_tokenizer()
    text = "Héllo, wörld! 12 × 3 = 36 🙂\n\tend"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>")["input_ids"] == [tok.convert_tokens_to_ids("<|im_start|>")]
    with pytest.raises(ModelLoadError, match="smaller than the tokenizer"):
        build_tiny_llama(vocab_size=100)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "missing")
    assert one_line(err) == (f"model path '{tmp_path / 'missing'}' does not exist (and is not one of: tiny, "
                             "smollm2-135m, or a Hub model ID such as HuggingFaceTB/SmolLM2-135M-Instruct)")  # fmt: skip
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert "has no config.json" in one_line(err)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no \*\.safetensors weights"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_model("tiny", dtype="float8")


def test_load_model_from_local_folder(tmp_path):
    model, tok = build_tiny_llama(seed=2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path, dtype="bf16", gradient_checkpointing=True)
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "sdpa"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"] and tok2.chat_template == tok.chat_template
    assert is_checkpointing(loaded) and loaded.config.use_cache is False


def test_attention_choice_on_cpu():
    if not torch.cuda.is_available():
        assert M.pick_attn_implementation(None) == "sdpa"
        assert M.pick_attn_implementation("flash_attention_2") == "sdpa"
    assert M.pick_attn_implementation("eager") == "eager"


def test_lora_on_tiny():
    model, tok = load_model("tiny")
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B for 7 projections in 2 layers; lm_head excluded
    only_q = apply_lora(load_model("tiny")[0], r=2, alpha=2, dropout=0.0, target_modules=["q_proj"])
    assert sum(p.requires_grad for p in only_q.parameters()) == 2 * 2


def test_qlora_tiny_forward_backward():
    pytest.importorskip("bitsandbytes")
    model, tok = load_model("tiny", dtype=torch.float32, load_in_4bit=True, gradient_checkpointing=True)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    real = M.importlib.import_module

    def fake(name, *a, **kw):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **kw)

    monkeypatch.setattr(M.importlib, "import_module", fake)
    with pytest.raises(ModelLoadError) as err:
        load_model("tiny", load_in_4bit=True)
    assert "load_in_4bit needs bitsandbytes" in one_line(err)


def test_smollm2_cache_converts_once_under_concurrency(tmp_path, monkeypatch):
    calls = []

    def fake_convert(target: Path) -> None:
        calls.append(target)
        time.sleep(0.3)
        tmp = target.with_name(".tmp-x")
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / S.CONVERTED_MARKER).write_text("ok")
        tmp.rename(target)

    monkeypatch.setattr(S, "_convert_smollm2", fake_convert)
    (tmp_path / S.SMOLLM2_DIR).mkdir()  # a half copy without the marker is replaced
    results = []
    threads = [threading.Thread(target=lambda: results.append(S.smollm2_path(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / S.SMOLLM2_DIR] * 4


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert S.default_model_cache() == tmp_path / "models"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == cache.REPO_ROOT / ".cache"


@pytest.mark.slow
def test_smollm2_real_load_and_generate():
    """Converts SmolLM2-135M-Instruct on first use (~30 s), then reloads it (~1 s)."""
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])
