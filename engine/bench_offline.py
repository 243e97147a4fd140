"""The paper's offline evaluation (section 7.1) on this machine.

All queries of a workload are present at time zero; each policy runs them to completion
once per knob setting. A query's latency runs from the start of its encoding to its last
token (so queueing before the first scheduling is not counted, as in the paper); throughput
is queries (and output tokens) over the run's makespan. The latency bounds are the 10th,
30th and 70th percentiles of static batching's p99 latencies over batch sizes 4, 8, 16, 32,
plus unbounded; for each policy and bound the best throughput whose p99 meets the bound
is reported, or nothing ("NS", not satisfiable) when no setting meets it.

WAA (2 workers or more) sweeps B_E, the decoder micro-batches and the encode/decode split;
its query latency starts when the query is handed to the encode workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptive.schedule import Policy, Schedule
from engine.efficiency import ModelWork, StepProfile, needed_tokens, profile_steps
from engine.llm_engine import EngineConfig, LLMEngine, StepTiming, default_schedule
from engine.model_loader import LoadedModel
from engine.sampling import SamplingParams
from engine.workloads import Query

logger = logging.getLogger(__name__)

BOUND_BATCHES = (4, 8, 16, 32)  # static batch sizes the bounds are derived from
BOUND_PERCENTILES = (10, 30, 70)
ENGINE_POLICIES = ("static", "continuous", "rra")  # run on any number of workers
# encode and decode on separate workers (2 or more). The sweep tries every split, so both
# run the same settings: they differ only in how a planner picks the split.
WAA_POLICIES = ("waa_c", "waa_m")


@dataclass(frozen=True)
class KnobGrid:
    static: tuple[int, ...]  # batch sizes (must include BOUND_BATCHES)
    continuous: tuple[int, ...]  # max running batch
    rra: tuple[tuple[int, int], ...]  # (B_E, N_D)
    rra_max_batch: int  # cap on RRA's running decode batch
    waa: tuple[int, ...] = ()  # B_E (micro-batches and splits follow from the workers)
    waa_max_batch: int = 0  # cap on WAA's running decode batch

    def __post_init__(self) -> None:
        missing = set(BOUND_BATCHES) - set(self.static)
        if missing:
            raise ValueError(f"static batch sizes must include {sorted(missing)} (bounds)")

    @property
    def max_batch(self) -> int:
        return max(*self.static, *self.continuous, self.rra_max_batch, self.waa_max_batch)


# RRA's admission rate is B_E / N_D queries per iteration: small rates keep the running batch
# and every step short (tight bounds), large ones fill the batch (throughput).
FULL_GRID = KnobGrid(
    static=(4, 8, 16, 32, 64),
    continuous=(4, 8, 16, 32, 64),
    rra=tuple((be, nd) for be in (1, 2, 4, 8, 16, 32) for nd in (1, 2, 4, 8, 16)),
    rra_max_batch=64,
    waa=(1, 2, 4, 8, 16, 32),
    waa_max_batch=64,
)
QUICK_GRID = KnobGrid(
    static=BOUND_BATCHES,
    continuous=(8, 16, 32),
    rra=((1, 2), (1, 4), (1, 8), (2, 4), (4, 4), (8, 4), (16, 4)),
    rra_max_batch=32,
    waa=(1, 2, 4, 8, 16),
    waa_max_batch=32,
)


@dataclass(frozen=True)
class RunWork:
    """What a run computed against what its queries needed (engine.efficiency)."""

    needed_tokens: int  # every prompt token and every decode input, once
    # token rows the run computed, padding and held rows included; None: a peer server
    # that does not report it
    computed_tokens: int | None
    useful_flops: float  # FLOPs the queries need, however they are batched

    @classmethod
    def of(
        cls, loaded: LoadedModel, queries: Sequence[Query], computed_tokens: int | None
    ) -> RunWork:
        useful = ModelWork.of(loaded).workload_flops(queries)
        return cls(needed_tokens(queries), computed_tokens, useful)


@dataclass(frozen=True)
class RunResult:
    """One policy with one knob setting, run over the whole workload."""

    policy: str  # static | continuous | rra | hf_generate
    task: str
    knobs: dict[str, int]
    latencies_s: tuple[float, ...] = field(repr=False)
    makespan_s: float
    num_output_tokens: int
    work: RunWork
    # when each query finished, seconds from the run's start (same order as latencies_s),
    # and every engine step's shape and time; empty where the runner does not record them
    finish_times_s: tuple[float, ...] = field(default=(), repr=False)
    steps: tuple[StepTiming, ...] = field(default=(), repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.latencies_s)

    def steady_state(self, trim: float = 0.25) -> tuple[float, float]:
        """Queries/s and p99 latency away from the run's ramp-up and drain.

        A run that queues every query at time zero fills its batch at the start and
        empties it at the end; a planner predicts the state in between. The window runs
        from the finish of the first `trim` share of queries to the finish of the last
        `trim` share; its throughput counts the queries finishing inside, its p99 is theirs.
        """
        if len(self.finish_times_s) != self.num_requests:
            raise ValueError(f"{self.policy} run has no finish times")
        order = np.argsort(self.finish_times_s)
        lo = int(len(order) * trim)
        hi = len(order) - 1 - lo
        if hi - lo < 2:
            raise ValueError(f"{self.num_requests} queries are too few for a steady window")
        finish = np.asarray(self.finish_times_s)[order]
        inside = np.asarray(self.latencies_s)[order][lo + 1 : hi + 1]
        return (hi - lo) / float(finish[hi] - finish[lo]), float(np.percentile(inside, 99))

    @property
    def throughput_req_s(self) -> float:
        return self.num_requests / self.makespan_s

    @property
    def throughput_tok_s(self) -> float:
        return self.num_output_tokens / self.makespan_s

    def latency_percentile_s(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q))

    def summary(self) -> dict[str, Any]:
        # unrounded: a record must compare against its bound exactly as the selection did
        return {
            "policy": self.policy,
            "task": self.task,
            "knobs": dict(self.knobs),
            "throughput_req_s": self.throughput_req_s,
            "throughput_tok_s": self.throughput_tok_s,
            "p50_latency_s": self.latency_percentile_s(50),
            "p99_latency_s": self.latency_percentile_s(99),
            "num_requests": self.num_requests,
            "makespan_s": self.makespan_s,
            "useful_token_share": (
                None
                if self.work.computed_tokens is None
                else self.work.needed_tokens / self.work.computed_tokens
            ),
            "useful_gflop_s": self.work.useful_flops / self.makespan_s / 1e9,
        }


def schedule_for(policy: str, knobs: dict[str, int], num_workers: int = 1) -> Schedule:
    if policy == "static":
        batch = knobs["batch_size"]
        return Schedule(Policy.STATIC, encode_batch=batch, max_batch=batch)
    if policy == "continuous":
        return Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=knobs["max_batch"])
    if policy == "rra":
        return Schedule(
            Policy.RRA,
            encode_batch=knobs["encode_batch"],
            decode_iters=knobs["decode_iters"],
            max_batch=knobs["max_batch"],
        )
    if policy in WAA_POLICIES:
        return Schedule(
            Policy(policy),
            encode_batch=knobs["encode_batch"],
            max_batch=knobs["max_batch"],
            decode_microbatches=knobs["decode_microbatches"],
            num_workers=num_workers,
            encode_workers=knobs["encode_workers"],
        )
    raise ValueError(
        f"unknown engine policy {policy!r}; choose from {ENGINE_POLICIES + WAA_POLICIES}"
    )


def knob_settings(
    policy: str, grid: KnobGrid, num_workers: int = 1, tp_degree: int = 1
) -> list[dict[str, int]]:
    if policy == "static":
        return [{"batch_size": b} for b in grid.static]
    if policy == "continuous":
        return [{"max_batch": m} for m in grid.continuous]
    if policy == "rra":
        return [
            {"encode_batch": be, "decode_iters": nd, "max_batch": grid.rra_max_batch}
            for be, nd in grid.rra
        ]
    if policy in WAA_POLICIES:
        return [
            {
                "encode_batch": be,
                "decode_microbatches": micro,
                "encode_workers": encode,
                "max_batch": grid.waa_max_batch,
            }
            for encode in waa_splits(policy, num_workers, tp_degree)
            # one micro-batch, or one per decode stage
            for micro in sorted({1, (num_workers - encode) // tp_degree})
            for be in grid.waa
        ]
    raise ValueError(
        f"unknown engine policy {policy!r}; choose from {ENGINE_POLICIES + WAA_POLICIES}"
    )


def waa_splits(policy: str, num_workers: int, tp_degree: int) -> list[int]:
    """The encode worker counts WAA can run with on these workers: whole TP groups on
    either side."""
    if num_workers < 2:
        raise ValueError(
            f"policy {policy} runs encode and decode on separate workers: it needs "
            f"--workers 2 or more, got {num_workers}"
        )
    splits = list(range(tp_degree, num_workers, tp_degree))
    if not splits:
        raise ValueError(f"{num_workers} workers in TP groups of {tp_degree} leave no WAA split")
    return splits


def make_engine(
    loaded: LoadedModel,
    queries: Sequence[Query],
    max_batch: int,
    num_threads: int | None = None,
    carry_decode: bool = True,
    num_workers: int = 1,
    tp_degree: int = 1,
    schedule: Schedule | None = None,
) -> LLMEngine:
    """One engine per workload and worker split, reused by every run whose schedule splits
    the workers alike (`schedule`: the first; WAA's split lasts the engine's life); the
    caller closes it (it may hold worker processes)."""
    config = EngineConfig(
        model=loaded.name,
        dtype=str(loaded.dtype).removeprefix("torch."),
        max_num_seqs=max_batch,
        max_model_len=max(q.prompt_len + q.output_len for q in queries),
        detokenize=False,  # the bench counts tokens; text would only add CPU time
        num_threads=num_threads,  # global: HF generate later runs with the same count
        carry_decode=carry_decode,
        num_workers=num_workers,
        tp_degree=tp_degree,
        schedule=schedule or default_schedule(),
    )
    return LLMEngine(config, model=loaded)


def run_engine(
    engine: LLMEngine,
    task: str,
    policy: str,
    knobs: dict[str, int],
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    run_id: str,
) -> RunResult:
    """Run every query under one schedule; all are queued before the first step."""
    if engine.has_unfinished():
        raise RuntimeError("the engine must be idle before a benchmark run")
    # idle: applies at the first step
    engine.set_schedule(schedule_for(policy, knobs, engine.config.num_workers))
    latencies: list[float] = []
    finished_at: list[float] = []
    steps: list[StepTiming] = []
    num_tokens = 0
    computed_before = engine.counters.computed_tokens
    start = time.monotonic()
    for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        params = SamplingParams(max_tokens=query.output_len, ignore_eos=True)
        engine.add_request(f"{run_id}-{i}", prompt, params)
    while engine.has_unfinished():
        outputs = engine.step()
        if engine.last_step is not None:  # taken, so a step that ran nothing adds none
            steps.append(engine.last_step)
            engine.last_step = None
        for out in outputs:
            if not out.finished:
                continue
            if out.encode_start_time is None or out.finish_time is None:
                raise RuntimeError(f"request {out.request_id} finished without timestamps")
            latencies.append(out.finish_time - out.encode_start_time)
            finished_at.append(out.finish_time - start)
            num_tokens += out.num_output_tokens
    makespan = time.monotonic() - start
    expected = sum(q.output_len for q in queries)
    if len(latencies) != len(queries) or num_tokens != expected:
        raise RuntimeError(
            f"{run_id}: {len(latencies)}/{len(queries)} queries finished, "
            f"{num_tokens}/{expected} tokens"
        )
    work = RunWork.of(engine.model, queries, engine.counters.computed_tokens - computed_before)
    return RunResult(
        policy,
        task,
        dict(knobs),
        tuple(latencies),
        makespan,
        num_tokens,
        work,
        tuple(finished_at),
        tuple(steps),
    )


def profile_run(
    engine: LLMEngine,
    policy: str,
    knobs: dict[str, int],
    prompts: Sequence[list[int]],
    queries: Sequence[Query],
    max_steps: int,
) -> StepProfile:
    """Where the steps of one schedule spend their time: the first `max_steps` of a run."""
    if engine.has_unfinished():
        raise RuntimeError("the engine must be idle before a profiled run")
    engine.set_schedule(schedule_for(policy, knobs, engine.config.num_workers))
    ids = [f"profile-{i}" for i in range(len(queries))]
    for request_id, query, prompt in zip(ids, queries, prompts, strict=True):
        engine.add_request(
            request_id, prompt, SamplingParams(max_tokens=query.output_len, ignore_eos=True)
        )
    result = profile_steps(engine, max_steps)
    for request_id in ids:  # the rest of the workload is not needed
        engine.abort_request(request_id)
    while engine.has_unfinished():
        engine.step()
    return result


# -- bounds and selection ----------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    label: str  # "p10" | "p30" | "p70" | "none"
    latency_s: float | None  # None: unbounded


def latency_bounds(static_runs: Sequence[RunResult], policy: str = "static") -> list[Bound]:
    """The paper's bounds: percentiles of a static-batching policy's p99 latencies at
    BOUND_BATCHES (exegpt's `static`, or `hf_generate`)."""
    p99s = [
        r.latency_percentile_s(99)
        for r in static_runs
        if r.policy == policy and r.knobs["batch_size"] in BOUND_BATCHES
    ]
    if len(p99s) != len(BOUND_BATCHES):
        raise ValueError(f"bounds need {policy} runs at batch sizes {BOUND_BATCHES}")
    bounds = [Bound(f"p{q}", float(np.percentile(p99s, q))) for q in BOUND_PERCENTILES]
    return [*bounds, Bound("none", None)]


def best_under_bound(runs: Sequence[RunResult], bound: Bound) -> RunResult | None:
    """The highest-throughput run whose p99 latency meets the bound, or None."""
    feasible = [
        r for r in runs if bound.latency_s is None or r.latency_percentile_s(99) <= bound.latency_s
    ]
    return max(feasible, key=lambda r: r.throughput_req_s, default=None)


def selection_records(
    runs: Sequence[RunResult], bounds: Sequence[Bound], task: str, policies: Sequence[str]
) -> list[dict[str, Any]]:
    """One record per (policy, bound); an unsatisfiable bound has null knobs and figures."""
    records = []
    for policy in policies:
        mine = [r for r in runs if r.policy == policy and r.task == task]
        for bound in bounds:
            best = best_under_bound(mine, bound)
            base = {
                "policy": policy,
                "task": task,
                "bound": bound.label,
                "latency_bound_s": bound.latency_s,
            }
            if best is None:
                empty = dict.fromkeys(
                    (
                        "knobs",
                        "throughput_req_s",
                        "throughput_tok_s",
                        "p50_latency_s",
                        "p99_latency_s",
                        "useful_token_share",
                        "useful_gflop_s",
                    )
                )
                num = mine[0].num_requests if mine else 0
                records.append({**base, **empty, "num_requests": num})
            else:
                summary = best.summary()
                summary.pop("makespan_s")
                records.append({**summary, **base})
    return records
