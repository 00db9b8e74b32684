"""The load generator's statistics (serve/loadgen.py): percentiles and the closed loop's steady window."""

from __future__ import annotations

import pytest

from serve.loadgen import LoadResult, Outcome, percentile


def test_percentile_interpolates_like_numpy():
    import numpy as np

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 0.5, 0.95, 0.99, 1):
        assert percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))
    assert percentile([], 0.5) is None


def test_a_full_closed_loop_counts_throughput_past_the_start():
    # 2 in flight all along; the first two finish together at 10 s (all sent at once), then one every 2 s
    done = [10, 10, 12, 14, 16, 18, 20, 22, 24]
    outcomes = [Outcome(i, 0.0, t, 64) for i, t in enumerate(done)]
    full = LoadResult("x", "closed", None, 2, outcomes, kept_full=True)
    assert full.throughput == pytest.approx(7 / 14)  # completions 3..9 over 10 s -> 24 s
    drained = LoadResult("x", "closed", None, 2, outcomes)  # a burst: what finished over the wall time
    assert drained.throughput == pytest.approx(9 / 24)


def test_failures_count_against_the_objective_share():
    outcomes = [Outcome(0, 0, 1.0, 64), Outcome(1, 0, 5.0, 64), Outcome(2, 0, 0.5, 64, error="APIError: 503")]
    summary = LoadResult("x", "open", 1.0, None, outcomes, objective_s=2.0).summary()
    assert (summary["succeeded"], summary["failed"]) == (2, 1)
    assert summary["met_objective"] == pytest.approx(1 / 3)
    assert summary["errors"] == ["APIError: 503"]
