"""Multi-process launcher shared by ``ds_common`` and ``fsdp_common``.

- ``free_port``, ``worker_env`` (one CPU rank's environment: rendezvous variables, one thread,
  ``PYTHONPATH``) and ``launch`` (``world`` worker processes, the JSON each rank writes): the benches'
  own, from ``bench/benchlib.py``, so benches and tests share one launcher.
- ``fork_launch``: the same with ``world`` processes forked from the caller (no interpreter start-up and
  no imports to redo: a few seconds instead of ~10 per rank on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import free_port, launch, worker_env  # noqa: E402,F401 - re-exported for ds_common and fsdp_common


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
