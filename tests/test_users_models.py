"""Users' own models and portable adapters (issue 25), through ``launch/train.py`` in subprocesses.

Rows (each a thing a user tries; every run is offline, ``HF_HUB_OFFLINE=1``, against a Hugging Face cache
this file builds in a fresh ``HF_HOME`` from a tiny random Llama):

* ``--model testorg/tiny-llama``, a Hub ID in the cache: trains 2 steps, exit 0, reads the cache without
  changing it, and the adapter names its base by that ID;
* ``--model testorg/not-downloaded``, a Hub ID missing from the cache: exit 2, one ``error:`` line naming
  the download command (a command the venv really has), no traceback, no output folder;
* the finished run's folder copied elsewhere and the original deleted: a fresh process with nothing of
  this project loads the base by Hub ID, ``PeftModel.from_pretrained(base, copy/"adapter")`` and
  ``AutoTokenizer.from_pretrained(copy/"adapter")``, generates, and the adapter changes the logits; the
  model card names the base ID and the run's sigma;
* README's "Use the trained adapter" block, run as written (only the adapter path and model ID swapped)
  on that copy.

No ``huggingface_hub`` API writes a cache without the network, so :func:`build_hub_cache` writes the
cache's documented layout (blobs, snapshot symlinks, ``refs/main``); ``test_cache_is_what_the_hub_reads``
checks that huggingface_hub's own ``scan_cache_dir`` and ``snapshot_download`` accept it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # launch/train.py subprocesses

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TRAIN = REPO / "launch" / "train.py"
QUICK = ["--max_steps", "2", "--report_to", "none", "--eval_generate_limit", "0", "--eval_limit", "4",
         "--train_limit", "8"]  # fmt: skip
HUB_ID = "testorg/tiny-llama"
MISSING_ID = "testorg/not-downloaded"
SIGMA = "0.07"  # not the default, so the card's value is this run's

LOAD_AND_GENERATE = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter, repo_id = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(adapter)
base = AutoModelForCausalLM.from_pretrained(repo_id)
ids = tok("Add 2 and 3.", return_tensors="pt", return_token_type_ids=False)
with torch.no_grad():
    base_logits = base(**ids).logits
model = PeftModel.from_pretrained(base, adapter).eval()
with torch.no_grad():
    lora_logits = model(**ids).logits
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps({"max_logit_change": float((lora_logits - base_logits).abs().max()),
                  "new_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
                  "lora_modules": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
                  "project_imported": any(m.startswith("flatlora_dist") for m in sys.modules)}))
"""


def readme_adapter_block(adapter: Path, repo_id: str) -> str:
    """README's "Use the trained adapter" code with its adapter path and base model ID replaced."""
    text = README.read_text()
    section = text[text.index("\n## Use the trained adapter\n") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    swaps = {'"outputs/my-run/adapter"': json.dumps(str(adapter)),
             '"HuggingFaceTB/SmolLM2-135M-Instruct"': json.dumps(repo_id)}  # fmt: skip
    for old, new in swaps.items():
        assert block.count(old) == 1, f"README block lost {old}"
        block = block.replace(old, new)
    return block


def build_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Put the files of ``folder`` into ``hf_home``'s hub cache as ``repo_id`` at one commit, in the layout
    ``huggingface_hub`` writes (``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/main}``); returns the snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    repo = hf_home / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def tree_hash(folder: Path) -> str:
    """sha256 over every path below ``folder`` (symlink targets included) and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def offline_env(hf_home: Path) -> dict[str, str]:
    """This environment, offline, with ``hf_home`` as the only Hugging Face cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_OFFLINE")}  # fmt: skip
    return dict(env, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))  # fmt: skip


def train(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    p = subprocess.run([sys.executable, str(TRAIN), *QUICK, *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=600)  # fmt: skip
    return {"code": p.returncode, "out": p.stdout + p.stderr}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The cache, the two runs (side by side), then the finished run moved and loaded elsewhere."""
    from flatlora_dist.train.tiny import build_tiny_llama

    base = tmp_path_factory.mktemp("users_models")
    src = base / "saved_model"
    model, tok = build_tiny_llama(seed=3)
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    hf_home = base / "hf_home"
    snapshot = build_hub_cache(hf_home, HUB_ID, src)
    cache_before = tree_hash(hf_home)
    env = offline_env(hf_home)
    run_dir, missing_dir = base / "runs" / "hub", base / "runs" / "missing"
    with ThreadPoolExecutor(max_workers=2) as pool:
        hub = pool.submit(train, ["--model", HUB_ID, "--sigma", SIGMA, "--learning_rate", "0.01",
                                  "--output_dir", str(run_dir)], env, base)  # fmt: skip
        missing = pool.submit(train, ["--model", MISSING_ID, "--output_dir", str(missing_dir)], env, base)
        hub, missing = hub.result(), missing.result()
    got = {"hf_home": hf_home, "snapshot": snapshot, "env": env, "hub": hub, "missing": missing,
           "missing_dir": missing_dir, "run_dir": run_dir, "cache_changed": tree_hash(hf_home) != cache_before}  # fmt: skip
    if hub["code"] != 0:
        return got
    got["summary"] = json.loads((run_dir / "summary.json").read_text())
    moved = base / "elsewhere" / "my-adapter-run"
    shutil.copytree(run_dir, moved, symlinks=True)
    shutil.rmtree(run_dir)
    loader_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    scripts = {"load": [LOAD_AND_GENERATE, str(moved / "adapter"), HUB_ID],
               "readme": [readme_adapter_block(moved / "adapter", HUB_ID)]}  # fmt: skip

    def python(args: list[str]) -> dict:
        p = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=loader_env,
                           cwd=base / "elsewhere", timeout=300)  # fmt: skip
        return {"code": p.returncode, "out": p.stdout + p.stderr, "stdout": p.stdout}

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(python, args) for name, args in scripts.items()}
        got.update(moved=moved, **{name: f.result() for name, f in done.items()})
    return got


def test_cache_is_what_the_hub_reads(world):
    """The test-built cache is one huggingface_hub recognises: ``scan_cache_dir`` lists the repo with
    every file and no warnings, and ``snapshot_download(local_files_only=True)`` resolves it."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    info = scan_cache_dir(world["hf_home"] / "hub")
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == HUB_ID and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert {f.file_name for f in rev.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    found = snapshot_download(HUB_ID, cache_dir=world["hf_home"] / "hub", local_files_only=True)
    assert Path(found) == world["snapshot"]


def test_hub_id_from_offline_cache_trains(world):
    """``--model org/name`` with ``HF_HUB_OFFLINE=1``: 2 steps from the cached snapshot, exit 0, the
    cache untouched, and the run and its adapter name the base by the Hub ID (not a cache path)."""
    r = world["hub"]
    assert r["code"] == 0, r["out"][-3000:]
    assert "Traceback" not in r["out"]
    summary = world["summary"]
    assert summary["steps"] == 2 and summary["model"] == HUB_ID
    assert not world["cache_changed"], "an offline run must only read the Hugging Face cache"
    config = json.loads((world["moved"] / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID


def test_hub_id_missing_offline_is_one_error_line(world):
    """A Hub ID the cache lacks, offline: exit 2, one ``error:`` line naming the model, HF_HUB_OFFLINE and
    the download command (whose program the venv has), no traceback, no output folder."""
    r = world["missing"]
    errors = [line for line in r["out"].splitlines() if line.startswith("error:")]
    assert r["code"] == 2, r["out"][-3000:]
    assert len(errors) == 1 and "Traceback" not in r["out"], r["out"][-3000:]
    line = errors[0]
    assert MISSING_ID in line and "HF_HUB_OFFLINE" in line
    command = line.split("fetch it with: ")[1].split(" (")[0].split()
    assert command[-2:] == ["download", MISSING_ID], line
    assert (Path(sys.executable).parent / command[0]).is_file(), f"{command[0]} is not in the venv: {line}"
    assert not world["missing_dir"].exists()


def test_adapter_loads_from_a_copy_with_plain_peft(world):
    """The moved adapter folder alone (original deleted), in a process importing nothing of this
    project: base by Hub ID, ``PeftModel.from_pretrained`` and the adapter's own tokenizer; the LoRA
    layers change the logits, generation gives tokens, and no file of the adapter names the old folder."""
    assert world["hub"]["code"] == 0, world["hub"]["out"][-3000:]
    r = world["load"]
    assert r["code"] == 0, r["out"][-3000:]
    got = json.loads(r["stdout"].strip().splitlines()[-1])
    assert got["lora_modules"] > 0 and got["new_tokens"] == 4
    assert got["max_logit_change"] > 1e-4, got
    assert not got["project_imported"]
    adapter = world["moved"] / "adapter"
    assert (adapter / "tokenizer.json").is_file()
    for f in adapter.iterdir():
        if f.suffix in (".json", ".md", ".jinja"):
            assert str(world["run_dir"]) not in f.read_text() and ".cache" not in f.read_text(), f


def test_model_card_names_base_and_settings(world):
    """``adapter/README.md`` is a model card huggingface_hub parses: base model ID, library peft, and the
    run's sigma, LoRA rank and final metrics in its body."""
    from huggingface_hub import ModelCard

    assert world["hub"]["code"] == 0, world["hub"]["out"][-3000:]
    card = ModelCard.load(world["moved"] / "adapter" / "README.md")
    assert card.data.base_model == HUB_ID and card.data.library_name == "peft"
    assert f"| Flat-LoRA sigma | {float(SIGMA)} |" in card.text
    assert "| LoRA r | 8 |" in card.text
    loss_after = world["summary"]["metrics_after"]["eval_loss"]
    assert f"{loss_after:.4g}" in card.text


def test_readme_adapter_block_runs_as_written(world):
    """README's "Use the trained adapter" block, on the moved adapter with the test's base ID: exit 0."""
    assert world["hub"]["code"] == 0, world["hub"]["out"][-3000:]
    r = world["readme"]
    assert r["code"] == 0 and "Traceback" not in r["out"], r["out"][-3000:]
