"""flatlora_dist.train.scoring: answer extraction, held-out loss, generation, sentiment scoring."""

from __future__ import annotations

import math

import pytest
import torch

from flatlora_dist.train.data import Example, encode_prompt, prompt_response_example
from flatlora_dist.train.model import apply_lora
from flatlora_dist.train.scoring import (
    answers_match,
    continuation_logprobs,
    extract_answer,
    generate,
    heldout_loss,
    left_pad,
    math_accuracy,
    sentiment_accuracy,
    sentiment_suite,
)
from flatlora_dist.train.sources import load_task
from flatlora_dist.train.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(seed=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,200.00 dollars", "1200"),
        ("#### -15", "-15"),
        ("#### $42", "42"),
        ("#### 2.50", "2.5"),
        ("first 12 then 30 so the answer is 45.", "45"),
        ("#### 8\n#### 9", "8"),
        ("no numbers here", None),
        ("####", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match():
    assert answers_match("1200", "1,200") and answers_match("7", "7.0")
    assert not answers_match("7", "8") and not answers_match(None, "8")


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_heldout_loss_matches_manual_and_restores_mode(tiny, tmp_path):
    model, tok = tiny
    rows = ['{"instruction": "Say a word.", "output": "Word."}', '{"instruction": "Count.", "output": "1 2 3 4 5"}']
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    data = load_task(tmp_path / "d.jsonl", tok)
    model.train()
    loss = heldout_loss(model, data.dataset, data.collator, batch_size=2)
    assert model.training
    total, count = 0.0, 0
    for feat in data.dataset:  # unbatched, no padding: the batched result must agree
        ids = torch.tensor([feat["input_ids"]])
        labels = torch.tensor(feat["labels"][1:])
        with torch.no_grad():
            logp = torch.log_softmax(model.eval()(input_ids=ids).logits[0, :-1], -1)
        keep = labels != -100
        total -= logp[keep, labels[keep]].sum().item()
        count += int(keep.sum())
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert 0.5 * math.log(len(tok)) < loss < 2 * math.log(len(tok))  # a random model: about ln(vocab)


def test_generation_is_batch_invariant_and_deterministic(tiny):
    model, tok = tiny
    examples = [prompt_response_example(tok, p, " x", style="chat") for p in ("Hi", "What is 12 times 7?", "ok")]
    batched = generate(model, tok, examples, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [ex], max_new_tokens=6)[0] for ex in examples]
    assert batched == single == generate(model, tok, examples, max_new_tokens=6, batch_size=2)


class ScriptedModel(torch.nn.Module):
    """Generates ``#### <answer>`` for every prompt it has a script for (tests the accuracy plumbing)."""

    def __init__(self, tok, scripts: dict[tuple[int, ...], str]):
        super().__init__()
        self.tok, self.scripts, self.w = tok, scripts, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus=False):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            new = self.tok(self.scripts[tuple(ids[mask.bool()].tolist())], add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def test_math_accuracy_counts_exact_matches(tiny):
    _, tok = tiny
    examples = load_task("math", tok, split="test", limit=4, max_length=4096).examples
    replies = [f"work...\n#### {ex.answer}" for ex in examples[:3]] + ["#### 0.5"]
    scripted = ScriptedModel(tok, {tuple(encode_prompt(tok, ex)): r for ex, r in zip(examples, replies)})
    result = math_accuracy(scripted, tok, examples, max_new_tokens=8, batch_size=3, return_predictions=True)
    assert (result["correct"], result["total"], result["accuracy"]) == (3, 4, 0.75)
    assert result["predictions"][3] == ("#### 0.5", "0.5")


def test_math_accuracy_on_tiny_peft_model():
    model, tok = build_tiny_llama(seed=1)
    peft = apply_lora(model, r=2, alpha=4, dropout=0.1)
    peft.train()
    examples = load_task("math", tok, split="test", limit=2, max_length=4096).examples
    first = math_accuracy(peft, tok, examples, max_new_tokens=4, return_predictions=True)
    assert first["total"] == 2 and 0.0 <= first["accuracy"] <= 1.0 and peft.training
    assert math_accuracy(peft, tok, examples, max_new_tokens=4, return_predictions=True) == first  # dropout off


def test_continuation_logprobs_match_unpadded(tiny):
    model, tok = tiny
    pairs = [(tok("Review: good\nSentiment:")["input_ids"], tok(" positive")["input_ids"]),
             (tok("Bad")["input_ids"], tok(" negative")["input_ids"])]  # fmt: skip
    batched = continuation_logprobs(model, tok, pairs, batch_size=2)
    for (p, c), score in zip(pairs, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
        expected = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert score == pytest.approx(expected, abs=1e-4)
        assert score < 0


def test_sentiment_accuracy_sane(tiny):
    model, tok = tiny
    examples = [
        prompt_response_example(tok, f"Review: {t}\nSentiment:", f" {lab}", answer=lab,
                                choices={"negative": " negative", "positive": " positive"})
        for t, lab in (("great fun", "positive"), ("awful", "negative"), ("fine", "positive"))
    ]  # fmt: skip
    result = sentiment_accuracy(model, tok, examples, batch_size=4)
    assert result["total"] == 3 and result["correct"] in range(4)
    assert result["accuracy"] == pytest.approx(result["correct"] / 3)
    assert 0.0 <= result["positive_rate"] <= 1.0
    assert sentiment_suite(model, tok, {"test": examples, "ood": examples[:1]}).keys() == {"test_accuracy", "ood_accuracy"}
    with pytest.raises(ValueError, match="has no choices"):
        sentiment_accuracy(model, tok, [Example([("a", False), ("b", True)])])
