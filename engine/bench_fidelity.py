"""`exegpt bench fidelity`: the planner's predictions against the engine's measurements.

1. Profile this machine for the model (engine/profiler.py; `--quick`: the small grid),
   or read a profile made earlier (`--profile`).
2. Run the offline bench's knob grid on the engine (engine/bench.py `sweep`: every query
   queued at time zero, each schedule run to completion), then the planner's own RRA
   choice at each of the paper's bounds (adaptive/search.py over that profile).
3. For every schedule, the simulator (adaptive/simulator.py) predicts throughput and
   latency from the profile and the workload's length histograms; the report puts them
   beside what was measured, with the relative error (predicted - measured) / measured.

With `--workers N` the engine runs over N model workers (engine/workers.py) and the
planner prices the same schedules on an N-device cluster: RRA with the layers in N
pipeline stages, and WAA (`waa_c`, every split the sweep tries) with encode and decode
workers. The profile is measured with the threads one worker gets (threads / N), since
each worker computes on its share of the cores; links between workers are priced as free
(loopback), so the hand-over and the stage-to-stage sends are the model's blind spot.

What the two sides mean: the simulator predicts a steady state (throughput; the latency
of a query of the p99 output length, from its encoding to its last token). The engine
runs a finite workload queued at time zero, so the measured side is taken in its steady
window (`RunResult.steady_state`: the middle half of the finishes, without the ramp-up
and the drain); the whole-run figures are in the JSON beside them. The window needs
several times more queries than the largest batch, hence the default of 256.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from adaptive.cluster import GIB, Cluster, Link
from adaptive.distributions import LengthDistribution
from adaptive.errors import PlanningError
from adaptive.profile import Profile, parse_profile
from adaptive.schedule import Policy, Schedule
from adaptive.search import solve
from adaptive.serving import ServingTarget
from adaptive.simulator import simulate
from engine.bench import sweep
from engine.bench_offline import (
    ENGINE_POLICIES,
    FULL_GRID,
    QUICK_GRID,
    Bound,
    KnobGrid,
    RunResult,
    latency_bounds,
    make_engine,
    run_engine,
    schedule_for,
)
from engine.model_loader import LoadedModel, load_model
from engine.profiler import QUICK, ProfileOptions, profile_model
from engine.reports import write_report
from engine.workloads import Query, make_prompts, task_queries

LOCAL = Link(1e12, 0.0)  # one device: no link is ever crossed


def machine_cluster(profile: Profile, num_workers: int = 1) -> Cluster:
    """This machine as a cluster of its model workers; each one's memory from the profile
    (RAM on a CPU), links free."""
    memory = profile.device_memory_bytes or 64 * GIB
    return Cluster(
        num_workers, num_workers, memory, LOCAL, LOCAL, memory_reserve=0.0, name="this machine"
    )


def machine_profile(
    loaded: LoadedModel,
    queries: Sequence[Query],
    max_batch: int,
    *,
    quick: bool,
    path: Path | None,
) -> dict[str, Any]:
    """The profile file at `path`, else this machine measured (call before any engine
    uses the model, with the engine's thread count set), its lengths cut to the workload's
    and its batches reaching the runs' `max_batch`: past its grid a profile is extrapolated
    linearly in batch, which prices a memory-bound decode step at twice the batch about
    twice as high as it measures."""
    if path is not None:
        raw: dict[str, Any] = json.loads(path.read_text())
        return raw
    longest = max(q.prompt_len + q.output_len for q in queries)
    base = QUICK if quick else ProfileOptions()
    max_len = max(base.min_len, min(base.max_len, _pow2(longest)))
    batches = max(base.max_batch, _pow2(max_batch))
    return profile_model(loaded, replace(base, max_len=max_len, max_batch=batches))


# a row's measured side beside the steady state, kept for --replay; "steps" are the run's
# step shapes (`step_shapes`), which a replay prices again
MEASURED_KEYS = ("whole_run_req_s", "whole_run_p99_latency_s", "steps")
RATIO_KEYS = ("encode_step_ratio", "decode_step_ratio")


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def planned_knobs(
    profile: Profile, cluster: Cluster, dist: LengthDistribution, bound: Bound, max_batch: int
) -> dict[str, int] | None:
    """The planner's RRA schedule for the bound as engine knobs, capped to the KV rows;
    None when no RRA schedule is predicted to meet it."""
    try:
        plan = solve(profile, cluster, dist, bound.latency_s, policies=(Policy.RRA,))
    except PlanningError:
        return None
    s = plan.schedule
    return {
        "encode_batch": min(s.encode_batch, max_batch),
        "decode_iters": s.decode_iters,
        "max_batch": min(s.max_batch, max_batch),
    }


StepShape = list[float]  # [is_encode (1 or 0), batch, mean length, steps, seconds in all]


def step_shapes(run: RunResult) -> list[StepShape]:
    """The run's steps, those of one shape (length to a tenth of a token) summed."""
    shapes: dict[tuple[int, int, float], list[float]] = {}
    for t in run.steps:
        total = shapes.setdefault((int(t.is_encode), t.batch, round(t.length, 1)), [0, 0.0])
        total[0] += 1
        total[1] += t.seconds
    return [[*shape, count, seconds] for shape, (count, seconds) in sorted(shapes.items())]


def step_time_ratios(target: ServingTarget, shapes: Sequence[StepShape]) -> dict[str, float | None]:
    """Measured over profile-predicted time of the run's encoding and decoding steps, each
    step priced at its own batch and length: where this is near 1 and the schedule's
    figures are not, the error lies in the schedule model, not in the layer times."""
    ratios: dict[str, float | None] = {}
    for name, is_encode in zip(RATIO_KEYS, (True, False), strict=True):
        steps = [s for s in shapes if bool(s[0]) is is_encode]
        predicted = sum(
            count * target.step_seconds(is_encode, int(batch), length)
            for _, batch, length, count, _ in steps
        )
        ratios[name] = sum(s[4] for s in steps) / predicted if steps else None
    return ratios


def compare_run(
    profile: Profile, cluster: Cluster, dist: LengthDistribution, run: RunResult, source: str
) -> dict[str, Any]:
    """One schedule's prediction beside its measurement."""
    measured = {
        "whole_run_req_s": run.throughput_req_s,
        "whole_run_p99_latency_s": run.latency_percentile_s(99),
        "steps": step_shapes(run),
    }
    steady = run.steady_state()
    return predict_row(profile, cluster, dist, run.policy, run.knobs, source, steady, measured)


def run_schedule(policy: str, knobs: dict[str, int], cluster: Cluster) -> Schedule:
    workers = cluster.num_devices
    return replace(schedule_for(policy, knobs, workers), num_workers=workers)


def predict_row(
    profile: Profile,
    cluster: Cluster,
    dist: LengthDistribution,
    policy: str,
    knobs: dict[str, int],
    source: str,
    steady: tuple[float, float],
    measured: dict[str, Any],
) -> dict[str, Any]:
    """The simulator's prediction for a measured run (its steady-state req/s and p99, its
    step shapes in `measured`), raw and refit to the run's own step times. A report from
    before step shapes were kept carries only the ratios its simulator computed."""
    schedule = run_schedule(policy, knobs, cluster)
    predicted = simulate(profile, cluster, dist, schedule)
    measured_req_s, measured_p99 = steady
    target = ServingTarget(profile, schedule.max_batch, Policy.RRA)
    ratios = (
        step_time_ratios(target, measured["steps"])
        if "steps" in measured
        else {key: measured[key] for key in RATIO_KEYS}
    )
    # the profile refit to the run's own step times, as the controller refits it online:
    # what is left of the error lies in the schedule model, not in the layer times
    scales = (ratios["encode_step_ratio"] or 1.0, ratios["decode_step_ratio"] or 1.0)
    refit = simulate(target.scaled(*scales), cluster, dist, schedule)
    return {
        "schedule": schedule.describe(),
        "policy": policy,
        "knobs": dict(knobs),
        "source": source,
        "predicted_req_s": predicted.throughput_req_s,
        "measured_req_s": measured_req_s,
        "throughput_error": relative_error(predicted.throughput_req_s, measured_req_s),
        "predicted_p99_latency_s": predicted.latency_s,
        "measured_p99_latency_s": measured_p99,
        "latency_error": relative_error(predicted.latency_s, measured_p99),
        "refit_req_s": refit.throughput_req_s,
        "refit_throughput_error": relative_error(refit.throughput_req_s, measured_req_s),
        "refit_p99_latency_s": refit.latency_s,
        "refit_latency_error": relative_error(refit.latency_s, measured_p99),
        **measured,
        **ratios,
    }


def replay(report: dict[str, Any]) -> dict[str, Any]:
    """A saved report's rows predicted again by this simulator, from the profile the report
    was measured against: a change to the model is judged on the same measurements, free of
    the machine's drift between runs."""
    if "profile" not in report:
        raise ValueError("this report has no profile (written before --replay existed)")
    profile = parse_profile(report["profile"], source=str(report["profile"].get("model")))
    cluster = machine_cluster(profile, report["num_workers"])
    queries = task_queries(report["task"], report["num_queries"], report["seed"], report["scale"])
    dist = queries_distribution(queries, report["task"])
    rows = []
    for row in report["rows"]:
        steady = (row["measured_req_s"], row["measured_p99_latency_s"])
        measured = {key: row[key] for key in (*MEASURED_KEYS, *RATIO_KEYS) if key in row}
        policy, knobs, source = row["policy"], row["knobs"], row["source"]
        rows.append(predict_row(profile, cluster, dist, policy, knobs, source, steady, measured))
    return report | {"rows": rows, "summary": error_summary(rows)}


def queries_distribution(queries: Sequence[Query], task: str) -> LengthDistribution:
    return LengthDistribution.from_samples(
        [q.prompt_len for q in queries], [q.output_len for q in queries], name=task
    )


ERRORS = {  # a row's error keys, and their labels in the printed summary
    "throughput_error": "throughput",
    "latency_error": "p99 latency",
    "refit_throughput_error": "refit throughput",
    "refit_latency_error": "refit p99 latency",
}


def error_summary(rows: Sequence[dict[str, Any]], within: float = 0.10) -> dict[str, Any]:
    """Mean absolute relative error, and the share of schedules within `within`."""
    out: dict[str, Any] = {"within": within}
    for key in ERRORS:
        errors = [abs(r[key]) for r in rows]
        out[key] = {
            "mean_abs": sum(errors) / len(errors) if errors else None,
            "max_abs": max(errors, default=None),
            "share_within": sum(e <= within for e in errors) / len(errors) if errors else None,
        }
    return out


def measure_fidelity(
    loaded: LoadedModel,
    task: str,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    grid: KnobGrid,
    raw_profile: dict[str, Any],
    *,
    num_threads: int | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid and the planner's choices; the report with one row per schedule (on
    several workers: RRA's and WAA's; static batching still runs, for the bounds)."""
    profile = parse_profile(raw_profile, source=str(raw_profile.get("model")))
    cluster = machine_cluster(profile, num_workers)
    policies = ENGINE_POLICIES if num_workers == 1 else ("rra", "waa_c")
    dist = queries_distribution(queries, task)
    # the simulator models the paper's strict alternation of encoding and decoding, so the
    # engine runs that form here (serving carries decoding through encoding phases)
    runs = sweep(
        loaded, task, queries, prompts, policies, grid, num_threads=num_threads,
        carry_decode=False, progress=progress, num_workers=num_workers,
    )  # fmt: skip
    rows = [
        compare_run(profile, cluster, dist, run, "grid") for run in runs if run.policy in policies
    ]
    bounds = latency_bounds(runs)
    with make_engine(loaded, queries, grid.max_batch, num_threads, False, num_workers) as engine:
        for bound in bounds:
            knobs = planned_knobs(profile, cluster, dist, bound, grid.max_batch)
            if knobs is None:
                continue
            run_id = f"{task}-plan-{bound.label}"
            run = run_engine(engine, task, "rra", knobs, queries, prompts, run_id)
            rows.append(compare_run(profile, cluster, dist, run, f"planner@{bound.label}"))
    return {
        "model": loaded.name,
        "task": task,
        "num_queries": len(queries),
        "profile_device": raw_profile.get("device"),
        "profile_num_threads": raw_profile.get("num_threads"),
        "profile": raw_profile,  # what the predictions used: `--replay` predicts again
        "num_workers": num_workers,
        "bounds_s": {b.label: b.latency_s for b in bounds},
        "rows": rows,
        "summary": error_summary(rows),
    }


def print_fidelity(report: dict[str, Any]) -> None:
    print(f"\nfidelity: {report['model']}, task {report['task']}, {report['num_queries']} queries")
    print(
        f"{'schedule':<28} {'source':<12} {'pred req/s':>10} {'meas req/s':>10} {'err':>7} "
        f"{'pred p99':>9} {'meas p99':>9} {'err':>7} {'enc x':>6} {'dec x':>6} "
        f"{'refit err':>9} {'refit p99':>9}"
    )
    for r in report["rows"]:
        print(
            f"{r['schedule']:<28} {r['source']:<12} {r['predicted_req_s']:>10.3f} "
            f"{r['measured_req_s']:>10.3f} {r['throughput_error']:>+7.1%} "
            f"{r['predicted_p99_latency_s']:>9.3f} {r['measured_p99_latency_s']:>9.3f} "
            f"{r['latency_error']:>+7.1%} {_ratio(r['encode_step_ratio'])} "
            f"{_ratio(r['decode_step_ratio'])} {r['refit_throughput_error']:>+9.1%} "
            f"{r['refit_latency_error']:>+9.1%}"
        )
    print("enc x / dec x: measured over predicted time of the run's own encode / decode steps")
    print("refit err / refit p99: the errors with the profile scaled by enc x and dec x")
    s = report["summary"]
    for key, label in ERRORS.items():
        e = s[key]
        print(
            f"{label}: mean |error| {e['mean_abs']:.1%}, max {e['max_abs']:.1%}, "
            f"{e['share_within']:.0%} of schedules within {s['within']:.0%}"
        )


# -- command line ------------------------------------------------------------------------
def add_fidelity_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--task", default="S", help="paper task (S,T,G,C1,C2)")
    parser.add_argument("--num-queries", type=int, default=256)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="small profile grid and small knob grid"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="a profile JSON from `exegpt profile`"
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="model workers; from 2: RRA pipelined and WAA"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="a report written by --json: predict its measured runs again with this "
        "simulator and the report's profile (nothing is run)",
    )
    parser.set_defaults(run=run_fidelity)


def run_fidelity(args: argparse.Namespace) -> int:
    if args.replay is not None:
        report = replay(json.loads(args.replay.read_text()))
        print_fidelity(report)
        if args.json is not None:
            write_report(report, args.json)
        return 0
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    queries = task_queries(args.task, args.num_queries, args.seed, args.scale)
    # profile with the thread count one worker will run with (the profile must match it)
    threads = args.num_threads or os.cpu_count() or 1
    torch.set_num_threads(max(1, threads // args.workers))
    loaded = load_model(args.model, args.dtype)
    grid = QUICK_GRID if args.quick else FULL_GRID
    raw = machine_profile(loaded, queries, grid.max_batch, quick=args.quick, path=args.profile)
    torch.set_num_threads(threads)
    prompts = make_prompts(queries, loaded.vocab_size, args.seed)
    report = measure_fidelity(
        loaded, args.task.upper(), queries, prompts, grid, raw,
        num_threads=args.num_threads, num_workers=args.workers,
    )  # fmt: skip
    report |= {"dtype": args.dtype, "seed": args.seed, "scale": args.scale, "quick": args.quick}
    print_fidelity(report)
    if args.json is not None:
        write_report(report, args.json)
    return 0


def _ratio(value: float | None) -> str:
    return f"{'-':>6}" if value is None else f"{value:>6.2f}"


def _pow2(n: int) -> int:
    """The smallest power of two >= n: the profile grid need not reach past the workload."""
    return 1 << max(0, math.ceil(math.log2(n)))
