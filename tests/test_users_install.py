"""Issue 25, the installed command: what a ``pip install`` user (no checkout) and a ``make install`` user get.

Each row runs the real thing in a subprocess.  The package is built as users get it: an sdist of the
package's sources, a wheel built from that sdist (``pip wheel --no-deps --no-build-isolation``), installed
into a throwaway venv (``python -m venv --without-pip``; ``pip --python`` installs the wheel before the venv
is given this interpreter's site-packages for the dependencies, so it never sees this checkout's editable
install).  Commands run with no ``PYTHONPATH`` and from a folder outside the checkout.

| row | asserts |
|---|---|
| wheel contents | the wheel (built from the sdist) holds ``flatlora_dist/ds_configs/*.json`` byte-equal to the checkout's ``ds_configs/`` (one copy: a link), the Apache-2.0 LICENSE and the ``flatlora-train`` entry point |
| ``flatlora-train --help`` from the venv's ``bin/`` | exit 0, usage names ``flatlora-train``, the package runs from the venv, not the checkout |
| ``python -m flatlora_dist.train --help`` | exit 0, usage names ``python -m flatlora_dist.train`` |
| ``launch/train.py --help`` | the checkout's front door still works and names itself |
| shipped names | ``zero2``, ``zero3.json``, ``zero3_offload`` resolve to the installed package's files |
| ``flatlora-train --ds_config zero3`` | a 1-rank DeepSpeed run of ``--model tiny`` from an empty folder: exit 0, backend deepspeed |
| ``--ds_config zero4`` | exit 2, one ``error:`` line listing the shipped names, output folder absent |
| ``--ds_config ds_configs/zero3.json`` in the checkout | the relative path still read (stage 3: ``--load_in_4bit`` refused) |
| aliases | ``--lr 1e-4 --epochs 2 --batch_size 1`` drive a real run (HF's trainer state: 4 steps of batch 1, lr 1e-4) |
| misspelt aliases | ``--lrr``/``--epoch``/``--batchsize``: one error line suggesting the HF name |
| ``make -n install`` | torch installed without the lock's Triton; the lock's Triton kept only when the installed torch pins none (checked against a CUDA-like and a CPU-like torch metadata); ``TORCH_INDEX_URL`` reaches the torch install |
| ``.gitignore`` | build outputs (``build/``, ``dist/``, ``*.egg-info``, wheels) are ignored |
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a venv, runs the app in subprocesses

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
SHIPPED = ("zero2", "zero3", "zero3_offload")
QUICK = ["--model", "tiny", "--max_steps", "2", "--report_to", "none", "--eval_generate_limit", "0",
         "--eval_limit", "4", "--train_limit", "8"]  # fmt: skip
sys.path.insert(0, str(REPO / "tests" / "dist"))
from ds_common import extensions_dir, free_port  # noqa: E402


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p


def _user_env(**extra: str) -> dict[str, str]:
    """A user's shell: no PYTHONPATH (nothing of this checkout), one thread."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist of the package's sources, a wheel built from it, and a venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "flatlora_dist", src / "flatlora_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))  # fmt: skip
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = tmp / "sdist" / _ok(_run([sys.executable, "-c", code, tmp / "sdist"], src)).stdout.strip().splitlines()[-1]
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", tmp / "wheels", sdist], tmp))  # fmt: skip
    (wheel,) = (tmp / "wheels").glob("flatlora_dist-*.whl")
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], tmp))
    py = venv / "bin" / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], tmp))
    # The dependencies (torch, transformers, deepspeed, ...) from this interpreter's environment, as plain
    # path lines (so its .pth files, the checkout's editable install among them, are not processed).
    site = Path(_ok(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)).stdout.strip())
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "py": py, "bin": venv / "bin" / "flatlora-train"}


def _ds_env() -> dict[str, str]:
    """One DeepSpeed rank without a launcher (gloo on loopback), CPU accelerator, the suite's op cache."""
    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}  # fmt: skip
    return _user_env(**rank, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", TORCH_EXTENSIONS_DIR=extensions_dir(),
                     PYTHONWARNINGS="ignore::FutureWarning")  # fmt: skip


def _commands(b: dict[str, Path]) -> dict[str, tuple[list, Path, dict]]:
    """name -> (command, working folder, environment) of every subprocess row."""
    tmp, user = b["tmp"], _user_env()
    checkout = dict(user, PYTHONPATH=str(REPO))
    resolve = ("import json, flatlora_dist; from flatlora_dist.train.preflight import resolve_ds_config; "
               "print(json.dumps({'package': flatlora_dist.__file__, "
               "'files': {n: str(resolve_ds_config(n)) for n in ('zero2', 'zero3.json', 'zero3_offload')}}))")  # fmt: skip
    aliases = ["--model", "tiny", "--report_to", "none", "--eval_generate_limit", "0", "--eval_limit", "4",
               "--train_limit", "2", "--max_steps", "0", "--lr", "1e-4", "--epochs", "2", "--batch_size", "1",
               "--lr_scheduler_type", "constant", "--save_steps", "4"]  # fmt: skip
    runs = {
        "help": ([b["bin"], "--help"], tmp, user),
        "module help": ([b["py"], "-m", "flatlora_dist.train", "--help"], tmp, user),
        "launch help": ([sys.executable, TRAIN, "--help"], tmp, checkout),
        "resolve": ([b["py"], "-c", resolve], tmp, user),
        "zero4": ([b["bin"], *QUICK, "--ds_config", "zero4", "--output_dir", tmp / "zero4_out"], tmp, user),
        "checkout path": ([sys.executable, TRAIN, *QUICK, "--ds_config", "ds_configs/zero3.json", "--load_in_4bit",
                           "--output_dir", tmp / "path_out"], REPO, checkout),  # fmt: skip
        "zero3 run": ([b["bin"], *QUICK, "--ds_config", "zero3", "--output_dir", "zero3_out"], tmp, _ds_env()),
        "aliases": ([sys.executable, TRAIN, *aliases, "--output_dir", tmp / "alias_out"], tmp, checkout),
    }
    for typo in ("lrr", "epoch", "batchsize"):
        runs[f"typo {typo}"] = ([sys.executable, TRAIN, f"--{typo}", "1", "--output_dir", tmp / "typo_out"], tmp, checkout)
    return runs


@pytest.fixture(scope="module")
def results(built) -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess row, two at a time (the CI machine has 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, cmd, cwd, env) for name, (cmd, cwd, env) in _commands(built).items()}
        return {name: f.result() for name, f in futures.items()}


def _one_error(p: subprocess.CompletedProcess) -> str:
    both = p.stdout + p.stderr
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in both, both[-3000:]
    return errors[0]


def test_wheel_from_the_sdist_ships_configs_license_and_command(built):
    assert (REPO / "ds_configs").is_symlink(), "ds_configs/ must link to the package's copy (one copy of each JSON)"
    with zipfile.ZipFile(built["wheel"]) as z:
        names = z.namelist()
        for name in SHIPPED:
            assert z.read(f"flatlora_dist/ds_configs/{name}.json") == (REPO / "ds_configs" / f"{name}.json").read_bytes()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = z.read(license_name).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "flatlora-train = flatlora_dist.train.__main__:cli" in z.read(entry_points).decode()
    assert license_text == (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a stub
    assert re.search(r'^license = \{ text = "Apache-2.0" \}', (REPO / "pyproject.toml").read_text(), re.M)


def test_flatlora_train_help_from_the_venv_bin(built, results):
    p = _ok(results["help"])
    assert p.stdout.startswith("usage: flatlora-train [--config FILE.yaml]"), p.stdout[:300]
    assert "--ds_config" in p.stdout and "zero3_offload" in p.stdout
    assert built["bin"].read_text().startswith(f"#!{built['py']}"), "the console script must run the venv's python"


def test_python_m_flatlora_dist_train_help(results):
    p = _ok(results["module help"])
    assert p.stdout.startswith("usage: python -m flatlora_dist.train [--config FILE.yaml]"), p.stdout[:300]


def test_launch_train_py_stays_the_front_door(results):
    p = _ok(results["launch help"])
    assert p.stdout.startswith(f"usage: {TRAIN} [--config FILE.yaml]"), p.stdout[:300]


def test_shipped_names_resolve_to_the_installed_package(built, results):
    found = json.loads(_ok(results["resolve"]).stdout.strip().splitlines()[-1])
    installed = Path(found["package"]).parent
    assert installed.is_relative_to(built["venv"]), f"imported {installed}, not the installed wheel"
    for name, path in found["files"].items():
        stem = name.removesuffix(".json")
        assert Path(path) == installed / "ds_configs" / f"{stem}.json"
        assert Path(path).read_bytes() == (REPO / "ds_configs" / f"{stem}.json").read_bytes()


def test_installed_command_trains_with_a_shipped_zero3_by_name(built, results):
    p = _ok(results["zero3 run"])
    out = built["tmp"] / "zero3_out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "deepspeed" and summary["steps"] == 2, summary
    assert json.loads((out / "run_config.json").read_text())["ds_config"] == "zero3"
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), p.stdout[-2000:]


def test_unknown_ds_config_name_is_one_error_line(built, results):
    line = _one_error(results["zero4"])
    assert "--ds_config 'zero4'" in line and "zero2, zero3, zero3_offload" in line, line
    assert not (built["tmp"] / "zero4_out").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="the stage check needs --load_in_4bit")
def test_checkout_relative_ds_config_path_still_read(results):
    assert "--load_in_4bit with ZeRO-3 or FSDP" in _one_error(results["checkout path"])


def test_aliases_drive_a_real_run(built, results):
    _ok(results["aliases"])
    out = built["tmp"] / "alias_out"
    config = json.loads((out / "run_config.json").read_text())
    assert (config["learning_rate"], config["num_train_epochs"], config["per_device_train_batch_size"]) == (1e-4, 2, 1)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["global_step"], state["train_batch_size"], state["num_train_epochs"]) == (4, 1, 2)
    rates = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert rates and all(r == pytest.approx(1e-4) for r in rates), rates


@pytest.mark.parametrize("typo,name", [("lrr", "learning_rate"), ("epoch", "num_train_epochs"),
                                       ("batchsize", "per_device_train_batch_size")])  # fmt: skip
def test_misspelt_alias_suggests_the_hf_name(built, results, typo, name):
    line = _one_error(results[f"typo {typo}"])
    assert f"unknown key '{typo}'; did you mean '{name}'?" in line, line
    assert not (built["tmp"] / "typo_out").exists()


def _make_dry_run(tmp: Path, *extra: str) -> list[str]:
    p = _ok(_run(["make", "-n", "-B", "install", f"VENV={tmp}/v", *extra], REPO))
    return p.stdout.splitlines()


def _pins_triton(check: str, requires: list[str], tmp: Path) -> bool:
    """Run the Makefile's check against a torch whose metadata lists ``requires`` (a dist-info ahead of the
    real torch on the path)."""
    site = tmp / f"fake{abs(hash(tuple(requires)))}"
    info = site / "torch-2.13.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: torch", "Version: 2.13.0", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    p = _run([sys.executable, "-c", check], tmp, _user_env(PYTHONPATH=str(site)))
    assert p.returncode in (0, 1), p.stderr
    return p.returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_never_pins_a_triton_against_the_installed_torch(tmp_path):
    lines = _make_dry_run(tmp_path)
    torch_at = next(i for i, line in enumerate(lines) if re.search(r"pip install .*-c \S+/lock\.txt torch$", line))
    drop = next(i for i, line in enumerate(lines) if line.startswith("grep -v '^triton==' requirements/newest.txt"))
    decide = next(i for i, line in enumerate(lines) if "cp requirements/newest.txt" in line)
    assert drop < torch_at < decide, "torch must be installed from the lock without its Triton, then the decision"
    assert "--extra-index-url" not in lines[torch_at]
    check = re.search(r"-c '([^']+)'", lines[decide]).group(1)
    linux = sys.platform == "linux"
    cuda = ['triton==3.7.1; platform_system == "Linux" and platform_machine == "x86_64"', "filelock",
            'opt-einsum>=3.3; extra == "opt-einsum"']  # fmt: skip
    assert _pins_triton(check, cuda, tmp_path) is (linux and os.uname().machine == "x86_64")
    assert _pins_triton(check, ["filelock", "sympy>=1.13.3"], tmp_path) is False  # the CPU build
    cpu = "https://download.pytorch.org/whl/cpu"
    lines = _make_dry_run(tmp_path, f"TORCH_INDEX_URL={cpu}")
    assert any(f"--extra-index-url {cpu} " in line and line.endswith(" torch") for line in lines), lines


def test_gitignore_covers_build_outputs(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["build/lib/x.py", "dist/flatlora_dist-0.1.0.tar.gz", "flatlora_dist.egg-info/PKG-INFO",
             "wheels/flatlora_dist-0.1.0-py3-none-any.whl", "flatlora_dist-0.1.0-py3-none-any.whl"]  # fmt: skip
    p = _run(["git", "check-ignore", "--no-index", *paths], REPO)
    assert sorted(p.stdout.split()) == sorted(paths), p.stdout + p.stderr
