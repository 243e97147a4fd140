"""Live length histograms: decay by half-life, means and p99s, clipping, planner hand-off."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.errors import PlanningError
from adaptive.online import LengthSummary, LiveLengths


def test_means_and_p99_match_numpy_without_decay() -> None:
    rng = np.random.default_rng(1)
    ins, outs = rng.integers(1, 300, 2000), rng.integers(1, 100, 2000)
    live = LiveLengths(512, half_life=1e12)  # effectively no decay
    live.observe(ins, outs)
    s = live.summary()
    assert s is not None
    assert s.mean_input == pytest.approx(ins.mean(), rel=1e-6)
    assert s.mean_output == pytest.approx(outs.mean(), rel=1e-6)
    assert s.p99_input == np.percentile(ins, 99, method="inverted_cdf")
    assert s.p99_output == np.percentile(outs, 99, method="inverted_cdf")
    assert s.weight == pytest.approx(2000, rel=1e-6)


def test_old_requests_weigh_half_after_one_half_life() -> None:
    live = LiveLengths(256, half_life=20)
    live.observe([10] * 20, [10] * 20)
    live.observe([100] * 20, [50] * 20)
    s = live.summary()
    assert s is not None
    # the first 20 weigh half of the last 20: means at 1/3 and 2/3 of the way
    assert s.mean_input == pytest.approx(10 + (100 - 10) * 2 / 3, rel=1e-9)
    assert s.mean_output == pytest.approx(10 + (50 - 10) * 2 / 3, rel=1e-9)
    # effective weight converges to half_life / ln 2 ~ 28.9 requests
    live.observe([100] * 2000, [50] * 2000)
    assert live.weight == pytest.approx(1 / (1 - 2 ** (-1 / 20)), rel=1e-6)
    s = live.summary()
    assert s is not None and (s.p99_input, s.p99_output) == (100.0, 50.0)
    assert (s.mean_input, s.mean_output) == pytest.approx((100.0, 50.0), rel=1e-6)


def test_lengths_beyond_the_histogram_are_clipped_and_the_distribution_trimmed() -> None:
    live = LiveLengths(64, half_life=50)
    assert live.summary() is None and live.distribution() is None
    live.observe([5, 1000], [0, 30])
    dist = live.distribution()
    assert dist is not None
    assert dist.max_input == 64 and dist.max_output == 30
    assert dist.output_pmf[1] > 0  # a zero-length output counts as one token


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(PlanningError, match="half_life"):
        LiveLengths(64, half_life=0)
    with pytest.raises(PlanningError, match="pair up"):
        LiveLengths(64, half_life=5).observe([1, 2], [3])


def test_drift_distance_is_the_largest_relative_change() -> None:
    base = LengthSummary(100.0, 200.0, 50.0, 120.0, 10.0)
    assert base.drift_from(base) == 0.0
    assert LengthSummary(110.0, 999.0, 50.0, 180.0, 10.0).drift_from(base) == pytest.approx(0.5)
