"""flatlora_dist.train.data and the built-in tasks: formats, label masks, packing, errors, splits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flatlora_dist.train.data import (
    IGNORE_INDEX,
    DataError,
    PadCollator,
    encode_example,
    encode_prompt,
)
from flatlora_dist.train.sources import load_task
from flatlora_dist.train.tasks import gsm, sentiment
from flatlora_dist.train.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trained_text(tok, feature) -> str:
    return tok.decode([i for i, lab in zip(feature["input_ids"], feature["labels"]) if lab != IGNORE_INDEX])


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi there!"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid."},
        ]
    }
]


# ---------------------------------------------------------------------------------------- formats


def test_alpaca_end_to_end_masks_prompt_exactly(tok, tmp_path):
    data = load_task(write_jsonl(tmp_path / "a.jsonl", ALPACA), tok, max_length=None)
    assert data.kind == "sft" and len(data.dataset) == 2
    for ex, feat in zip(data.examples, data.dataset):
        n_prompt = len(encode_prompt(tok, ex))
        assert feat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]
        assert feat["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(feat["input_ids"][:n_prompt]) == ex.prompt
    assert "### Input:\n2 and 3" in data.examples[0].prompt
    assert "### Input" not in data.examples[1].prompt
    assert trained_text(tok, data.dataset[0]) == "5<|im_end|>"
    assert trained_text(tok, data.dataset[1]) == "Hi there!<|im_end|>"


def test_alpaca_chat_style(tok, tmp_path):
    data = load_task(write_jsonl(tmp_path / "a.jsonl", ALPACA), tok, max_length=None, style="chat")
    assert data.examples[0].prompt.endswith("<|im_start|>assistant\n")
    assert trained_text(tok, data.dataset[0]) == "5<|im_end|>\n"


def test_chat_end_to_end_trains_only_assistant_turns(tok, tmp_path):
    data = load_task(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=None)
    feat = data.dataset[0]
    assert tok.decode(feat["input_ids"]) == tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert trained_text(tok, feat) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    # the generation prompt before each answer is masked, the answer right after it is trained
    ex = data.examples[0]
    assert [trained for _, trained in ex.segments] == [False, True, False, True]
    assert ex.segments[0][0].endswith("<|im_start|>assistant\n")


def test_format_autodetect_and_explicit(tok, tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", CHAT)
    assert load_task(chat, tok, fmt="chat").examples[0].segments[1][0] == "Paris.<|im_end|>\n"
    with pytest.raises(DataError, match=r"c\.jsonl:1: record missing required field\(s\) 'instruction', 'output'"):
        load_task(chat, tok, fmt="alpaca")
    with pytest.raises(DataError, match="unknown format 'openai'"):
        load_task(chat, tok, fmt="openai")


def test_folder_holds_split_files(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    assert len(load_task(tmp_path, tok, split="train").dataset) == 2
    with pytest.raises(DataError, match="no test.jsonl"):
        load_task(tmp_path, tok, split="test")


def test_limit_takes_first_records(tok, tmp_path):
    data = load_task(write_jsonl(tmp_path / "a.jsonl", ALPACA), tok, limit=1)
    assert len(data.examples) == 1 and data.examples[0].response == "5"


def test_sharegpt_converts_to_chat_with_llama_factory_roles(tok, tmp_path):
    """ShareGPT tags map as LLaMA-Factory's defaults do; the result trains exactly like the chat record."""
    msgs = CHAT[0]["messages"]
    names = {"user": "human", "assistant": "gpt"}
    share = {"system": msgs[0]["content"], "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs[1:]]}
    got = load_task(write_jsonl(tmp_path / "s.jsonl", [share]), tok, max_length=None)
    want = load_task(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=None)
    assert got.dataset.features == want.dataset.features
    tool = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "function_call", "value": "calc(2+2)"},
                              {"from": "observation", "value": "4"}, {"from": "gpt", "value": "4."}]}
    ex = load_task(write_jsonl(tmp_path / "t.jsonl", [tool]), tok, max_length=None).examples[0]
    assert [text for text, trained in ex.segments if trained] == ["calc(2+2)<|im_end|>\n", "4.<|im_end|>\n"]
    bad = {"conversations": [{"from": "bot", "value": "hi"}]}
    assert "conversations[0] is from 'bot'; expected one of human" in one_line_error(tok, write_jsonl(tmp_path / "b.jsonl", [bad]))


def test_json_array_and_wrapped_records(tok, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA, indent=2))
    assert [e.response for e in load_task(tmp_path / "a.json", tok).examples] == ["5", "Hi there!"]
    (tmp_path / "b.json").write_text(json.dumps([ALPACA[0], {"instruction": "x"}]))
    assert one_line_error(tok, tmp_path / "b.json").startswith(f"{tmp_path / 'b.json'} record 2: record missing")
    (tmp_path / "w.json").write_text(json.dumps({"rows": ALPACA}))
    assert "holding the records under 'rows'" in one_line_error(tok, tmp_path / "w.json")


def test_csv_cells_are_text(tok, tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "a.csv").write_text('instruction,input,output\nAdd 2 and 3.,,5\n"Say ""hi"".",,hi\n')
    data = load_task(tmp_path / "a.csv", tok)
    assert [e.response for e in data.examples] == ["5", "hi"] and "Say \"hi\"." in data.examples[1].prompt


@pytest.mark.parametrize("n,val_size,seed", [(12, 0.25, 42), (10, 0.1, 0), (7, 3, 5), (100, 0.33, 1)])
def test_val_size_holds_out_what_datasets_train_test_split_does(n, val_size, seed):
    datasets = pytest.importorskip("datasets")
    from flatlora_dist.train.sources import split_heldout

    train, held = split_heldout(n, val_size, seed)
    want = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
        test_size=val_size if val_size < 1 else int(val_size), seed=seed)  # fmt: skip
    assert held == sorted(want["test"]["i"]) and train == sorted(want["train"]["i"])
    with pytest.raises(DataError, match="leaves no record to train on"):
        split_heldout(n, n, seed)


# ------------------------------------------------------------------------------ truncation, packing


def test_truncation_keeps_max_length_and_drops_prompt_only(tok, tmp_path):
    rows = [{"instruction": "x" * 400, "output": "long prompt"}, {"instruction": "Hi", "output": "y" * 500}]
    data = load_task(write_jsonl(tmp_path / "t.jsonl", rows), tok, max_length=200)
    assert data.stats["dropped"] == 1 and len(data.dataset) == 1
    feat = data.dataset[0]
    assert len(feat["input_ids"]) == 200 and feat["labels"][-1] != IGNORE_INDEX
    with pytest.raises(DataError, match=r"empty dataset after filtering \(1 of 1 examples dropped"):
        load_task(write_jsonl(tmp_path / "u.jsonl", rows[:1]), tok, max_length=200)


def test_packing_keeps_labels(tok, tmp_path):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    plain = load_task(path, tok, max_length=None)
    packed = load_task(path, tok, max_length=256, packing=True)
    lengths = packed.dataset.lengths
    assert all(n == 256 for n in lengths[:-1]) and 0 < lengths[-1] <= 256
    flat = lambda ds, key: [t for f in ds for t in f[key]]  # noqa: E731
    assert flat(packed.dataset, "input_ids") == flat(plain.dataset, "input_ids")
    assert flat(packed.dataset, "labels") == flat(plain.dataset, "labels")
    # blocks with nothing to learn (here: 64 tokens of prompt) are left out
    short = load_task(path, tok, max_length=64, packing=True)
    assert all(any(t != IGNORE_INDEX for t in f["labels"][1:]) for f in short.dataset)
    assert sum(short.dataset.lengths) < sum(lengths)


def test_collator_pads_right_with_ignored_labels():
    batch = PadCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert PadCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 8)


# ------------------------------------------------------------------------------------------ errors


def one_line_error(tok, path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_task(path, tok, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tok, tmp_path):
    assert one_line_error(tok, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: file not found"


def test_unknown_task_name(tok):
    assert "not a built-in task" in one_line_error(tok, "maths")


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([ALPACA[0], ALPACA[1], '{"instruction": "x", "output": '], r"m\.jsonl:3: malformed JSON"),
        ([ALPACA[0], {"instruction": "x"}], r"m\.jsonl:2: record missing required field\(s\) 'output' for alpaca"),
        ([ALPACA[0], {"instruction": "x", "output": 5}], r"m\.jsonl:2: field 'output' must be a string, got int"),
        ([ALPACA[0], {"instruction": "x", "output": " "}], r"m\.jsonl:2: field 'output' is empty"),
        ([ALPACA[0], "[1, 2]"], r"m\.jsonl:2: expected a JSON object, got list"),
        ([{"text": "hello"}], r"m\.jsonl:1: unknown format \(keys: 'text'\)"),
        ([{"\n": None}], r"m\.jsonl:1: unknown format \(keys: '\\n'\)"),  # a key holding a newline stays one line
        ([CHAT[0], {"messages": [{"role": "user", "content": "hi"}]}], r"m\.jsonl:2: no assistant message"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], r"m\.jsonl:1: messages\[0\] has role 'bot'"),
        ([{"messages": [{"role": "user"}]}], r"m\.jsonl:1: messages\[0\] missing required field\(s\) 'content'"),
        ([{"messages": "hi"}], r"m\.jsonl:1: field 'messages' must be a list, got str"),
        ([{"messages": []}], r"m\.jsonl:1: field 'messages' is empty"),
    ],
)
def test_bad_records(tok, tmp_path, rows, expected):
    import re

    assert re.search(expected, one_line_error(tok, write_jsonl(tmp_path / "m.jsonl", rows)))


def test_empty_file(tok, tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert one_line_error(tok, path) == f"{path}: empty dataset (no records)"


def test_not_utf8(tok, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"instruction": "\xff", "output": "x"}\n')
    assert "not UTF-8" in one_line_error(tok, path)


# Hostile records: JSON values of every kind, in the shapes of both formats, with wrong types, missing
# and extra keys, odd roles, empty strings, non-ASCII text, and lines that are not JSON at all.
_text = st.text(max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False), _text)
_any = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                    st.dictionaries(_text, kids, max_size=3)), max_leaves=6)  # fmt: skip
_message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["system", "user", "assistant"]), _any),
                                               "content": st.one_of(_text, _any)})  # fmt: skip
_record = st.one_of(
    st.fixed_dictionaries({}, optional={"instruction": st.one_of(_text, _any), "input": st.one_of(_text, _any),
                                        "output": st.one_of(_text, _any), "extra": _any}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(_message, max_size=4), _any)}),
    _any,
)  # fmt: skip
_words = st.text(min_size=1, max_size=30).filter(str.strip)
_turns = st.lists(st.tuples(_words, _words), min_size=1, max_size=2).map(
    lambda ts: [{"role": r, "content": c} for u, a in ts for r, c in (("user", u), ("assistant", a))])
_good = st.one_of(st.fixed_dictionaries({"instruction": _words, "output": _words}, optional={"input": _text}),
                  st.fixed_dictionaries({"messages": _turns}))  # fmt: skip
_line = st.one_of(_good.map(json.dumps), _record.map(json.dumps), st.text(max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.one_of(st.lists(_good.map(json.dumps), min_size=1, max_size=4), st.lists(_line, max_size=4)),
       fmt=st.sampled_from([None, "alpaca", "chat"]))
def test_any_jsonl_loads_or_fails_with_one_line_naming_the_file(tok, tmp_path, lines, fmt):
    """Whatever the file holds, ``load_task`` returns tokenized examples whose labels are the input ids or
    -100, or raises DataError: one line that starts with the file's path; never another exception."""
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        data = load_task(path, tok, fmt=fmt, max_length=64)
    except DataError as e:
        msg = str(e)
        event(msg.removeprefix(f"{path}:").split("'")[0][:40])
        assert "\n" not in msg and msg.startswith(str(path)), msg
        return
    event("loaded")
    assert len(data.dataset) > 0
    for feat in data.dataset:
        ids, labels = feat["input_ids"], feat["labels"]
        assert len(ids) == len(labels) <= 64
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
        assert any(lab != IGNORE_INDEX for lab in labels)


# --------------------------------------------------------------------------------------------- math


def test_math_split_by_template():
    split = gsm.template_split()
    train, test = set(split["train"]), set(split["test"])
    assert not train & test
    assert train | test == set(gsm.usable_templates()) and len(train | test) == 85
    assert len(test) == 17
    for name, allowed in (("train", train), ("validation", train), ("test", test)):
        assert {p.template for p in gsm.math_problems(name, 60)} <= allowed


def test_math_examples_deterministic_and_formatted(tok):
    a = gsm.math_problems("train", 10, seed=1)
    assert a == gsm.math_problems("train", 10, seed=1)
    assert a != gsm.math_problems("train", 10, seed=2)
    assert gsm.math_problems("test", 5, seed=1) == gsm.math_problems("test", 5, seed=2)  # held out: seed-free
    assert gsm.math_problems("test", 3) == gsm.math_problems("test", 8)[:3]
    for p in a:
        assert p.solution.endswith(f"#### {p.answer}") and p.answer.lstrip("-").isdigit()
    data = load_task("math", tok, split="test", limit=4, max_length=2048)
    assert data.kind == "math" and len(data.dataset) == 4
    ex = data.examples[0]
    assert ex.prompt.endswith("<|im_start|>assistant\n") and ex.answer in ex.response
    plain = load_task("math", tok, split="test", limit=1, style="plain").examples[0]
    assert plain.prompt.startswith("Question: ") and plain.prompt.endswith("\nAnswer:")


def test_math_bad_split(tok):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_task("math", tok, split="dev")


# ---------------------------------------------------------------------------------------- sentiment


def test_sentiment_label_rule():
    assert sentiment.label_for(0.2) == "positive"
    assert sentiment.label_for(-0.01) == "negative"
    assert sentiment.label_for(0.0) is None


def fake_sdist(path: Path) -> Path:
    """A vaderSentiment-shaped sdist whose inner tarball holds four tiny ground-truth files."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for i, name in enumerate(sentiment.SOURCES.values()):
            data = f"1\t{1.5 + i}\tGood &amp; fun\r\n2\t-2.0\tBad\r\n3\t0\tMeh\r\n".encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(sentiment.INNER_TARBALL)
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_ensure_vader_data_from_cached_sdist(tmp_path, monkeypatch):
    import hashlib

    sdist = fake_sdist(tmp_path / sentiment.SDIST_NAME)
    monkeypatch.setattr(sentiment, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    folder = sentiment.ensure_vader_data(tmp_path, allow_download=False)
    rows = sentiment.read_ground_truth(folder / sentiment.SOURCES["tweets"], "tweets")
    assert [(r.text, r.label) for r in rows] == [("Good & fun", "positive"), ("Bad", "negative"), ("Meh", None)]
    assert sentiment.ensure_vader_data(tmp_path, allow_download=False) == folder  # reuse


def test_ensure_vader_data_offline_error_and_bad_hash(tmp_path):
    with pytest.raises(DataError, match="downloads are off; run: python -c"):
        sentiment.ensure_vader_data(tmp_path / "none", allow_download=False)
    fake_sdist(tmp_path / sentiment.SDIST_NAME)
    with pytest.raises(DataError, match="does not match the pinned"):
        sentiment.ensure_vader_data(tmp_path, allow_download=False)


@pytest.fixture(scope="module")
def vader_ready():
    try:
        sentiment.ensure_vader_data(allow_download=False)
    except DataError as err:
        pytest.skip(f"VADER data not installed ({err})")


def test_sentiment_real_data_splits(tok, vader_ready):
    test = sentiment.sentiment_rows("test")
    val = sentiment.sentiment_rows("validation")
    train = sentiment.sentiment_rows("train", seed=3)
    assert (len(test), len(val), len(test) + len(val) + len(train)) == (2000, 500, 10568)  # 37 neutral dropped
    ids = lambda rows: {r.id for r in rows}  # noqa: E731
    assert not ids(test) & ids(train) and not ids(val) & ids(train) and not ids(test) & ids(val)
    assert ids(sentiment.sentiment_rows("train", seed=4)) == ids(train)
    assert all(r.label == ("positive" if r.score > 0 else "negative") for r in test)
    assert 0.4 < sum(r.label == "positive" for r in test) / len(test) < 0.6
    for ood, n in (("amazon", 3610), ("tweets", 4196), ("nyt", 4946)):
        assert len(sentiment.sentiment_rows(ood)) == n


def test_sentiment_task_format(tok, vader_ready):
    data = load_task("sentiment", tok, split="tweets", limit=8, max_length=256)
    ex = data.examples[0]
    assert ex.prompt.startswith("Review: ") and ex.prompt.endswith("\nSentiment:")
    assert ex.response == f" {ex.answer}" and ex.choices == {"negative": " negative", "positive": " positive"}
    assert trained_text(tok, data.dataset[0]) == f" {ex.answer}<|im_end|>"
    chat = load_task("sentiment", tok, split="test", limit=2, style="chat").examples[0]
    assert chat.choices["positive"] == "positive" and chat.prompt.endswith("<|im_start|>assistant\n")


def test_encode_example_matches_prompt_tokens(tok):
    from flatlora_dist.train.data import prompt_response_example

    ex = prompt_response_example(tok, "Review: fine\nSentiment:", " positive")
    feat = encode_example(tok, ex)
    n = len(encode_prompt(tok, ex))
    assert feat["input_ids"][:n] == encode_prompt(tok, ex)
    assert tok.decode(feat["input_ids"][n:]) == " positive<|im_end|>"
