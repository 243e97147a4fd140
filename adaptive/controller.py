"""The online controller: owns the serving Schedule and re-solves it while requests run.

The engine thread reports every finished request (lengths, latency) and every step (what
ran, how long it took); it calls `check()` between steps and applies what `poll()` hands
back at its next step. Solving runs on one background thread (the planner's
numba kernels release the GIL), so the step loop never waits for the planner. A re-solve
is triggered by

    slo      PUT /v1/slo changed the bound (always, even with adaptation off: then the
             schedule is kept and only its feasibility is re-stated)
    drift    the live histograms moved: the largest relative change of the planner's
             inputs (mean input length, mean and p99 output length) since the schedule
             was solved exceeds `drift_threshold`
    latency  the p99 of requests that started under the current schedule breaks the
             bound: the bound the planner aims at is tightened by bound / measured p99;
             or it is far below the schedule's predicted latency (the planner's model
             runs high here): the planner's bound is loosened by predicted / measured
    refit    measured step times disagree with the profile's by more than
             `refit_threshold` (the paper's real-time profiling): encode and decode tables
             are rescaled by measured / predicted over the recent steps

Hysteresis: the distance is measured from the distribution the current schedule was
solved for, and that reference moves only when a schedule is solved; a trigger also
needs `min_requests` finished since the last solve and `cooldown_s` since the last
trigger. Traffic hovering near one mix therefore never re-solves, and a real shift
re-solves once, after which the distance starts again from zero.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from adaptive.distributions import LengthDistribution
from adaptive.online import LengthSummary, LiveLengths
from adaptive.schedule import Schedule
from adaptive.serving import Choice, ServingTarget

logger = logging.getLogger(__name__)


class Trigger(enum.StrEnum):
    STARTUP = "startup"
    SLO = "slo"
    DRIFT = "drift"
    LATENCY = "latency"
    REFIT = "refit"


@dataclass(frozen=True)
class AdaptiveConfig:
    is_enabled: bool = True  # False: the schedule is solved once at start and kept
    half_life: float = 64.0  # requests after which a finished request weighs half
    min_requests: int = 16  # finished since the last solve before drift or latency count
    drift_threshold: float = 0.3  # relative change of a planner input (see module doc)
    cooldown_s: float = 1.0  # least time between two triggers
    check_interval_s: float = 0.1  # triggers are evaluated at most this often
    breach_tolerance: float = 0.05  # measured p99 above bound * (1 + this) is a breach
    # The planner aims at bound * margin. It starts at `margin`, below 1 because predicted
    # latencies are off by up to ~15% on a shared CPU (bench fidelity), and a breach
    # would only be seen after min_requests finish; breaches lower it, to min_margin.
    margin: float = 0.85
    min_margin: float = 0.3
    # measured p99 below predicted * (1 - this) calibrates the planner's latencies down
    slack_threshold: float = 0.25
    refit_threshold: float = 0.25  # |measured / predicted - 1| of step times past the fit
    min_steps: int = 32  # steps of a kind behind a refit
    window: int = 256  # recent latencies and steps kept
    throughput_window_s: float = 10.0

    def __post_init__(self) -> None:
        checks = {
            "half_life": self.half_life > 0,
            "min_requests": self.min_requests >= 1,
            "drift_threshold": self.drift_threshold > 0,
            "cooldown_s": self.cooldown_s >= 0,
            "check_interval_s": self.check_interval_s >= 0,
            "breach_tolerance": self.breach_tolerance >= 0,
            "margin": 0 < self.margin <= 1,
            "min_margin": 0 < self.min_margin <= self.margin,
            "slack_threshold": 0 < self.slack_threshold < 1,
            "refit_threshold": self.refit_threshold > 0,
            "min_steps": self.min_steps >= 1,
            "window": self.window >= self.min_requests and self.window >= self.min_steps,
            "throughput_window_s": self.throughput_window_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"AdaptiveConfig.{name} is out of range: {getattr(self, name)!r}")


@dataclass(frozen=True)
class Decision:
    """A solved schedule and why: what `poll()` returns for the engine to apply."""

    choice: Choice
    reason: Trigger
    slo_s: float | None
    lengths: LengthSummary  # what it was solved for
    scales: tuple[float, float]  # (encode, decode) profile scales it was solved with
    triggered_at: float  # clock time of the trigger
    update_id: int | None = None  # the SLO update that asked for it

    @property
    def schedule(self) -> Schedule:
        return self.choice.schedule


@dataclass(frozen=True)
class ControllerState:
    """A snapshot for GET /v1/slo and /metrics."""

    is_enabled: bool
    lengths: LengthSummary | None
    schedule: Schedule
    reason: Trigger  # why the current schedule was solved
    changed_at: float  # clock time the schedule last changed knobs
    change_reason: Trigger
    num_solves: int
    last_solve_ms: float
    switch_delay_s: float | None  # trigger -> schedule running, last switch
    scales: tuple[float, float]
    fitted_scales: tuple[float, float]
    margin: float
    calibration: float  # measured / predicted p99 latency, where predictions ran high
    measured_p99_s: float | None
    measured_throughput_req_s: float
    slo_attainment: float | None  # fraction of requests since the bound was set meeting it
    num_finished: int


class Controller:
    def __init__(
        self,
        target: ServingTarget,
        config: AdaptiveConfig,
        prior: LengthDistribution,
        slo_s: float | None,
        *,
        max_len: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target, self.config, self.clock = target, config, clock
        self.prior = prior
        self.slo_s = slo_s
        self.live = LiveLengths(max_len, config.half_life)
        self.current = self._solve(
            Trigger.STARTUP, prior, slo_s, config.margin, (1.0, 1.0), clock(), None
        )
        self.num_solves = 1
        self._changed = (clock(), Trigger.STARTUP)
        self._active_since = clock()
        self._switch_delay_s: float | None = None
        self._fitted = (1.0, 1.0)
        self._margin = config.margin
        self._calibration = 1.0
        self._since_solve = 0
        self._last_trigger = -math.inf
        self._next_check = -math.inf
        self._lock = threading.Lock()
        self._pending: deque[Future[Decision]] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="exegpt-planner")
        self._breach: deque[float] = deque(maxlen=config.window)  # since the switch
        self._latencies: deque[float] = deque(maxlen=config.window)
        self._finish_times: deque[float] = deque()
        self._steps: deque[tuple[bool, float, float]] = deque(maxlen=config.window)
        self._num_met = self._num_measured = 0

    # -- reports from the engine thread -------------------------------------------------
    def on_finished(
        self, input_len: int, output_len: int, latency_s: float, started_at: float
    ) -> None:
        self.live.observe([input_len], [max(output_len, 1)])
        now = self.clock()
        with self._lock:
            self._since_solve += 1
            self._latencies.append(latency_s)
            if started_at >= self._active_since:
                self._breach.append(latency_s)
            self._finish_times.append(now)
            if self.slo_s is not None:
                self._num_measured += 1
                self._num_met += latency_s <= self.slo_s

    def on_step(self, is_encode: bool, batch: int, length: float, seconds: float) -> None:
        predicted = self.target.step_seconds(is_encode, batch, length)
        self._steps.append((is_encode, predicted, seconds))

    def on_active(self, schedule: Schedule) -> None:
        """The engine now runs `schedule` (it switched between two steps)."""
        if schedule is self.current.schedule:
            now = self.clock()
            self._active_since = now
            self._switch_delay_s = now - self.current.triggered_at
            self._breach.clear()

    # -- triggers -----------------------------------------------------------------------
    def set_slo(self, slo_s: float | None, update_id: int) -> None:
        """A new bound: re-solve (or, adaptation off, re-state the kept schedule)."""
        with self._lock:
            self.slo_s = slo_s
            self._num_met = self._num_measured = 0
            self._margin = self.config.margin
        if self.config.is_enabled:
            self._submit(Trigger.SLO, update_id)
            return
        kept = self.current.choice
        latency = kept.prediction.latency_s
        meets = slo_s is None or latency <= slo_s
        done: Future[Decision] = Future()
        done.set_result(
            Decision(
                Choice(kept.prediction, meets, 0.0),
                Trigger.SLO,
                slo_s,
                self.current.lengths,
                self.current.scales,
                self.clock(),
                update_id,
            )
        )
        self._pending.append(done)

    def check(self) -> Trigger | None:
        """Called between steps: start a re-solve if one is due; returns its trigger."""
        if not self.config.is_enabled or self._pending:
            return None
        now = self.clock()
        if now < self._next_check or now - self._last_trigger < self.config.cooldown_s:
            return None
        self._next_check = now + self.config.check_interval_s
        self._fitted = self._fit_scales()
        reason = self._due()
        if reason is not None:
            self._submit(reason, None)
        return reason

    def _due(self) -> Trigger | None:
        cfg = self.config
        with self._lock:
            enough = self._since_solve >= cfg.min_requests
            breach = list(self._breach)
        if self.slo_s is not None and len(breach) >= cfg.min_requests:
            p99 = float(np.percentile(breach, 99))
            if p99 > self.slo_s * (1 + cfg.breach_tolerance):
                self._margin = max(cfg.min_margin, self._margin * self.slo_s / p99)
                return Trigger.LATENCY
            predicted = self.current.choice.prediction.latency_s
            if p99 < predicted * self._calibration * (1 - cfg.slack_threshold):
                # planned latencies are in the model's units: this schedule's measured /
                # predicted carries over to its neighbours
                self._calibration = p99 / predicted
                return Trigger.LATENCY
        applied = self.current.scales
        limit = math.log1p(cfg.refit_threshold)
        if any(abs(math.log(f / a)) > limit for f, a in zip(self._fitted, applied, strict=True)):
            return Trigger.REFIT
        summary = self.live.summary()
        drifted = (
            enough
            and summary is not None
            and summary.weight >= cfg.min_requests
            and summary.drift_from(self.current.lengths) > cfg.drift_threshold
        )
        return Trigger.DRIFT if drifted else None

    def _fit_scales(self) -> tuple[float, float]:
        """measured / predicted step time per kind over the recent steps (kept when few)."""
        steps = list(self._steps)
        fitted = list(self._fitted)
        for kind, is_encode in enumerate((True, False)):
            mine = [(p, m) for e, p, m in steps if e is is_encode]
            if len(mine) >= self.config.min_steps:
                fitted[kind] = sum(m for _, m in mine) / max(sum(p for p, _ in mine), 1e-12)
        return fitted[0], fitted[1]

    # -- solving ------------------------------------------------------------------------
    def _submit(self, reason: Trigger, update_id: int | None) -> None:
        now = self.clock()
        self._last_trigger = now
        summary = self.live.summary()
        use_live = summary is not None and summary.weight >= self.config.min_requests
        dist = self.live.distribution() if use_live else None
        with self._lock:
            self._since_solve = 0
            self._breach.clear()
        if reason is Trigger.DRIFT:  # other lengths: the calibration is measured anew
            self._calibration = 1.0
        margin = self._margin / self._calibration
        args = (reason, dist or self.prior, self.slo_s, margin, self._fitted, now, update_id)
        self._pending.append(self._executor.submit(self._solve, *args))

    def _solve(
        self,
        reason: Trigger,
        dist: LengthDistribution,
        slo_s: float | None,
        margin: float,
        scales: tuple[float, float],
        triggered_at: float,
        update_id: int | None,
    ) -> Decision:
        bound = None if slo_s is None else slo_s * margin
        choice = self.target.solve(dist, bound, scales)
        if slo_s is not None and not choice.is_feasible and choice.prediction.latency_s <= slo_s:
            # nothing meets the bound with the margin: the lowest-latency schedule runs,
            # and it does meet the bound itself
            choice = replace(choice, is_feasible=True)
        lengths = LengthSummary.of(dist)
        return Decision(choice, reason, slo_s, lengths, scales, triggered_at, update_id)

    @property
    def is_solving(self) -> bool:
        return bool(self._pending)

    def poll(self) -> list[Decision]:
        """Solved decisions, oldest first; the last one is the schedule to run now."""
        done: list[Decision] = []
        while self._pending and self._pending[0].done():
            try:
                decision = self._pending.popleft().result()
            except Exception:  # a planner bug must not stop serving: keep the schedule
                logger.exception("re-solving failed; the current schedule stays")
                continue
            if decision.schedule.describe() != self.current.schedule.describe():
                self._changed = (self.clock(), decision.reason)
            self.current = decision
            if self.config.is_enabled:  # off, an SLO change only re-states the kept one
                self.num_solves += 1
            done.append(decision)
        return done

    def state(self) -> ControllerState:
        now = self.clock()
        with self._lock:
            latencies = list(self._latencies)
            while (
                self._finish_times and self._finish_times[0] < now - self.config.throughput_window_s
            ):
                self._finish_times.popleft()
            num_recent = len(self._finish_times)
            attainment = self._num_met / self._num_measured if self._num_measured else None
        return ControllerState(
            is_enabled=self.config.is_enabled,
            lengths=self.live.summary(),
            schedule=self.current.schedule,
            reason=self.current.reason,
            changed_at=self._changed[0],
            change_reason=self._changed[1],
            num_solves=self.num_solves,
            last_solve_ms=self.current.choice.solve_ms,
            switch_delay_s=self._switch_delay_s,
            scales=self.current.scales,
            fitted_scales=self._fitted,
            margin=self._margin,
            calibration=self._calibration,
            measured_p99_s=float(np.percentile(latencies, 99)) if latencies else None,
            measured_throughput_req_s=num_recent / self.config.throughput_window_s,
            slo_attainment=attainment,
            num_finished=self.live.num_observed,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
