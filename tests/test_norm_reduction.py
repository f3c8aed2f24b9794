"""The row-norm reduction across real processes, fast: FSDP2 on 4 gloo ranks as 2 replicas x 2 row shards.

Each shard rank holds part of every weight, so its own sums of squares are partial: the all-reduce must
happen (else the norms are a shard's) and must run over the 2-rank shard group, not the world (else every
element is counted once per replica and the norms come out sqrt(2) too large).  The row std and the
perturbed rows are compared with a single-process engine on the same weights.  The ranks are forked
from the test process (no imports to redo): a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from launcher import fork_launch  # noqa: E402
from norm_worker import run_rank  # noqa: E402


def test_row_norms_are_reduced_once_over_the_shard_group():
    res = fork_launch(run_rank, 4, {"replicas": 2})
    for r in res:
        assert r["reduce_group_size"] == 2
        assert r["perturb_allreduces"] == 1 and r["norm_allreduces"] == 1 and r["restore_allreduces"] == 0
        assert r["std_max_rel"] < 1e-5, f"row std differs from one process by {r['std_max_rel']:.2e}"
        assert r["local_max_abs_diff"] < 1e-6
        assert r["restored_bitwise"]
    # shard ranks 0 and 1 split every weight between them; replicas 2 and 3 hold the same rows
    assert res[0]["local_elements"] + res[1]["local_elements"] == res[0]["total_elements"]
    assert res[0]["starts"] == res[2]["starts"] and res[1]["starts"] == res[3]["starts"]
    assert res[0]["starts"] != res[1]["starts"]
