"""The analytic simulator against the discrete-event one, and its feasibility verdicts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from adaptive.cluster import preset_cluster
from adaptive.distributions import LengthDistribution
from adaptive.errors import PlanningError
from adaptive.profile import Profile
from adaptive.schedule import Policy, Schedule
from adaptive.simulator import simulate, simulate_discrete

DES_TOLERANCE = 0.03  # analytic vs discrete-event throughput and decode batch
UNCAPPED = 1 << 20  # a max_batch no RRA batch here reaches


@pytest.mark.parametrize("task", ["S", "T", "C1"])
@pytest.mark.parametrize(("b_e", "n_d", "tp", "tp_workers"), [(16, 8, 1, 0), (48, 13, 2, 4)])
def test_rra_little_matches_discrete_event(
    opt13b: Profile, task: str, b_e: int, n_d: int, tp: int, tp_workers: int
) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task(task)
    schedule = Schedule(
        Policy.RRA,
        b_e,
        decode_iters=n_d,
        max_batch=UNCAPPED,
        tp_degree=tp,
        tp_workers=tp_workers,
        num_workers=4,
    )
    analytic = simulate(opt13b, cluster, dist, schedule)
    des = simulate_discrete(opt13b, cluster, dist, schedule, num_queries=20000, seed=1)
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)
    assert analytic.decode_batch == pytest.approx(des.mean_decode_batch, rel=DES_TOLERANCE)


@pytest.mark.parametrize(("task", "b_e", "n_d", "cap"), [("S", 16, 2, 32), ("C1", 8, 4, 48)])
def test_rra_capped_batch_matches_discrete_event(
    opt13b: Profile, task: str, b_e: int, n_d: int, cap: int
) -> None:
    """Past the engine's max_batch a cycle admits only what left: B_E no longer sets the
    rate, the cap does."""
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task(task)
    capped = Schedule(Policy.RRA, b_e, decode_iters=n_d, max_batch=cap, num_workers=4)
    free = simulate(opt13b, cluster, dist, replace(capped, max_batch=UNCAPPED))
    analytic = simulate(opt13b, cluster, dist, capped)
    des = simulate_discrete(opt13b, cluster, dist, capped, num_queries=20000, seed=1)
    assert free.decode_batch > cap  # the cap binds
    assert analytic.decode_batch == cap
    assert analytic.throughput_req_s < free.throughput_req_s
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)


def test_paper_relation_understates_decode_batch(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("T")
    schedule = Schedule(Policy.RRA, 52, decode_iters=13, max_batch=UNCAPPED, num_workers=4)
    paper = simulate(opt13b, cluster, dist, schedule, batch_relation="paper")
    des = simulate_discrete(opt13b, cluster, dist, schedule, seed=2)
    # The notes: 383 vs 553 for task T, N_D = 13, B_E = 52.
    assert paper.decode_batch == pytest.approx(383, rel=0.02)
    assert des.mean_decode_batch == pytest.approx(553, rel=0.02)


@pytest.mark.parametrize("batch", [4, 64, 256])
def test_continuous_matches_discrete_event(opt13b: Profile, batch: int) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("C1")
    schedule = Schedule(
        Policy.CONTINUOUS, 1, max_batch=batch, tp_degree=4, tp_workers=4, num_workers=4
    )
    analytic = simulate(opt13b, cluster, dist, schedule)
    des = simulate_discrete(opt13b, cluster, dist, schedule, seed=3)
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)


def test_memory_and_bound_feasibility(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("S")
    small = Schedule(Policy.STATIC, 8, tp_degree=4, tp_workers=4, num_workers=4)
    huge = Schedule(Policy.STATIC, 1024, tp_degree=4, tp_workers=4, num_workers=4)
    ok = simulate(opt13b, cluster, dist, small, slo_s=100.0)
    assert ok.is_feasible
    assert not simulate(opt13b, cluster, dist, huge).fits_memory
    assert not simulate(opt13b, cluster, dist, small, slo_s=ok.latency_s / 2).meets_bound
    # FT decodes to the longest output, so its latency is for 80 tokens, not 63.
    rra = simulate(opt13b, cluster, dist, Schedule(Policy.RRA, 8, decode_iters=80, num_workers=4))
    assert (
        rra.latency_s
        < simulate(opt13b, cluster, dist, Schedule(Policy.STATIC, 8, num_workers=4)).latency_s
    )


def test_waa_duplicates_decoder_only_weights(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("S")
    waa = Schedule(Policy.WAA_C, 1, num_workers=4, encode_workers=1)
    rra = Schedule(Policy.RRA, 1, num_workers=4)
    waa_mem = simulate(opt13b, cluster, dist, waa).memory_bytes_per_device
    rra_mem = simulate(opt13b, cluster, dist, rra).memory_bytes_per_device
    assert waa_mem > 2 * rra_mem


def test_schedule_must_match_cluster(opt13b: Profile) -> None:
    with pytest.raises(PlanningError):
        simulate(
            opt13b,
            preset_cluster("a40", 4),
            LengthDistribution.from_task("S"),
            Schedule(Policy.RRA, 4, num_workers=8),
        )


def test_waa_capped_decode_rows_admit_only_what_leaves(opt13b: Profile) -> None:
    """Like RRA's: past the engine's max_batch the decode side holds the cap, each period
    encodes fewer queries, and a token comes back sooner than with the uncapped batch."""
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("C1")
    capped = Schedule(Policy.WAA_C, 16, num_workers=4, encode_workers=1, max_batch=32)
    free = simulate(opt13b, cluster, dist, replace(capped, max_batch=UNCAPPED))
    analytic = simulate(opt13b, cluster, dist, capped)
    assert free.decode_batch > 32  # the cap binds
    assert analytic.decode_batch == pytest.approx(32)
    assert analytic.throughput_req_s < free.throughput_req_s
    assert analytic.latency_s < free.latency_s
