"""The serving engine as a planning target: one device, a fixed number of KV rows.

The planner's memory model charges each running query its mean context of KV, while the
engine has `num_slots` rows. Sizing the simulated device's memory to exactly those rows
at the distribution's mean context keeps every planned decode batch within the slots, so
a planned schedule is one the engine can run as planned:

    memory = weights + kv_per_token * num_slots * ctx_mean     (reserve 0)
    simulated KV = kv_per_token * (B_D * ctx_mean + B_E * in_mean) <= that  =>  B_D <= slots

Over model workers the other policies plan one device per pipeline stage (a TP group of
the engine's counts as one device, priced at the profile's one-device times), the memory
above shared out among them: the engine runs one lane per stage (engine/pipelined.py),
the simulator's P mini-batches of B / P. WAA plans over the engine's workers as devices of
that memory each (exact for the rows with one decode worker, which holds them; with
several the planned decode batch may exceed the rows, and the schedule's cap keeps it to
them), without tensor parallelism (the engine's TP degree is its own). Its encode/decode
split is chosen once, for the engine's start (`pinned`), and held: changing it would
re-allocate the workers' layers (paper 7.6).

`scales` refit the profile to what the engine measures (controller): each kind's table of
ln seconds is shifted by ln(scale), which keeps the tables monotone and subadditive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from adaptive import kernels as K
from adaptive.cluster import Cluster, Link
from adaptive.distributions import LengthDistribution
from adaptive.errors import InfeasibleBound
from adaptive.profile import Profile
from adaptive.schedule import Policy, Schedule
from adaptive.search import solve
from adaptive.simulator import Prediction, build_scenario

LOOPBACK = Link(1e12, 0.0)  # one device: no links are crossed


@dataclass(frozen=True)
class Choice:
    """A solved schedule; `is_feasible` False: nothing meets the bound, the fastest runs."""

    prediction: Prediction
    is_feasible: bool
    solve_ms: float

    @property
    def schedule(self) -> Schedule:
        return self.prediction.schedule


@dataclass(frozen=True)
class ServingTarget:
    profile: Profile
    num_slots: int
    policy: Policy
    num_workers: int = 1  # the engine's model workers
    tp_degree: int = 1  # the engine's; WAA's two sides are whole TP groups of it
    encode_workers: int = 0  # WAA: the split held fixed; 0: the planner's rule picks it

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.policy.is_waa and self.num_workers < 2 * self.tp_degree:
            raise ValueError(
                f"policy {self.policy.value} runs encode and decode on separate workers: it "
                f"needs 2 or more TP groups of {self.tp_degree} (--workers), got "
                f"{self.num_workers} workers"
            )

    def scaled(self, encode_scale: float, decode_scale: float) -> Profile:
        tables = self.profile.tables.copy()  # [kind, tp, batch, length] ln seconds
        tables[K.ENCODE] += math.log(encode_scale)
        tables[K.DECODE] += math.log(decode_scale)
        return replace(self.profile, tables=tables)

    def cluster(self, profile: Profile, dist: LengthDistribution) -> Cluster:
        probe = Cluster(1, 1, 1.0, LOOPBACK, LOOPBACK, memory_reserve=0.0)
        ctx_mean = float(build_scenario(profile, probe, dist).vector[K.S_CTX_MEAN])
        memory = profile.weight_bytes + profile.kv_bytes_per_token * self.num_slots * ctx_mean
        devices = self.num_workers
        if not self.policy.is_waa:
            devices = self.num_workers // self.tp_degree  # pipeline stages
            memory /= devices
        return Cluster(
            devices, 1, memory, LOOPBACK, LOOPBACK, host=LOOPBACK, memory_reserve=0.0, name="engine"
        )

    def pinned(self, dist: LengthDistribution, bound_s: float | None) -> ServingTarget:
        """WAA: this target with the split the planner picks for `dist` and the bound,
        rounded to whole TP groups, held fixed for the engine's life; other policies:
        itself."""
        if not self.policy.is_waa or self.encode_workers:
            return self
        tp = self.tp_degree
        picked = self.solve(dist, bound_s).schedule.encode_workers
        return replace(
            self, encode_workers=min(max(round(picked / tp), 1) * tp, self.num_workers - tp)
        )

    def solve(
        self,
        dist: LengthDistribution,
        bound_s: float | None,
        scales: tuple[float, float] = (1.0, 1.0),
    ) -> Choice:
        """The best schedule for the bound; the lowest-latency one when none meets it."""
        profile = self.scaled(*scales)
        cluster = self.cluster(profile, dist)
        policies, split = (self.policy,), self.encode_workers
        try:
            plan = solve(profile, cluster, dist, bound_s, policies=policies, encode_workers=split)
            is_feasible = True
        except InfeasibleBound as exc:
            bound = exc.min_latency_s
            plan = solve(profile, cluster, dist, bound, policies=policies, encode_workers=split)
            is_feasible = False
        schedule = plan.schedule
        capped = replace(
            schedule,
            encode_batch=min(schedule.encode_batch, self.num_slots),
            max_batch=min(schedule.max_batch, self.num_slots),
        )
        return Choice(replace(plan.prediction, schedule=capped), is_feasible, plan.solve_ms)

    def tightest_bound(self, dist: LengthDistribution) -> float:
        """The lowest latency any schedule is predicted to reach for `dist` (seconds): what
        `solve` runs when nothing meets a bound."""
        return self.solve(dist, 1e-9).prediction.latency_s

    def step_seconds(self, is_encode: bool, batch: int, length: float) -> float:
        """The unscaled profile's time for one engine step (all layers and the head)."""
        p = self.profile
        axes = np.array([p.log2_batch0, p.log2_len0])
        kind = K.ENCODE if is_encode else K.DECODE
        layers = p.encode_layers if is_encode else p.decode_layers
        k = p.tps.index(1) if 1 in p.tps else 0
        if is_encode:
            length = K.padded_length(p.mean_encode_padding, batch, length)
        return layers * K.layer_time(p.tables, axes, kind, k, float(batch), length)
