"""Latency bound -> Schedule, from a small table of measured configurations.

Until the adaptive controller re-solves schedules online, a new SLO is served by a table
lookup: among the rows of the requested policy whose measured latency meets the bound, take
the one with the highest measured throughput; when none meets it, take the lowest-latency
row and say so (`is_feasible` False), because refusing the update would leave an even
slower schedule in place.

Source of the numbers: PROVISIONAL. They are not yet measured on this engine; they were
set by hand so that latency and throughput both grow with B_E and N_D (the monotonicity the
paper's solver relies on), at SmolLM2-135M scale on a 2-core CPU (ECOSYSTEM.md baselines:
~250-400 output tokens/s at batch 32). The lead refills them from `exegpt bench offline`;
keep the row format, and replace SOURCE with the command and date of the measurement.
This module stays torch-free so it can be read without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptive.schedule import Policy, Schedule

SOURCE = "provisional hand-set table (engine/slo_table.py), pending `exegpt bench offline`"


@dataclass(frozen=True)
class SloRow:
    schedule: Schedule
    latency_s: float  # measured p99 query latency (paper's definition) under this schedule
    throughput_req_s: float


def _rra(encode_batch: int, decode_iters: int, latency_s: float, req_s: float) -> SloRow:
    schedule = Schedule(
        Policy.RRA,
        encode_batch=encode_batch,
        decode_iters=decode_iters,
        max_batch=64,
        predicted_latency_s=latency_s,
        predicted_throughput_req_s=req_s,
    )
    return SloRow(schedule, latency_s, req_s)


def _simple(policy: Policy, batch: int, latency_s: float, req_s: float) -> SloRow:
    schedule = Schedule(
        policy,
        encode_batch=batch,
        max_batch=batch,
        predicted_latency_s=latency_s,
        predicted_throughput_req_s=req_s,
    )
    return SloRow(schedule, latency_s, req_s)


TABLE: tuple[SloRow, ...] = (
    _rra(1, 1, 2.0, 0.6),
    _rra(4, 2, 3.0, 1.6),
    _rra(8, 4, 4.5, 2.6),
    _rra(16, 8, 7.0, 3.6),
    _rra(32, 16, 11.0, 4.4),
    _rra(64, 32, 18.0, 5.0),
    _simple(Policy.CONTINUOUS, 8, 3.5, 2.0),
    _simple(Policy.CONTINUOUS, 32, 8.0, 3.8),
    _simple(Policy.CONTINUOUS, 64, 14.0, 4.6),
    _simple(Policy.STATIC, 8, 5.0, 1.5),
    _simple(Policy.STATIC, 32, 12.0, 2.5),
)


@dataclass(frozen=True)
class SloChoice:
    schedule: Schedule
    is_feasible: bool
    source: str


def choose_schedule(policy: Policy, latency_s: float | None, max_num_seqs: int) -> SloChoice:
    """The best table row of `policy` for the bound (None: no bound), capped to the KV slots."""
    rows = [row for row in TABLE if row.schedule.policy == policy]
    if not rows:
        # WAA needs several workers and has no measurements yet.
        raise ValueError(f"no measured configurations for policy {policy.value!r}")
    feasible = [r for r in rows if latency_s is None or r.latency_s <= latency_s]
    if feasible:
        row = max(feasible, key=lambda r: r.throughput_req_s)
    else:
        row = min(rows, key=lambda r: r.latency_s)
    return SloChoice(_cap(row.schedule, max_num_seqs), bool(feasible), SOURCE)


def _cap(schedule: Schedule, max_num_seqs: int) -> Schedule:
    # A schedule cannot batch more queries than there are KV slots.
    return Schedule(
        schedule.policy,
        encode_batch=min(schedule.encode_batch, max_num_seqs),
        decode_iters=schedule.decode_iters,
        max_batch=min(schedule.max_batch, max_num_seqs),
        predicted_latency_s=schedule.predicted_latency_s,
        predicted_throughput_req_s=schedule.predicted_throughput_req_s,
    )
