"""Users' own data as they have it (issue 25), through ``launch/train.py`` in subprocesses.

Each row is one thing a user tries with ``--model tiny``; the data files are built here (pandas writes
the parquet and CSV files, ``datasets`` the ``save_to_disk`` folder and the cache of a Hub dataset).
Runs that train go 2 steps and must exit 0 with an adapter and a summary counting the train/held-out
examples expected; refusals must exit 2 with one ``error:`` line, no traceback, and no output folder.
The runs go two at a time (the CI machine has 2 cores) from one module fixture; ``HF_HOME`` is the
test's own and the Hub is offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # launch/train.py subprocesses: the full suite, not the fast tier

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
QUICK = ["--model", "tiny", "--max_steps", "2", "--report_to", "none", "--eval_generate_limit", "0",
         "--eval_limit", "4", "--train_limit", "8"]  # fmt: skip

ALPACA = [{"instruction": f"Add {i} and {i * 7}.", "input": "" if i % 3 else f"in base {i + 2}",
           "output": f"{i * 8}" + " ok" * (i % 5)} for i in range(12)]  # fmt: skip
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Name a number above {i}."},
                               {"from": "gpt", "value": f"{i + 1}"}],
             **({"system": "Be brief."} if i % 2 else {})} for i in range(10)]  # fmt: skip
CHAT = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(9)]  # fmt: skip
VAL_SIZE, SEED = 0.25, 42
HUB_ID, HUB_SHA = "testorg/tiny-alpaca", "0123456789abcdef0123456789abcdef01234567"
SNAPSHOT_ID = "testorg/downloaded-alpaca"  # only in the hub cache (hf download), never prepared by datasets


def _write_inputs(tmp: Path) -> None:
    """Every file the rows name: the same twelve alpaca records as a JSON array, parquet and CSV."""
    import datasets
    import pandas as pd

    datasets.disable_progress_bars()
    (tmp / "alpaca.json").write_text(json.dumps(ALPACA, indent=2))
    pd.DataFrame(ALPACA).to_parquet(tmp / "alpaca.parquet")
    pd.DataFrame(ALPACA).to_csv(tmp / "alpaca.csv", index=False)
    (tmp / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT[:7]))
    (tmp / "sharegpt_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT[7:]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT[:6]),
                          "validation": datasets.Dataset.from_list(CHAT[6:])}).save_to_disk(str(tmp / "saved"))  # fmt: skip
    _cache_hub_dataset(tmp / "hf_home", {"train": ALPACA[:8], "validation": ALPACA[9:]})
    _hub_snapshot(tmp / "hf_home", SNAPSHOT_ID, {"train": ALPACA[2:9], "test": ALPACA[:2]})


def _hub_snapshot(hf_home: Path, repo_id: str, splits: dict[str, list[dict]]) -> Path:
    """The hub cache's snapshot of a repo of ``data/<split>.jsonl`` files at commit ``HUB_SHA``, as ``hf
    download <repo_id> --repo-type dataset`` leaves it (``refs/main`` naming the commit); its folder."""
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_SHA
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_SHA)
    for split, records in splits.items():
        (snapshot / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return snapshot


def _cache_hub_dataset(hf_home: Path, splits: dict[str, list[dict]]) -> None:
    """``HF_HOME`` as an online ``load_dataset(HUB_ID)`` leaves it for a repo of ``data/<split>.jsonl``
    files at commit ``HUB_SHA``, built offline: the hub snapshot of the data files (``hub/datasets--
    testorg--tiny-alpaca``: ``refs/main`` and ``snapshots/<sha>/``), and the prepared Arrow cache that
    ``datasets``' own JSON builder writes from them, configured as its Hub module configures it (repo,
    dataset name, config ``default``, the commit as hash): ``datasets/testorg___tiny-alpaca/default/
    0.0.0/<sha>/``.  Offline, ``load_dataset`` reads only the prepared cache (its ``cache`` module); the
    hub snapshot alone is not enough."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    snapshot = _hub_snapshot(hf_home, HUB_ID, splits)
    builder = Json(cache_dir=str(hf_home / "datasets"), dataset_name=HUB_ID.split("/")[1], repo_id=HUB_ID,
                   config_name="default", hash=HUB_SHA)  # fmt: skip
    # the files after the builder's check that data files are hf://datasets/<repo>@<sha>/ URLs: online they
    # are, and the download manager resolves them to the snapshot; here the snapshot paths are given directly
    builder.config.data_files = DataFilesDict.from_patterns({s: [f"data/{s}.jsonl"] for s in splits},
                                                            base_path=str(snapshot))  # fmt: skip
    builder.download_and_prepare()


@dataclass
class Row:
    """``args`` (``{tmp}``: the shared input folder) run into a fresh output folder."""

    name: str
    args: list[str]


ROWS = [
    Row("json array, nothing held out", ["--data", "{tmp}/alpaca.json"]),
    Row("sharegpt jsonl with eval_data", ["--data", "{tmp}/sharegpt.jsonl", "--eval_data", "{tmp}/sharegpt_eval.jsonl"]),
    Row("parquet, val_size", ["--data", "{tmp}/alpaca.parquet", "--val_size", str(VAL_SIZE), "--train_limit", "32"]),
    Row("csv, val_size", ["--data", "{tmp}/alpaca.csv", "--val_size", str(VAL_SIZE), "--train_limit", "32"]),
    Row("save_to_disk DatasetDict", ["--data", "{tmp}/saved"]),
    Row("wrong data_format", ["--data", "{tmp}/sharegpt.jsonl", "--data_format", "alpaca"]),
    Row("hub dataset not cached, offline", ["--data", "someone/not-cached-here"]),
    Row("hub dataset cached, offline", ["--data", HUB_ID]),
    Row("hub dataset downloaded only, offline", ["--data", SNAPSHOT_ID]),
]


def _run(row: Row, tmp: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE")}  # HF_HOME's
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    args = [a.format(tmp=tmp) for a in row.args]
    p = subprocess.run([sys.executable, str(TRAIN), *QUICK, "--output_dir", str(out), *args],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=600)  # fmt: skip
    summary = out / "summary.json"
    return {"code": p.returncode, "log": p.stdout + p.stderr, "out": out,
            "summary": json.loads(summary.read_text()) if summary.is_file() else None}  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("users_data")
    _write_inputs(folder)
    return folder


@pytest.fixture(scope="module")
def results(tmp) -> dict[str, dict]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {r.name: pool.submit(_run, r, tmp, tmp / f"out{i}") for i, r in enumerate(ROWS)}
        return {name: f.result() for name, f in futures.items()}


def trained(r: dict) -> dict:
    """A finished 2-step run: exit 0, a complete adapter, its summary."""
    assert r["code"] == 0, r["log"][-3000:]
    assert (r["out"] / "adapter" / "adapter_model.safetensors").is_file()
    assert r["summary"]["steps"] == 2 and "Traceback" not in r["log"]
    return r["summary"]


def refused(r: dict) -> str:
    """A refusal: exit 2, one ``error:`` line (returned), no traceback, no output folder."""
    errors = [line for line in r["log"].splitlines() if line.startswith("error:")]
    assert r["code"] == 2 and len(errors) == 1, r["log"][-3000:]
    assert "Traceback" not in r["log"] and not r["out"].exists()
    return errors[0]


def test_json_array_trains_and_warns_that_nothing_is_held_out(results):
    r = results["json array, nothing held out"]
    data = trained(r)["data"]
    assert data["train"]["examples"] == 8 and data["heldout"] is None
    assert data["heldout_from"].startswith("none")
    warnings = [line for line in r["log"].splitlines() if line.startswith("warning: no held-out data")]
    assert len(warnings) == 1 and "--val_size" in warnings[0]


def test_sharegpt_jsonl_trains_with_its_eval_data(results):
    r = results["sharegpt jsonl with eval_data"]
    data = trained(r)["data"]
    assert (data["train"]["examples"], data["heldout"]["examples"]) == (7, 3)
    assert "sharegpt_eval.jsonl" in data["heldout_from"] and "warning: no held-out" not in r["log"]
    assert r["summary"]["metrics_after"]["eval_loss"] > 0


def _expected_heldout_tokens(tmp: Path) -> int:
    """Tokens of the records ``datasets`` holds out for ``train_test_split(test_size=VAL_SIZE, seed=SEED)``
    (LLaMA-Factory's --val_size), tokenized as the run does."""
    import datasets

    from flatlora_dist.train.sources import load_task
    from flatlora_dist.train.tiny import build_tiny_tokenizer

    held = datasets.Dataset.from_list(ALPACA).train_test_split(test_size=VAL_SIZE, seed=SEED)["test"]
    assert len(held) == 3
    (tmp / "expected_heldout.json").write_text(json.dumps(held.to_list()))
    return load_task(tmp / "expected_heldout.json", build_tiny_tokenizer(), max_length=256).stats["tokens"]


@pytest.mark.parametrize("row", ["parquet, val_size", "csv, val_size"])
def test_table_files_train_and_val_size_holds_out_what_datasets_would(results, tmp, row):
    data = trained(results[row])["data"]
    assert (data["train"]["examples"], data["heldout"]["examples"]) == (9, 3)
    assert data["heldout_from"] == f"--val_size {VAL_SIZE:g} of {tmp}/alpaca.{row[:row.index(',')]} (seed {SEED})"
    assert data["heldout"]["tokens"] == _expected_heldout_tokens(tmp)


def test_val_size_split_is_the_same_on_two_runs(results):
    a, b = (results[r]["summary"]["data"] for r in ("parquet, val_size", "csv, val_size"))
    assert a["heldout"] == b["heldout"] and a["train"] == b["train"]
    assert results["parquet, val_size"]["summary"]["metrics_before"] == results["csv, val_size"]["summary"]["metrics_before"]


def test_save_to_disk_folder_trains_on_train_and_holds_out_validation(results):
    r = results["save_to_disk DatasetDict"]
    data = trained(r)["data"]
    assert (data["train"]["examples"], data["heldout"]["examples"]) == (6, 3)
    assert data["heldout_from"].startswith("the 'validation' split of")


def test_wrong_data_format_names_the_format_found(results):
    error = refused(results["wrong data_format"])
    assert "--data_format alpaca, but" in error and "looks like sharegpt" in error
    assert "use --data_format sharegpt or auto" in error


def test_uncached_hub_dataset_offline_names_how_to_get_it(results):
    error = refused(results["hub dataset not cached, offline"])
    assert "someone/not-cached-here" in error and "HF_HUB_OFFLINE" in error
    assert "hf download someone/not-cached-here --repo-type dataset" in error
    assert "hf_home/datasets" in error and "hf_home/hub" in error


def test_cached_hub_dataset_offline_trains_on_train_and_holds_out_validation(results):
    r = results["hub dataset cached, offline"]
    data = trained(r)["data"]
    assert (data["train"]["examples"], data["heldout"]["examples"]) == (8, 3)
    assert data["heldout_from"] == f"the 'validation' split of {HUB_ID}"
    assert "warning: no held-out" not in r["log"]


def test_hub_dataset_only_downloaded_offline_trains_from_its_snapshot(results):
    """What ``hf download --repo-type dataset`` leaves (no prepared Arrow cache) is read offline too."""
    data = trained(results["hub dataset downloaded only, offline"])["data"]
    assert (data["train"]["examples"], data["heldout"]["examples"]) == (7, 2)
    assert data["heldout_from"] == f"the 'test' split of {SNAPSHOT_ID}"
