"""The online controller: drift re-solves once, steady traffic never, SLO changes meet the
new bound, latency breaches and step-time disagreement correct the plan."""

from __future__ import annotations

import time

import numpy as np
import pytest

from adaptive.controller import AdaptiveConfig, Controller, Decision, Trigger
from adaptive.distributions import LengthDistribution
from adaptive.profile import Profile
from adaptive.schedule import Policy
from adaptive.serving import ServingTarget
from adaptive.simulator import simulate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def target(opt13b: Profile) -> ServingTarget:
    return ServingTarget(opt13b, num_slots=64, policy=Policy.RRA)


def make(
    target: ServingTarget, prior: LengthDistribution, slo_s: float | None = None, **config: object
) -> tuple[Controller, Clock]:
    clock = Clock()
    cfg = AdaptiveConfig(**config)  # type: ignore[arg-type]
    return Controller(target, cfg, prior, slo_s, max_len=2048, clock=clock), clock


def settle(controller: Controller) -> list[Decision]:
    decisions: list[Decision] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        decisions += controller.poll()
        if not controller.is_solving:
            break
        time.sleep(0.002)
    return decisions


def finish(controller: Controller, dist: LengthDistribution, n: int, seed: int) -> None:
    ins, outs = dist.sample(n, np.random.default_rng(seed))
    for i, o in zip(ins, outs, strict=True):
        controller.on_finished(int(i), int(o), 0.1, controller.clock())


def test_drift_re_solves_once_and_steady_traffic_never(target: ServingTarget) -> None:
    s_task, g_task = LengthDistribution.from_task("S"), LengthDistribution.from_task("G")
    controller, clock = make(target, s_task)
    startup = controller.current.schedule
    for seed in range(5):  # traffic like the prior: never a re-solve
        finish(controller, s_task, 40, seed)
        clock.now += 2
        assert controller.check() is None
    finish(controller, g_task, 400, seed=9)  # code generation: outputs 6x longer
    clock.now += 2
    assert controller.check() is Trigger.DRIFT
    (decision,) = settle(controller)
    assert decision.reason is Trigger.DRIFT
    assert decision.schedule.describe() != startup.describe()
    assert decision.lengths.mean_output == pytest.approx(g_task.mean_output, rel=0.25)
    for seed in range(10, 15):  # the new mix goes on: the reference moved with the solve
        finish(controller, g_task, 40, seed)
        clock.now += 2
        assert controller.check() is None
    assert controller.state().num_solves == 2


def test_min_requests_and_cooldown_hold_a_re_solve_back(target: ServingTarget) -> None:
    controller, clock = make(target, LengthDistribution.from_task("S"), cooldown_s=5.0)
    finish(controller, LengthDistribution.from_task("G"), 8, seed=0)
    clock.now += 10
    assert controller.check() is None  # 8 < min_requests
    finish(controller, LengthDistribution.from_task("G"), 40, seed=1)
    clock.now += 0.2  # past the check interval
    assert controller.check() is Trigger.DRIFT
    settle(controller)
    finish(controller, LengthDistribution.from_task("S"), 100, seed=2)
    clock.now += 1
    assert controller.check() is None  # within the cooldown
    clock.now += 5
    assert controller.check() is Trigger.DRIFT


def test_slo_change_gives_a_schedule_meeting_the_new_bound(target: ServingTarget) -> None:
    dist = LengthDistribution.from_task("C1")
    controller, _ = make(target, dist)
    loose = controller.current.choice.prediction.latency_s
    fastest = target.solve(dist, 1e-9).prediction.latency_s
    cluster = target.cluster(target.profile, dist)
    bounds = ((loose + fastest) / 2, fastest * 1.05)
    for update_id, bound in enumerate(bounds, start=1):
        controller.set_slo(bound, update_id)
        (decision,) = settle(controller)
        assert decision.update_id == update_id and decision.choice.is_feasible
        check = simulate(target.profile, cluster, dist, decision.schedule)
        assert check.latency_s <= bound
        assert decision.schedule.max_batch <= 64 and check.fits_memory
    controller.set_slo(1e-6, 9)  # nothing is that fast: the lowest-latency schedule runs
    (infeasible,) = settle(controller)
    assert not infeasible.choice.is_feasible
    assert infeasible.choice.prediction.latency_s == pytest.approx(fastest)


def test_with_adaptation_off_an_slo_change_keeps_the_schedule(target: ServingTarget) -> None:
    dist = LengthDistribution.from_task("C1")
    controller, clock = make(target, dist, is_enabled=False)
    kept = controller.current.schedule
    controller.set_slo(kept.predicted_latency_s / 2, 1)  # type: ignore[operator]
    (decision,) = controller.poll()
    assert decision.schedule is kept and not decision.choice.is_feasible
    finish(controller, LengthDistribution.from_task("G"), 100, seed=0)
    clock.now += 10
    assert controller.check() is None and controller.state().num_solves == 1


def test_a_latency_breach_tightens_the_plan(target: ServingTarget) -> None:
    dist = LengthDistribution.from_task("C1")
    loose = target.solve(dist, None).prediction.latency_s
    bound = (loose + target.solve(dist, 1e-9).prediction.latency_s) / 2
    controller, clock = make(target, dist, slo_s=bound)
    before = controller.current.choice.prediction.latency_s
    assert before <= bound
    for _ in range(20):  # measured 1.5x the bound
        controller.on_finished(100, 60, bound * 1.5, clock.now)
    clock.now += 2
    assert controller.check() is Trigger.LATENCY
    (decision,) = settle(controller)
    assert decision.choice.prediction.latency_s < before
    assert controller.state().slo_attainment == 0.0


def test_step_times_off_the_profile_refit_its_scale(target: ServingTarget) -> None:
    dist = LengthDistribution.from_task("C1")
    controller, clock = make(target, dist)
    before = controller.current.choice.prediction
    for batch in (8, 16, 32, 48) * 10:  # decode steps twice as slow as profiled
        controller.on_step(False, batch, 300.0, 2 * target.step_seconds(False, batch, 300.0))
    clock.now += 2
    assert controller.check() is Trigger.REFIT
    (decision,) = settle(controller)
    assert decision.scales == pytest.approx((1.0, 2.0))
    cluster = target.cluster(target.profile, dist)
    slower = simulate(target.scaled(1.0, 2.0), cluster, dist, before.schedule)
    assert slower.latency_s > 1.5 * before.latency_s
    clock.now += 2
    assert controller.check() is None  # fitted: nothing left to correct


def test_the_tightest_bound_is_the_edge_of_feasibility(target: ServingTarget) -> None:
    dist = LengthDistribution.from_task("G")
    edge = target.tightest_bound(dist)
    assert edge > 0
    assert target.solve(dist, edge * 1.01).is_feasible
    assert not target.solve(dist, edge * 0.99).is_feasible


def test_the_plan_keeps_a_margin_under_the_bound(target: ServingTarget) -> None:
    """Predictions are off by some percent: the planner aims below the bound, unless only
    the bound itself can be met."""
    dist = LengthDistribution.from_task("C1")
    loose = target.solve(dist, None).prediction.latency_s
    fastest = target.tightest_bound(dist)
    bound = (loose + fastest) / 2
    controller, _ = make(target, dist, slo_s=bound)
    assert controller.state().margin == AdaptiveConfig().margin < 1
    assert controller.current.choice.prediction.latency_s <= bound * AdaptiveConfig().margin
    assert controller.current.choice.is_feasible
    edge = fastest / (AdaptiveConfig().margin + 0.05)  # met, but not with the margin
    controller.set_slo(edge, 1)
    (decision,) = settle(controller)
    assert decision.choice.is_feasible
    assert decision.choice.prediction.latency_s == pytest.approx(fastest)


def test_latencies_far_below_the_prediction_loosen_the_plan(target: ServingTarget) -> None:
    """Where the planner's model runs high, it picks needlessly slow schedules: measured
    p99s well under the prediction calibrate it, and the next plan has more throughput."""
    dist = LengthDistribution.from_task("C1")
    loose = target.solve(dist, None).prediction.latency_s
    bound = (loose + target.tightest_bound(dist)) / 2
    controller, clock = make(target, dist, slo_s=bound)
    before = controller.current.choice.prediction
    ins, outs = dist.sample(20, np.random.default_rng(0))
    for i, o in zip(ins, outs, strict=True):  # measured at half the prediction
        controller.on_finished(int(i), int(o), before.latency_s / 2, clock.now)
    clock.now += 2
    assert controller.check() is Trigger.LATENCY
    (decision,) = settle(controller)
    assert controller.state().calibration == pytest.approx(0.5, rel=0.05)
    assert decision.choice.prediction.throughput_req_s > before.throughput_req_s
    assert bound < decision.choice.prediction.latency_s <= bound * controller.state().margin * 2
    ins, outs = LengthDistribution.from_task("G").sample(100, np.random.default_rng(1))
    as_calibrated = decision.choice.prediction.latency_s / 2
    for i, o in zip(ins, outs, strict=True):  # other lengths, as calibrated: no new slack
        controller.on_finished(int(i), int(o), as_calibrated, clock.now)
    clock.now += 2
    assert controller.check() is Trigger.DRIFT
    settle(controller)
    assert controller.state().calibration == 1.0  # measured anew for them


def test_waa_plans_over_the_workers_and_keeps_the_split_it_started_with(opt13b: Profile) -> None:
    """Changing WAA's split re-allocates the workers' layers: the engine starts with the one
    the planner picks, and every re-solve keeps it."""
    s_task, g_task = LengthDistribution.from_task("S"), LengthDistribution.from_task("G")
    target = ServingTarget(opt13b, 64, Policy.WAA_C, num_workers=4).pinned(s_task, None)
    assert 0 < target.encode_workers < 4
    controller, clock = make(target, s_task)
    startup = controller.current.schedule
    assert startup.policy is Policy.WAA_C and startup.num_workers == 4
    assert startup.encode_workers == target.encode_workers and startup.max_batch <= 64
    finish(controller, g_task, 200, seed=1)
    clock.now += 2
    assert controller.check() is Trigger.DRIFT
    (decision,) = settle(controller)
    assert decision.schedule.encode_workers == target.encode_workers
    tp2 = ServingTarget(opt13b, 64, Policy.WAA_C, num_workers=4, tp_degree=2)
    assert tp2.pinned(s_task, None).encode_workers == 2  # whole TP groups on either side
    with pytest.raises(ValueError, match="2 or more"):
        ServingTarget(opt13b, 64, Policy.WAA_M)


def test_rra_over_workers_plans_one_device_per_pipeline_stage(opt13b: Profile) -> None:
    """The engine runs one lane per stage (engine/pipelined.py), the simulator's P
    mini-batches: the planner prices the stages as devices sharing the KV rows, so two
    stages promise more throughput than one device and no more running rows."""
    s_task = LengthDistribution.from_task("S")
    one = ServingTarget(opt13b, 64, Policy.RRA)
    two = ServingTarget(opt13b, 64, Policy.RRA, num_workers=2)
    two_of_tp2 = ServingTarget(opt13b, 64, Policy.RRA, num_workers=4, tp_degree=2)
    assert two.cluster(opt13b, s_task).num_devices == 2
    assert two_of_tp2.cluster(opt13b, s_task).num_devices == 2
    single, piped = one.solve(s_task, None), two.solve(s_task, None)
    assert piped.schedule.num_workers == 2
    assert piped.prediction.throughput_req_s > 1.1 * single.prediction.throughput_req_s
    assert piped.prediction.decode_batch <= 64 and piped.schedule.max_batch <= 64
