"""Multi-process launcher shared by ``ds_common`` and ``fsdp_common`` (and, through them, the benches).

- ``free_port``: a free TCP port on loopback for the gloo rendezvous.
- ``worker_env``: the environment of one CPU rank (rendezvous variables, one thread, ``PYTHONPATH``).
- ``launch``: start ``world`` worker processes and collect the JSON each rank writes.
- ``fork_launch``: the same with ``world`` processes forked from the caller (no interpreter start-up and
  no imports to redo: a few seconds instead of ~10 per rank on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, paths: Sequence[Path] = (ROOT,)) -> dict[str, str]:
    """Environment of one CPU rank: gloo rendezvous on loopback, one thread, ``paths`` ahead on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def launch(
    script: str | Path,
    world: int,
    args: dict[str, Any],
    *,
    env: Callable[[int, int, int], dict[str, str]] = worker_env,
    prefix: str = "flatlora_",
    timeout: float = 600,
) -> list[dict[str, Any]]:
    """Run ``script`` as ``world`` ranks; each rank writes ``<out>/rank<r>.json``; return them by rank.

    The script receives ``args`` as one JSON argument and the output folder as the second; ``env(rank,
    world, port)`` gives each rank's environment.  Raises ``RuntimeError`` with the failed ranks, their
    exit codes and every rank's output tail when any rank fails or times out.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=prefix) as out:
        procs, logs = [], []
        for r in range(world):
            log = open(Path(out) / f"log{r}.txt", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            cmd = [sys.executable, str(script), json.dumps(args), out]
            procs.append(subprocess.Popen(cmd, env=env(r, world, port), stdout=log, stderr=subprocess.STDOUT))
        failed = []
        for r, p in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                rc = "timeout"
            if rc != 0:
                failed.append((r, rc))
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {r} ---\n" + log.read()[-6000:])
            log.close()
        if failed:
            raise RuntimeError(f"ranks failed {failed} for {args}:\n" + "\n".join(tails))
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def _forked_rank(fn: Callable[[dict[str, Any], str], None], args: dict[str, Any], out: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    fn(args, out)


def fork_launch(
    fn: Callable[[dict[str, Any], str], None], world: int, args: dict[str, Any], timeout: float = 120
) -> list[dict[str, Any]]:
    """Run ``fn(args, out)`` in ``world`` processes forked from this one, with :func:`worker_env`'s
    rendezvous variables; each rank writes ``<out>/rank<r>.json``; return them by rank.

    The caller must not have started a process group itself.  Raises ``RuntimeError`` naming the failed
    ranks and their exit codes when any rank fails or runs past ``timeout``.
    """
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="flatlora_fork_") as out:
        procs = [ctx.Process(target=_forked_rank, args=(fn, args, out, worker_env(r, world, port))) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait for it in a collective until the deadline
            time.sleep(0.05)
        failed = [(r, p.exitcode if p.exitcode is not None else "killed") for r, p in enumerate(procs) if p.exitcode != 0]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if failed:
            raise RuntimeError(f"forked ranks failed {failed} for {args}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
