"""XSimulator: predicted throughput, latency and memory of a Schedule (paper section 6).

The model is analytic (expectations over the length distributions, no sampling), so one
evaluation costs microseconds and the solver can call it thousands of times. Latency is
the paper's: the time to finish a query of the target (p99) output length under the
schedule's steady state, from its encoding to its last token; no queueing.

RRA batch relation. The paper sets B_D = B_E / sum_U P_D(U) = B_E / E[1/ceil(S/N_D)];
Little's law gives B_D = B_E * E[ceil(S/N_D)] (each query stays ceil(S/N_D) cycles). By
Jensen the paper's value is smaller (15-35% on the paper's tasks). The discrete-event
simulation here (`simulate_discrete`, queries join and leave one by one) agrees with
Little's law, so that is the default; `batch_relation="paper"` keeps the paper's formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from adaptive import kernels as K
from adaptive.cluster import Cluster
from adaptive.distributions import LengthDistribution
from adaptive.errors import PlanningError
from adaptive.profile import Profile
from adaptive.schedule import Policy, Schedule

FloatArray = npt.NDArray[np.float64]
BatchRelation = Literal["little", "paper"]
Execution = Literal["engine", "paper"]  # what build_scenario models, see there
WAA_BUFFER = 0.05  # latency margin for WAA's dynamic workload adjustment (paper section 6)
MIN_MEAN_ITERS = 0.05  # decoding iterations per query, at the least, in the rate formulas


@dataclass(frozen=True, eq=False)
class Scenario:
    """Everything fixed while the solver varies knobs: model, cluster, lengths, as arrays."""

    profile: Profile
    cluster: Cluster
    dist: LengthDistribution
    vector: FloatArray  # [K.S_SIZE] scenario vector, layout in adaptive.kernels
    axes: FloatArray  # [2] log2 of the cost grid's first batch and length
    iters_pmf: FloatArray  # P(a query runs i decoding iterations), i = 0, 1, ...
    batch_relation: BatchRelation = "little"

    def tp_index(self, degree: int) -> int:
        if degree not in self.profile.tps:
            raise PlanningError(f"profile has no tp={degree}; it has {self.profile.tps}")
        return self.profile.tps.index(degree)

    def tp_degrees(self) -> list[int]:
        """Degrees this cluster can run: measured, within a node, at most the device count."""
        n, node = self.cluster.num_devices, self.cluster.devices_per_node
        return [d for d in self.profile.tps if d <= min(n, node)]


@dataclass(frozen=True)
class Prediction:
    """What the simulator predicts for one schedule."""

    schedule: Schedule
    throughput_req_s: float
    throughput_tok_s: float
    latency_s: float
    decode_batch: float
    memory_bytes_per_device: float
    fits_memory: bool
    meets_bound: bool

    @property
    def is_feasible(self) -> bool:
        return self.fits_memory and self.meets_bound


def build_scenario(
    profile: Profile,
    cluster: Cluster,
    dist: LengthDistribution,
    *,
    batch_relation: BatchRelation = "little",
    model: Execution = "engine",
) -> Scenario:
    """Pack model, cluster and distribution into the kernels' scenario vector.

    model "engine": the execution exegpt's engine runs. A query of S output tokens runs
    S - 1 decoding iterations, its first token sampled from its encoding pass (decoder-only
    models and T5 alike), and RRA's latency is read at the target length's percentile over
    queries whose prompts, and so the encoding phases they wait through, vary in length.
    "paper": the paper's account, S decoding iterations ("S99 x the per-token decode
    time") and every phase at the mean prompt length, which `plan --reproduce-paper` keeps."""
    if batch_relation not in ("little", "paper"):
        raise PlanningError(f"batch_relation must be 'little' or 'paper', not {batch_relation!r}")
    if model not in ("engine", "paper"):
        raise PlanningError(f"model must be 'engine' or 'paper', not {model!r}")
    shift = 1 if model == "engine" else 0
    iters_pmf = np.ascontiguousarray(dist.output_pmf[shift:], dtype=np.float64)
    iters = np.arange(iters_pmf.size, dtype=np.float64)
    # Every query ending with its encoding leaves no decoding work: rates stay finite.
    mean_iters = max(float(np.dot(iters, iters_pmf)), MIN_MEAN_ITERS)
    # A running query of I iterations is equally likely at any of them, and longer queries
    # are running proportionally longer: mean age E[I(I+1)] / (2 E[I]), plus the tokens
    # its encoding made.
    age = float(np.dot(iters * (iters + 1), iters_pmf)) / (2.0 * mean_iters) + shift
    memory = cluster.usable_memory_bytes
    s = np.zeros(K.S_SIZE)
    s[K.S_L_ENC] = profile.encode_layers
    s[K.S_L_DEC] = profile.decode_layers
    s[K.S_HIDDEN] = profile.hidden
    s[K.S_AR_ENC] = 2.0
    s[K.S_AR_DEC] = 3.0 if profile.is_encdec else 2.0
    half = profile.weight_bytes / 2.0
    s[K.S_W_ENC] = half if profile.is_encdec else profile.weight_bytes
    s[K.S_W_DEC] = half if profile.is_encdec else profile.weight_bytes
    s[K.S_W_SHARED] = 0.0 if profile.is_encdec else 1.0
    s[K.S_KV_TOKEN] = profile.kv_bytes_per_token
    s[K.S_MEM] = memory
    s[K.S_N] = cluster.num_devices
    s[K.S_NODE] = cluster.devices_per_node
    s[K.S_INTRA_BW], s[K.S_INTRA_LAT] = cluster.intra.bandwidth, cluster.intra.latency
    s[K.S_INTER_BW], s[K.S_INTER_LAT] = cluster.inter.bandwidth, cluster.inter.latency
    s[K.S_HOST_BW] = cluster.host.bandwidth
    s[K.S_IN_MEAN] = dist.mean_input
    s[K.S_DEC_MEAN] = mean_iters
    s[K.S_DEC_TARGET] = dist.target_output_len - shift
    s[K.S_DEC_MAX] = dist.max_output - shift
    s[K.S_IN_MAX] = dist.max_input
    s[K.S_CTX_MEAN] = dist.mean_input + age
    s[K.S_BUFFER] = WAA_BUFFER
    if model == "engine":
        lengths = np.arange(dist.input_pmf.size, dtype=np.float64)
        spread = float(np.dot((lengths - dist.mean_input) ** 2, dist.input_pmf))
        s[K.S_IN_SD] = math.sqrt(spread)
        s[K.S_PAD] = profile.mean_encode_padding
    axes = np.array([profile.log2_batch0, profile.log2_len0])
    return Scenario(profile, cluster, dist, s, axes, iters_pmf, batch_relation)


def evaluate(
    sc: Scenario,
    policy: Policy,
    degree: int,
    tp_workers: int,
    x1: int,
    x2: int,
    encode_workers: int = 0,
    cap: int = 0,
) -> K.Point:
    """Raw kernel call: (queries/s, latency, decode batch, bytes/device, encode devices).

    x1 is B_E (RRA, WAA) or the batch (STATIC, CONTINUOUS); x2 is N_D (RRA) or the number
    of decoder micro-batches (WAA), ignored otherwise. cap caps RRA's and WAA's running
    batch (the engine's max_batch; 0: uncapped, as the search explores it).
    """
    k1, kd = sc.tp_index(1) if 1 in sc.profile.tps else 0, sc.tp_index(degree)
    t, a, s = sc.profile.tables, sc.axes, sc.vector
    if policy is Policy.RRA:
        return K.rra_point(
            t,
            a,
            s,
            sc.iters_pmf,
            k1,
            kd,
            degree,
            tp_workers,
            x1,
            x2,
            sc.batch_relation == "paper",
            cap,
        )
    if policy in (Policy.WAA_C, Policy.WAA_M):
        by_memory = policy is Policy.WAA_M
        return K.waa_point(t, a, s, k1, kd, degree, x1, x2, by_memory, encode_workers, cap)
    if policy is Policy.STATIC:
        return K.static_point(t, a, s, sc.iters_pmf, k1, kd, degree, x1)
    return K.continuous_point(t, a, s, k1, kd, degree, x1)


def to_prediction(
    sc: Scenario, schedule: Schedule, point: K.Point, slo_s: float | None
) -> Prediction:
    """Wrap a kernel result, and record the prediction in the schedule."""
    rate, latency, batch, memory, _ = point
    bound = math.inf if slo_s is None else slo_s
    planned = replace(schedule, predicted_throughput_req_s=rate, predicted_latency_s=latency)
    return Prediction(
        schedule=planned,
        throughput_req_s=rate,
        throughput_tok_s=rate * sc.dist.mean_output,
        latency_s=latency,
        decode_batch=batch,
        memory_bytes_per_device=memory,
        fits_memory=memory <= sc.cluster.usable_memory_bytes,
        meets_bound=latency <= bound,
    )


def simulate(
    profile: Profile,
    cluster: Cluster,
    dist: LengthDistribution,
    schedule: Schedule,
    *,
    slo_s: float | None = None,
    batch_relation: BatchRelation = "little",
    model: Execution = "engine",
) -> Prediction:
    """Predict one schedule's throughput, latency and feasibility on a cluster."""
    sc = build_scenario(profile, cluster, dist, batch_relation=batch_relation, model=model)
    return simulate_in(sc, schedule, slo_s=slo_s)


def simulate_in(sc: Scenario, schedule: Schedule, *, slo_s: float | None = None) -> Prediction:
    """`simulate` on a prebuilt scenario (the solver's path)."""
    if schedule.num_workers != sc.cluster.num_devices:
        raise PlanningError(
            f"schedule spans {schedule.num_workers} workers, the cluster has "
            f"{sc.cluster.num_devices}"
        )
    if schedule.tp_degree > sc.cluster.devices_per_node:
        raise PlanningError("tensor parallelism cannot span nodes")
    x2 = schedule.decode_iters if schedule.policy is Policy.RRA else schedule.decode_microbatches
    x1 = schedule.max_batch if schedule.policy is Policy.CONTINUOUS else schedule.encode_batch
    point = evaluate(
        sc,
        schedule.policy,
        schedule.tp_degree,
        schedule.tp_workers,
        x1,
        x2,
        schedule.encode_workers,
        cap=schedule.max_batch,
    )
    return to_prediction(sc, schedule, point, slo_s)


@dataclass(frozen=True)
class DiscreteResult:
    """A discrete-event run: steady-state rate, mean decode batch, p99 end-to-end latency."""

    throughput_req_s: float
    mean_decode_batch: float
    p99_latency_s: float


def simulate_discrete(
    profile: Profile,
    cluster: Cluster,
    dist: LengthDistribution,
    schedule: Schedule,
    *,
    num_queries: int = 20000,
    seed: int | np.random.Generator = 0,
    model: Execution = "engine",
) -> DiscreteResult:
    """Run RRA or CONTINUOUS query by query, lengths drawn from `dist` (for checking)."""
    sc = build_scenario(profile, cluster, dist, model=model)
    rng = np.random.default_rng(seed)
    ins, outs = dist.sample(num_queries, rng)
    iters = outs - 1 if model == "engine" else outs
    k1 = sc.tp_index(1) if 1 in profile.tps else 0
    kd = sc.tp_index(schedule.tp_degree)
    d = schedule.tp_degree
    t, a, s = profile.tables, sc.axes, sc.vector
    if schedule.policy is Policy.RRA:
        warmup = 2 * math.ceil(dist.max_output / schedule.decode_iters) + 2
        row = K.rra_des(
            t,
            a,
            s,
            k1,
            kd,
            d,
            schedule.tp_workers,
            schedule.encode_batch,
            schedule.decode_iters,
            schedule.max_batch,
            ins,
            iters,
            warmup,
        )
    elif schedule.policy is Policy.CONTINUOUS:
        row = K.continuous_des(
            t, a, s, k1, kd, d, schedule.max_batch, ins, iters, 2 * dist.max_output
        )
    else:
        raise PlanningError(f"no discrete-event model for {schedule.policy.value}")
    if row[3] < 10:
        raise PlanningError("too few queries for a steady state; raise num_queries")
    return DiscreteResult(float(row[0]), float(row[1]), float(row[2]))
