"""XScheduler: branch-and-bound over the control variables (paper section 5, Algorithm 1).

Per policy and tensor-parallel setting the knobs form a 2-D grid, each axis oriented so a
higher index raises both throughput and latency (B_E as is; N_D and WAA's micro-batch
count reversed). Under that monotonicity a block's bottom-left corner bounds its latency
from below and its top-right corner bounds its throughput from above, so:

    pop the block with the highest upper bound; if its top-right meets the bound, it is
    the block's optimum; else look at its top-left and bottom-right corners and bisect
    toward the better feasible one; keep a child only if its bottom-left can meet the
    bound (latency + eps_L) and its top-right can beat the incumbent (throughput + eps_T).

Memory overflow counts as infinite latency: it grows in the same directions, so the
points that fit form a staircase. The search starts from that staircase cut into bands
whose corners all fit (`_fitting_bands`, one walk), not from the whole grid. A corner
past memory is the model evaluated where nothing can run (RRA's decode batch reaches
1e4-1e5 at small N_D, the profiles stop at 512); its throughput, extrapolated, fell
below the optimum inside its block and the block was pruned (GPT-3 101B and 175B, task
G, no bound: 40.0 and 16.6 req/s found where 51.4 and 29.4 existed). So the bounds rely on
monotonicity only where memory fits, which the cost tables (monotone, subadditive, linear
in batch past the grid) guarantee; `exegpt plan --reproduce-paper --verify` checks all
96 reproduction scenarios against `exhaustive`. eps_L and eps_T (TOLERANCE) only widen
what is explored.

The paper's partial TP breaks monotonicity when searched jointly, so, as the paper does,
the degree is fixed per run; the applied-device count is enumerated outside too (a few
values). Every feasible point evaluated updates the incumbent, which is shared across
runs, so later runs prune against the best schedule found so far. `exhaustive` evaluates
every grid point of the same subproblems, for verification.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from adaptive.cluster import Cluster
from adaptive.distributions import LengthDistribution
from adaptive.errors import InfeasibleBound, PlanningError
from adaptive.profile import Profile
from adaptive.schedule import Policy, Schedule
from adaptive.simulator import (
    BatchRelation,
    Prediction,
    Scenario,
    build_scenario,
    evaluate,
    to_prediction,
)

BATCH_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
DECODE_ITERS_GRID = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    12,
    14,
    16,
    20,
    24,
    28,
    32,
    40,
    48,
    64,
    80,
    96,
    128,
    160,
    192,
    256,
    320,
    384,
    512,
    640,
)
RUNNING_GRID = (
    1,
    2,
    4,
    8,
    12,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
)
STATIC_GRID = (1, 2, *range(4, 1025, 4))
EXEGPT_POLICIES = (Policy.RRA, Policy.WAA_C, Policy.WAA_M)
TOLERANCE = 0.05


@dataclass(frozen=True)
class Subproblem:
    """One policy at one TP setting: the 2-D oriented knob grid the BnB searches."""

    policy: Policy
    degree: int
    tp_workers: int
    axis1: tuple[int, ...]  # B_E or batch, ascending
    axis2: tuple[int, ...]  # N_D or micro-batches, descending (index up = more throughput)
    encode_workers: int = 0  # WAA: the encode/decode split this run holds fixed

    def schedule(self, i: int, j: int, num_workers: int) -> Schedule:
        x1, x2 = self.axis1[i], self.axis2[j]
        p = self.policy
        return Schedule(
            policy=p,
            encode_batch=x1 if p is not Policy.CONTINUOUS else 1,
            decode_iters=x2 if p is Policy.RRA else 1,
            max_batch=x1 if p is Policy.CONTINUOUS else 256,
            decode_microbatches=x2 if p in (Policy.WAA_C, Policy.WAA_M) else 1,
            tp_degree=self.degree,
            tp_workers=self.tp_workers,
            num_workers=num_workers,
            encode_workers=self.encode_workers,
        )


@dataclass(frozen=True)
class Plan:
    """The solver's answer: the best feasible schedule with its prediction."""

    prediction: Prediction
    solve_ms: float
    evaluations: int
    method: str

    @property
    def schedule(self) -> Schedule:
        return self.prediction.schedule


def subproblems(
    sc: Scenario, policies: Iterable[Policy], encode_workers: int = 0
) -> list[Subproblem]:
    """The (policy, TP degree, TP devices) runs, each with its knob grid; WAA's over the
    splits its rule picks, or only `encode_workers` encode devices when that is > 0."""
    n = sc.cluster.num_devices
    degrees = sc.tp_degrees()
    out_max = sc.dist.max_output
    nd_axis = tuple(reversed([v for v in DECODE_ITERS_GRID if v <= out_max] or [1]))
    baseline_d = max([d for d in degrees if n % d == 0] or [1])
    runs: list[Subproblem] = []
    for policy in policies:
        if policy is Policy.RRA:
            for d in degrees:
                for g in _tp_counts(n, d):
                    runs.append(Subproblem(policy, d, g, BATCH_GRID, nd_axis))
        elif policy in (Policy.WAA_C, Policy.WAA_M):
            for d in degrees:
                splits = [encode_workers] if encode_workers else _waa_splits(sc, policy, d)
                if n >= 2 * d:
                    for n_e in (n_e for n_e in splits if n_e % d == 0 and n - n_e >= d):
                        # Divisors of the decode stage count: G * m = P_D exactly, so
                        # memory and latency move monotonically with m.
                        p_d = (n - n_e) // d
                        micro = tuple(m for m in range(p_d, 0, -1) if p_d % m == 0)
                        runs.append(
                            Subproblem(policy, d, n if d > 1 else 0, BATCH_GRID, micro, n_e)
                        )
        else:
            grid = STATIC_GRID if policy is Policy.STATIC else RUNNING_GRID
            workers = n // baseline_d * baseline_d if baseline_d > 1 else 0
            runs.append(Subproblem(policy, baseline_d, workers, grid, (1,)))
    return runs


def _waa_splits(sc: Scenario, policy: Policy, d: int) -> list[int]:
    """The encode-device counts the policy's rule (compute or memory shares) picks over
    the B_E grid. The rule's split moves with B_E, which would break monotonicity in B_E;
    holding each candidate split fixed per run keeps every run monotone."""
    splits = {int(evaluate(sc, policy, d, 0, b_e, 1)[4]) for b_e in BATCH_GRID}
    return sorted(splits)


def _tp_counts(n: int, d: int) -> list[int]:
    if d == 1:
        return [0]
    counts = {d * 2**i for i in range(n.bit_length()) if d * 2**i <= n}
    return sorted(counts | {n // d * d})


class _Search:
    """Memoised perf() over one scenario plus the incumbent shared by all runs."""

    def __init__(self, sc: Scenario, slo_s: float, tolerance: float) -> None:
        self.sc, self.slo, self.tol = sc, slo_s, tolerance
        self.best: tuple[float, Subproblem, int, int] | None = None
        self.evaluations = 0
        self.min_latency = math.inf

    def perf(self, sub: Subproblem, i: int, j: int) -> tuple[float, float]:
        """(throughput, latency); latency is inf when weights + KV do not fit."""
        self.evaluations += 1
        rate, lat, _, memory, _ = evaluate(
            self.sc,
            sub.policy,
            sub.degree,
            sub.tp_workers,
            sub.axis1[i],
            sub.axis2[j],
            sub.encode_workers,
        )
        if memory > self.sc.cluster.usable_memory_bytes:
            lat = math.inf
        self.min_latency = min(self.min_latency, lat)
        if _meets(lat, self.slo) and (self.best is None or rate > self.best[0]):
            self.best = (rate, sub, i, j)
        return rate, lat

    @property
    def incumbent(self) -> float:
        return self.best[0] if self.best else 0.0

    def branch_and_bound(self, sub: Subproblem) -> None:
        memo: dict[tuple[int, int], tuple[float, float]] = {}

        def perf(i: int, j: int) -> tuple[float, float]:
            if (i, j) not in memo:
                memo[(i, j)] = self.perf(sub, i, j)
            return memo[(i, j)]

        if not _meets(perf(0, 0)[1], self.slo * (1 + self.tol)):
            return  # even the lowest-latency corner misses the bound (or does not fit)
        heap = [(-perf(*hi)[0], lo, hi) for lo, hi in _fitting_bands(sub, perf)]
        heapq.heapify(heap)
        while heap:
            neg_upper, lo, top = heapq.heappop(heap)
            if -neg_upper * (1 + self.tol) < self.incumbent:
                continue  # cannot beat the incumbent
            if _meets(perf(*top)[1], self.slo) or lo == top:
                continue  # top-right feasible: the block's best is already recorded
            for child_lo, child_hi in _split(
                lo, top, perf(lo[0], top[1]), perf(top[0], lo[1]), self.slo
            ):
                upper = perf(*child_hi)[0]
                if _meets(perf(*child_lo)[1], self.slo * (1 + self.tol)):
                    heapq.heappush(heap, (-upper, child_lo, child_hi))

    def exhaustive(self, sub: Subproblem) -> None:
        for i in range(len(sub.axis1)):
            for j in range(len(sub.axis2)):
                self.perf(sub, i, j)


Corner = tuple[int, int]


def _fitting_bands(
    sub: Subproblem, perf: Callable[[int, int], tuple[float, float]]
) -> list[tuple[Corner, Corner]]:
    """The grid points that fit in memory, as disjoint full-width bands of axis-2 rows.

    Memory grows along both axes, so the points that fit form a staircase: row j fits up
    to axis-1 index f[j], f non-increasing in j. One walk down from the top row finds f
    (at most len1 + len2 calls, the cheap small-N_D rows first); rows with equal f make
    one band [0, f] x [j_lo, j_hi], whose every corner fits:

        j  . . . . x x      x: over memory
        |  . . . . x x      bands: the bottom row (f = 5), the top two (f = 3)
        |  . . . . . .
        +------------ i
    """
    top = len(sub.axis2) - 1
    f = [-1] * (top + 1)
    i = -1
    for j in range(top, -1, -1):
        while i + 1 < len(sub.axis1) and not math.isinf(perf(i + 1, j)[1]):
            i += 1
        f[j] = i
    bands: list[tuple[Corner, Corner]] = []
    for j in range(top + 1):
        if f[j] < 0:
            break
        if bands and bands[-1][1][0] == f[j]:
            bands[-1] = (bands[-1][0], (f[j], j))
        else:
            bands.append(((0, j), (f[j], j)))
    return bands


def _meets(latency: float, bound: float) -> bool:
    """Latency within the bound; inf (memory overflow) never is, even when unbounded."""
    return latency <= bound and not math.isinf(latency)


def _split(
    lo: Corner,
    hi: Corner,
    top_left: tuple[float, float],
    bottom_right: tuple[float, float],
    slo: float,
) -> list[tuple[Corner, Corner]]:
    """Bisect along axis 1 when the top-left corner is the better feasible one (the
    optimum then lies toward high axis-2 values), along axis 2 otherwise; with neither
    feasible, along the longer side. A side of length 1 cannot be cut."""
    tl_ok, br_ok = _meets(top_left[1], slo), _meets(bottom_right[1], slo)
    if tl_ok or br_ok:
        axis = 0 if tl_ok and (not br_ok or top_left[0] >= bottom_right[0]) else 1
    else:
        axis = 0 if hi[0] - lo[0] >= hi[1] - lo[1] else 1
    if hi[axis] == lo[axis]:
        axis = 1 - axis
    mid = (lo[axis] + hi[axis]) // 2
    left_hi = (mid, hi[1]) if axis == 0 else (hi[0], mid)
    right_lo = (mid + 1, lo[1]) if axis == 0 else (lo[0], mid + 1)
    return [(lo, left_hi), (right_lo, hi)]


def solve_scenario(
    sc: Scenario,
    slo_s: float | None,
    *,
    policies: Sequence[Policy] = EXEGPT_POLICIES,
    tolerance: float = TOLERANCE,
    exhaustive: bool = False,
    encode_workers: int = 0,
) -> Plan:
    """Best feasible schedule over `policies`; PlanningError when none meets the bound.
    encode_workers > 0 holds WAA's split fixed (a running engine's)."""
    if slo_s is not None and not slo_s > 0:
        raise PlanningError(f"the latency bound must be positive, got {slo_s}")
    bound = math.inf if slo_s is None else slo_s
    start = time.perf_counter()
    search = _Search(sc, bound, tolerance)
    for sub in subproblems(sc, policies, encode_workers):
        if exhaustive:
            search.exhaustive(sub)
        else:
            search.branch_and_bound(sub)
    elapsed = (time.perf_counter() - start) * 1000.0
    if search.best is None:
        names = ", ".join(p.value for p in policies)
        if math.isinf(search.min_latency):
            raise PlanningError(f"no {names} schedule fits in device memory on this cluster")
        raise InfeasibleBound(
            f"no {names} schedule meets the {bound:g} s bound; the lowest latency that fits "
            f"is {search.min_latency:.3g} s",
            search.min_latency,
        )
    _, sub, i, j = search.best
    schedule = sub.schedule(i, j, sc.cluster.num_devices)
    point = evaluate(
        sc, sub.policy, sub.degree, sub.tp_workers, sub.axis1[i], sub.axis2[j], sub.encode_workers
    )
    prediction = to_prediction(sc, schedule, point, slo_s)
    if sub.policy is not Policy.CONTINUOUS:
        planned = _with_batch_cap(prediction.schedule, prediction.decode_batch)
        prediction = _replace_schedule(prediction, planned)
    method = "exhaustive" if exhaustive else "branch-and-bound"
    return Plan(prediction, elapsed, search.evaluations, method)


def _with_batch_cap(schedule: Schedule, decode_batch: float) -> Schedule:
    return replace(schedule, max_batch=max(1, math.ceil(decode_batch)))


def _replace_schedule(prediction: Prediction, schedule: Schedule) -> Prediction:
    return replace(prediction, schedule=schedule)


def solve(
    profile: Profile,
    cluster: Cluster,
    dist: LengthDistribution,
    slo_s: float | None,
    *,
    policies: Sequence[Policy] = EXEGPT_POLICIES,
    tolerance: float = TOLERANCE,
    exhaustive: bool = False,
    batch_relation: BatchRelation = "little",
    encode_workers: int = 0,
) -> Plan:
    """The highest-throughput schedule whose latency stays under slo_s (None: unbounded);
    encode_workers > 0 holds WAA's split fixed."""
    sc = build_scenario(profile, cluster, dist, batch_relation=batch_relation)
    return solve_scenario(
        sc,
        slo_s,
        policies=policies,
        tolerance=tolerance,
        exhaustive=exhaustive,
        encode_workers=encode_workers,
    )
