"""`exegpt bench`: benchmark programs that print tables and write JSON.

`offline` is the paper's evaluation method (engine/bench_offline.py) with Hugging Face
`generate` as an external reference (engine/bench_hf.py); `serve` is an open-loop load
generator for any OpenAI-compatible server (engine/bench_serve.py); `fidelity` sets the
planner's predictions beside the engine's runs (engine/bench_fidelity.py); `compare` runs
exegpt, Hugging Face `generate` and peer servers side by side (engine/bench_compare.py);
`drift` serves a model under changing traffic and SLO, adaptation on and off
(gateway/bench_drift.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.bench_hf import run_hf_static, warm_up_hf
from engine.bench_offline import (
    ENGINE_POLICIES,
    FULL_GRID,
    QUICK_GRID,
    WAA_POLICIES,
    KnobGrid,
    RunResult,
    knob_settings,
    latency_bounds,
    make_engine,
    profile_run,
    run_engine,
    schedule_for,
    selection_records,
)
from engine.bench_serve import add_serve_bench_arguments
from engine.efficiency import CATEGORIES, StepProfile, measure_ceiling
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.reports import write_report
from engine.workloads import Query, make_prompts, read_lengths, task_queries

logger = logging.getLogger(__name__)

POLICIES = (*ENGINE_POLICIES, *WAA_POLICIES, "hf")
DEFAULT_POLICIES = (*ENGINE_POLICIES, "hf")
Setting = tuple[str, dict[str, int]]  # a policy and its knobs


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_device_argument, add_model_arguments

    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    offline = sub.add_parser("offline", help="the paper's method: best throughput per bound")
    add_model_arguments(offline)
    add_device_argument(offline)
    offline.add_argument(
        "--tasks",
        default="S,C1",
        help="paper tasks, comma-separated (S,T,G,C1,C2); ignored with --lengths",
    )
    offline.add_argument(
        "--lengths",
        type=Path,
        default=None,
        help="JSONL of {prompt_len, output_len} instead of a paper task",
    )
    offline.add_argument("--num-queries", type=int, default=96)
    offline.add_argument("--seed", type=int, default=0)
    offline.add_argument(
        "--scale", type=float, default=1.0, help="multiply all lengths (e.g. 0.25 for a quick run)"
    )
    offline.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated subset of {','.join(POLICIES)} (WAA needs --workers 2 or "
        "more; default %(default)s)",
    )
    offline.add_argument("--quick", action="store_true", help="a small knob grid")
    offline.add_argument("--json", type=Path, default=None, help="write records here")
    offline.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads, shared by the workers (default: all cores)",
    )
    from gateway.cli import add_worker_arguments

    add_worker_arguments(offline)
    offline.add_argument(
        "--strict-alternation",
        action="store_true",
        help="encoding phases do not carry the running batch's decoding iteration "
        "(the paper's form)",
    )
    offline.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        metavar="N",
        help="after the sweep, profile N steps of each policy's best unbounded setting "
        "and print where a step's time goes",
    )
    offline.set_defaults(run=run_offline)
    serve = sub.add_parser("serve", help="open-loop load on an OpenAI-compatible server")
    add_serve_bench_arguments(serve)
    from engine.bench_fidelity import add_fidelity_arguments  # both import this module

    fidelity = sub.add_parser("fidelity", help="simulator predictions against measured runs")
    add_fidelity_arguments(fidelity)
    from engine.bench_compare import add_compare_arguments

    compare = sub.add_parser("compare", help="exegpt against HF generate and peer servers")
    add_compare_arguments(compare)
    from gateway.bench_drift import add_drift_arguments

    add_drift_arguments(
        sub.add_parser(
            "drift", help="a served model under changing lengths and SLO, adaptive vs fixed"
        )
    )


def _workloads(args: argparse.Namespace) -> list[tuple[str, list[Query]]]:
    if args.lengths is not None:
        return [(args.lengths.stem, read_lengths(args.lengths, args.scale))]
    tasks = [t.strip().upper() for t in args.tasks.split(",") if t.strip()]
    return [(t, task_queries(t, args.num_queries, args.seed, args.scale)) for t in tasks]


def _policies(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown or not chosen:
        raise ValueError(f"unknown policies {unknown}; choose from {','.join(POLICIES)}")
    return chosen


def run_offline(args: argparse.Namespace) -> int:
    policies = _policies(args.policies)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for policy in set(policies) & set(WAA_POLICIES):  # a split that cannot be: say so now
        knob_settings(policy, grid, args.workers, args.tp)
    loaded = load_model(args.model, args.dtype)
    workloads = _workloads(args)
    torch.set_num_threads(args.num_threads or os.cpu_count() or 1)
    ceiling = measure_ceiling(loaded.dtype, loaded.device)
    print(
        f"compute ceiling: {ceiling / 1e9:.0f} GFLOP/s ({loaded.dtype} matmul, "
        f"{torch.get_num_threads()} threads)"
    )
    report: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "quick": args.quick,
        "seed": args.seed,
        "scale": args.scale,
        "carry_decode": not args.strict_alternation,
        "num_workers": args.workers,
        "tp_degree": args.tp,
        "ceiling_gflop_s": ceiling / 1e9,
        "tasks": {},
    }
    records: list[dict[str, Any]] = []
    runs: list[RunResult] = []
    for task, queries in workloads:
        prompts = make_prompts(queries, loaded.vocab_size, args.seed)
        task_runs = sweep(
            loaded,
            task,
            queries,
            prompts,
            policies,
            grid,
            num_threads=args.num_threads,
            carry_decode=not args.strict_alternation,
            num_workers=args.workers,
            tp_degree=args.tp,
        )
        bounds = latency_bounds(task_runs)
        names = [("hf_generate" if p == "hf" else p) for p in policies]
        task_records = selection_records(task_runs, bounds, task, names)
        for record in task_records:
            gflop_s = record["useful_gflop_s"]
            record["ceiling_share"] = None if gflop_s is None else gflop_s * 1e9 / ceiling
        print_task_table(task, queries, task_records, task_runs)
        records += task_records
        runs += task_runs
        report["tasks"][task] = {"bounds_s": {b.label: b.latency_s for b in bounds}}
        if args.profile_steps:
            profiles = _profile_policies(loaded, task_records, queries, prompts, args)
            report["tasks"][task]["step_profile"] = profiles
        if args.json is not None:  # after each task: a run stopped later keeps this one
            report |= {"records": records, "runs": [r.summary() for r in runs]}
            write_report(report, args.json)
    return 0


def _profile_policies(
    loaded: Any,
    records: Sequence[dict[str, Any]],
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Each engine policy's best unbounded setting, profiled step by step."""
    best = [
        (r["policy"], r["knobs"])
        for r in records
        if r["bound"] == "none" and r["policy"] in ENGINE_POLICIES + WAA_POLICIES and r["knobs"]
    ]
    if not best:
        return {}
    max_batch = max(_batch_of(knobs) for _, knobs in best)
    profiles = {}
    for group in _by_split(best):
        first = schedule_for(*group[0], args.workers)
        engine = make_engine(
            loaded,
            queries,
            max_batch,
            args.num_threads,
            not args.strict_alternation,
            num_workers=args.workers,
            tp_degree=args.tp,
            schedule=first,
        )
        with engine:
            for policy, knobs in group:
                result = profile_run(engine, policy, knobs, prompts, queries, args.profile_steps)
                print_step_profile(policy, knobs, result)
                profiles[policy] = {"knobs": knobs, **result.as_dict()}
    return profiles


def _batch_of(knobs: dict[str, int]) -> int:
    return knobs.get("max_batch") or knobs["batch_size"]


def _by_split(settings: Sequence[Setting]) -> list[list[Setting]]:
    """The settings grouped by the worker split they need (WAA's encode workers; 0 for the
    other policies), in order: one engine serves each group."""
    splits = sorted({knobs.get("encode_workers", 0) for _, knobs in settings})
    return [[s for s in settings if s[1].get("encode_workers", 0) == split] for split in splits]


def sweep(
    loaded: Any,
    task: str,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    policies: Sequence[str],
    grid: KnobGrid,
    *,
    num_threads: int | None = None,
    carry_decode: bool = True,
    progress: bool = True,
    num_workers: int = 1,
    tp_degree: int = 1,
) -> list[RunResult]:
    """Every knob setting of every chosen policy, plus static's bound-setting batch sizes."""
    plan: list[Setting] = [
        (p, k)
        for p in ENGINE_POLICIES + WAA_POLICIES
        if p in policies
        for k in knob_settings(p, grid, num_workers, tp_degree)
    ]
    if "static" not in policies:  # the bounds always come from static batching
        plan = [("static", k) for k in knob_settings("static", QUICK_GRID)] + plan
    hf_batches = grid.static if "hf" in policies else ()
    bar = tqdm(total=len(plan) + len(hf_batches), desc=f"bench {task}", disable=not progress)
    results: list[RunResult] = []
    for group in _by_split(plan):
        first = schedule_for(*group[0], num_workers)
        engine = make_engine(
            loaded,
            queries,
            grid.max_batch,
            num_threads,
            carry_decode,
            num_workers,
            tp_degree,
            first,
        )
        with engine:
            is_split = bool(group[0][1].get("encode_workers"))
            warm_up(engine, task, queries, prompts, group[0] if is_split else None)
            for policy, knobs in group:
                run_id = f"{task}-{len(results)}"
                results.append(run_engine(engine, task, policy, knobs, queries, prompts, run_id))
                _log_run(results[-1])
                bar.update()
    if hf_batches:
        warm_up_hf(loaded, prompts)
        for batch in hf_batches:
            results.append(run_hf_static(loaded, task, batch, queries, prompts))
            _log_run(results[-1])
            bar.update()
    bar.close()
    return results


def _log_run(result: RunResult) -> None:
    logger.info(
        "%s %s %s: %.3f req/s, p99 %.2f s",
        result.task,
        result.policy,
        result.knobs,
        result.throughput_req_s,
        result.latency_percentile_s(99),
    )


def warm_up(
    engine: LLMEngine,
    task: str,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    setting: Setting | None = None,
) -> None:
    """One-time kernel setup must not land in a measured run: a few queries first, under
    `setting` (default continuous batching; WAA's split workers need a WAA one)."""
    warm = min(8, len(queries))
    policy, knobs = setting or ("continuous", {"max_batch": warm})
    run_engine(engine, task, policy, knobs, queries[:warm], prompts[:warm], f"{task}-warmup")


# -- output ------------------------------------------------------------------------------
def _knobs_text(knobs: dict[str, int] | None) -> str:
    if knobs is None:
        return "NS"
    short = {
        "batch_size": "B",
        "max_batch": "max",
        "encode_batch": "B_E",
        "decode_iters": "N_D",
        "decode_microbatches": "B_m",
        "encode_workers": "enc",
    }
    return " ".join(f"{short.get(k, k)}={v}" for k, v in knobs.items())


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_task_table(
    task: str,
    queries: Sequence[Query],
    records: Sequence[dict[str, Any]],
    runs: Sequence[RunResult],
) -> None:
    mean_in = sum(q.prompt_len for q in queries) / len(queries)
    mean_out = sum(q.output_len for q in queries) / len(queries)
    print(
        f"\ntask {task}: {len(queries)} queries, mean prompt {mean_in:.0f}, "
        f"mean output {mean_out:.0f} tokens"
    )
    print(
        f"{'bound':>5} {'L_B (s)':>8} {'policy':<12} {'knobs':<22} {'req/s':>7} "
        f"{'tok/s':>7} {'p50 (s)':>8} {'p99 (s)':>8} {'x static':>8} {'ceil%':>6} "
        f"{'useful%':>7}"
    )
    static = {r["bound"]: r["throughput_req_s"] for r in records if r["policy"] == "static"}
    for r in sorted(
        records, key=lambda r: (r["latency_bound_s"] is None, r["latency_bound_s"] or 0.0)
    ):
        base = static.get(r["bound"])
        ratio = r["throughput_req_s"] / base if base and r["throughput_req_s"] else None
        print(
            f"{r['bound']:>5} {_num(r['latency_bound_s']):>8} {r['policy']:<12} "
            f"{_knobs_text(r['knobs']):<22} {_num(r['throughput_req_s']):>7} "
            f"{_num(r['throughput_tok_s'], 1):>7} {_num(r['p50_latency_s']):>8} "
            f"{_num(r['p99_latency_s']):>8} {_num(ratio):>8} "
            f"{_percent(r['ceiling_share']):>6} {_percent(r['useful_token_share']):>7}"
        )
    _print_hf_comparison(runs)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}"


def print_step_profile(policy: str, knobs: dict[str, int], result: StepProfile) -> None:
    print(f"  step profile, {policy} {_knobs_text(knobs)} (ms per step):")
    print(f"    {'phase':<7} {'steps':>5} " + " ".join(f"{c:>15}" for c in CATEGORIES))
    for phase, spent in result.ms_per_step.items():
        cells = " ".join(f"{spent[c]:>15.2f}" for c in CATEGORIES)
        print(f"    {phase:<7} {result.steps[phase]:>5} {cells}")


def _print_hf_comparison(runs: Sequence[RunResult]) -> None:
    """Static batching against Hugging Face `generate` at equal batch size."""
    hf = {run.knobs["batch_size"]: run for run in runs if run.policy == "hf_generate"}
    for run in runs:
        ref = hf.get(run.knobs.get("batch_size", -1)) if run.policy == "static" else None
        if ref is not None:
            print(
                f"  static vs HF generate at batch {run.knobs['batch_size']}: "
                f"{run.throughput_req_s:.2f} vs {ref.throughput_req_s:.2f} req/s "
                f"({run.throughput_req_s / ref.throughput_req_s:.2f}x)"
            )
