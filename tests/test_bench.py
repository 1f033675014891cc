"""bench.py's code runs and reports the rows it claims (tiny shapes: its numbers here say nothing about speed)."""
import pytest
import torch

import bench
import kernels
import rlcs


@pytest.mark.skipif(torch.cuda.is_available() and not kernels.INTERPRETED, reason="with a GPU, bench.py --gpu runs")
def test_kernel_rows_on_tiny_shapes():
    """Through the interpreter on a CPU: every kernel row is there, with its numbers behind the display strings."""
    rows = bench.kernel_rows("cpu", small=True)
    names = " | ".join(row["name"] for row in rows)
    for wanted in ("attention causal GQA fwd", "attention causal GQA bwd", "vs per-image loop", "vs dense block mask",
                   "M-RoPE q+k fwd+bwd", "RMSNorm fwd ", "RMSNorm fwd+bwd"):
        assert wanted in names, names
    for row in rows:
        assert {"name", "ours", "peer", "ratio", "units"} <= set(row)
        assert row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert row["speedup"] == pytest.approx(row["peer_ms"] / row["ours_ms"])


def test_reward_rows_cover_every_domain():
    rows = bench.reward_rows(n=64)
    assert [r["name"] for r in rows] == [f"rewards.score[{t}]" for t in rlcs.default_tasks()]
    assert all(r["ours"] > 0 and r["units"] == "scores/s" for r in rows)
    assert rows[0]["peer"] > 0 and rows[0]["ratio"] > 0


def test_timer_and_row_format():
    calls = []
    seconds = bench.timed(lambda: calls.append(1), "cpu", repeats=3)
    assert len(calls) == 4 and seconds >= 0  # one warm-up call, then the median of three
    assert bench.row("x", 2.0, 1.0, 2.0, "s", extra=1) == dict(name="x", ours=2.0, peer=1.0, ratio=2.0, units="s",
                                                               extra=1)
