"""``make mutants``: plant each bug of ``tests/mutants/mutants.py`` in a temporary copy of the project and
run the fast test tier (``-m "not slow"``) against it; every mutant must make a test fail.

First the unmutated copy must pass (baseline).  Then, for each mutant (``--jobs`` at a time): copy, apply
its exact replacements (each ``old`` text must occur exactly once, else the mutant is NOT APPLICABLE),
run ``pytest -x`` on the copy, record the first failing test.  Prints a table (mutant, caught by, seconds)
and exits 0 only when the baseline passed and every mutant was caught.

The fast tier runs in a fixed file order, the core's tests first (a caught mutant stops at its first
failure); the selection is the same as ``make test-fast``, with Hypothesis seeded (``PYTEST_ARGS``).

    python tests/mutants/run.py [--jobs 2] [--only name,name] [--list] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutants import MUTANTS, Mutant  # noqa: E402

COPIED = ("flatlora_dist", "tests", "launch", "bench", "studies", "ds_configs", "requirements", "pyproject.toml", "README.md")
FIRST = ("test_noise.py", "test_layout.py", "test_sharded_regions.py", "test_inplace.py", "test_native_roundtrip.py", "test_native_norms.py",
         "test_noise_stats.py", "test_engine.py", "test_norm_reduction.py", "test_app_guards.py", "test_qlora.py")  # fmt: skip
"""Test files run first, in this order (the core's); the rest of ``tests/test_*.py`` follow by name."""
TIMEOUT_S = 900
PYTEST_ARGS = ("-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow", "--hypothesis-seed=0")
"""The fast tier's selection; Hypothesis tests with a fixed seed, so that baseline and mutants see the same
examples (a random example failing would abort the baseline or count as catching a mutant by chance)."""


@dataclass
class Outcome:
    name: str
    status: str  # caught | SURVIVED | NOT APPLICABLE | TIMEOUT | passed (baseline)
    caught_by: str
    seconds: float
    log: str = ""


def test_files(tests: Path) -> list[str]:
    names = sorted(p.name for p in tests.glob("test_*.py"))
    ordered = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    return [f"tests/{n}" for n in ordered]


def make_copy(prefix: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f"flatlora_mutant_{prefix}_"))
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc", "results")  # bench/results: data only
    for item in COPIED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        else:
            shutil.copy2(src, dest / item)
    return dest


def apply(mutant: Mutant, copy: Path) -> str | None:
    """Apply every edit; ``None`` on success, else why the mutant does not apply (nothing is written then)."""
    texts: dict[str, str] = {}
    for file, old, new in mutant.edits:
        text = texts.get(file)
        if text is None:
            path = copy / file
            if not path.is_file():
                return f"{file} does not exist"
            text = path.read_text()
        n = text.count(old)
        if n != 1:
            return f"{file}: text to replace found {n} times (must be exactly once): {old[:60]!r}"
        texts[file] = text.replace(old, new)
    for file, text in texts.items():
        (copy / file).write_text(text)
    return None


def pytest_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)  # the copy's package, never the checkout's (nor an editable install)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` test id in pytest's short summary, or a short reason."""
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (.+?)(?: - |$)", line)
        if m:
            return m.group(2)
    tail = [ln for ln in output.strip().splitlines() if ln.strip()]
    return "pytest failed: " + (tail[-1][:100] if tail else "no output")


def run_tier(copy: Path, extra: tuple[str, ...] = ("-x",)) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *extra, *test_files(copy / "tests")]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, time.monotonic() - t0
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def check_imports_copy(copy: Path) -> None:
    p = subprocess.run([sys.executable, "-c", "import flatlora_dist; print(flatlora_dist.__file__)"],
                       cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=120)  # fmt: skip
    where = Path(p.stdout.strip())
    if copy.resolve() not in where.resolve().parents:
        raise SystemExit(f"error: the copy imports flatlora_dist from {where}, not from {copy}")


def baseline(keep: bool) -> Outcome:
    copy = make_copy("baseline")
    try:
        check_imports_copy(copy)
        rc, out, secs = run_tier(copy, ())
        status = "passed" if rc == 0 else "FAILED"
        return Outcome("(baseline, unmutated)", status, "" if rc == 0 else first_failure(out), secs, out)
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def run_mutant(mutant: Mutant, keep: bool) -> Outcome:
    copy = make_copy(mutant.name)
    try:
        why = apply(mutant, copy)
        if why is not None:
            return Outcome(mutant.name, "NOT APPLICABLE", why, 0.0)
        rc, out, secs = run_tier(copy)
        if rc == -1:
            return Outcome(mutant.name, "TIMEOUT", f"no result within {TIMEOUT_S} s", secs, out)
        if rc == 0:
            return Outcome(mutant.name, "SURVIVED", "nothing: every fast test passed", secs, out)
        return Outcome(mutant.name, "caught", first_failure(out), secs, out)
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def table(rows: list[Outcome]) -> str:
    w1 = max(len(r.name) for r in rows)
    w2 = max(len(r.caught_by) for r in rows)
    lines = [f"| {'mutant':<{w1}} | {'status':<14} | {'caught by':<{w2}} | {'seconds':>7} |",
             f"|{'-' * (w1 + 2)}|{'-' * 16}|{'-' * (w2 + 2)}|{'-' * 9}|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.name:<{w1}} | {r.status:<14} | {r.caught_by:<{w2}} | {r.seconds:>7.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at the same time (default 2)")
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (paths printed)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (quicker re-checks)")
    args = ap.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = sorted(names - {m.name for m in MUTANTS})
        if unknown:
            print(f"error: unknown mutant(s) {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug}")
        return 0
    t0 = time.monotonic()
    rows: list[Outcome] = []
    if not args.no_baseline:
        base = baseline(args.keep)
        rows.append(base)
        print(f"baseline: {base.status} in {base.seconds:.1f} s", flush=True)
        if base.status != "passed":
            print(base.log[-4000:])
            print(table(rows))
            return 1
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for out in pool.map(lambda m: run_mutant(m, args.keep), chosen):
            print(f"{out.name}: {out.status} ({out.caught_by}) {out.seconds:.1f} s", flush=True)
            rows.append(out)
    print()
    print(table(rows))
    bad = [r for r in rows if r.status not in ("caught", "passed")]
    print(f"\n{len(chosen) - len(bad)}/{len(chosen)} mutants caught; wall {time.monotonic() - t0:.0f} s")
    for r in bad:
        print(f"  {r.name}: {r.status} - {r.caught_by}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
