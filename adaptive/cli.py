"""`exegpt plan`: arguments and entry point (wired into engine/cli.py by the lead).

Exit status 0 on success, 2 on bad input with one line on stderr, never a traceback for
a planning error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adaptive.cluster import GB, GIB, PRESETS, Cluster, Link, preset_cluster
from adaptive.distributions import TASKS, LengthDistribution
from adaptive.errors import PlanningError
from adaptive.profile import load_profile
from adaptive.schedule import Policy
from adaptive.search import EXEGPT_POLICIES, Plan, solve_scenario
from adaptive.simulator import Prediction, Scenario, build_scenario

POLICY_CHOICES: dict[str, tuple[Policy, ...]] = {
    "auto": EXEGPT_POLICIES,
    "rra": (Policy.RRA,),
    "waa": (Policy.WAA_C, Policy.WAA_M),
    "waa_c": (Policy.WAA_C,),
    "waa_m": (Policy.WAA_M,),
    "static": (Policy.STATIC,),
    "continuous": (Policy.CONTINUOUS,),
}


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `exegpt plan`'s options to parser."""
    parser.add_argument("--profile", help="profile JSON, or a model name (e.g. opt-13b)")
    parser.add_argument("--devices", type=int, default=1, help="number of devices")
    parser.add_argument(
        "--cluster",
        choices=sorted(PRESETS),
        default="h100",
        help="links and memory preset (default h100)",
    )
    parser.add_argument("--devices-per-node", type=int, help="override the preset")
    parser.add_argument("--memory-gib", type=float, help="memory per device, GiB")
    parser.add_argument("--intra-gbps", type=float, help="in-node link, GB/s per direction")
    parser.add_argument("--inter-gbps", type=float, help="between-node link, GB/s")
    parser.add_argument("--link-latency-us", type=float, help="per-message latency, us")
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--task", help=f"paper task: {', '.join(TASKS)}")
    lengths.add_argument("--lengths", help="JSONL of {prompt_len, output_len}")
    parser.add_argument("--slo", type=float, help="latency bound in seconds (default: none)")
    parser.add_argument("--policy", choices=sorted(POLICY_CHOICES), default="auto")
    parser.add_argument("--batch-relation", choices=("little", "paper"), default="little")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also run exhaustive search and report whether it agrees (per scenario "
        "with --reproduce-paper)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="JSON output (stdout, or FILE with --reproduce-paper)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="throughput against latency bound per policy"
    )
    parser.add_argument(
        "--reproduce-paper",
        action="store_true",
        help="the paper's evaluation matrix, gains over FasterTransformer",
    )
    parser.add_argument(
        "--profile-set",
        choices=("h100", "h100-cudagraphs"),
        default="h100-cudagraphs",
        help="packaged profiles --reproduce-paper uses (default h100-cudagraphs)",
    )
    parser.add_argument(
        "--h100-compute",
        action="store_true",
        help="--reproduce-paper: keep H100 layer times instead of scaling to A40/A100",
    )


def run_plan(args: argparse.Namespace) -> int:
    """Run `exegpt plan`; returns the exit status."""
    try:
        if args.reproduce_paper:
            return _reproduce(args)
        return _plan(args)
    except PlanningError as exc:
        print(f"exegpt plan: error: {exc}", file=sys.stderr)
        return 2


def _cluster(args: argparse.Namespace) -> Cluster:
    if args.devices < 1:
        raise PlanningError(f"--devices must be >= 1, got {args.devices}")
    base = preset_cluster(args.cluster, args.devices)
    latency = base.intra.latency if args.link_latency_us is None else args.link_latency_us / 1e6
    intra = Link(base.intra.bandwidth if args.intra_gbps is None else args.intra_gbps * GB, latency)
    inter = Link(base.inter.bandwidth if args.inter_gbps is None else args.inter_gbps * GB, latency)
    return Cluster(
        num_devices=args.devices,
        devices_per_node=args.devices_per_node or base.devices_per_node,
        memory_bytes=base.memory_bytes if args.memory_gib is None else args.memory_gib * GIB,
        intra=intra,
        inter=inter,
        name=base.name,
        device=base.device,
    )


def _scenario(args: argparse.Namespace) -> Scenario:
    if not args.profile:
        raise PlanningError("--profile is required (a profile file or a model name)")
    if args.lengths:
        dist = LengthDistribution.from_jsonl(args.lengths)
    else:
        dist = LengthDistribution.from_task(args.task or "S")
    return build_scenario(
        load_profile(args.profile), _cluster(args), dist, batch_relation=args.batch_relation
    )


def _plan(args: argparse.Namespace) -> int:
    if args.slo is not None and not args.slo > 0:
        raise PlanningError(f"--slo must be a positive number of seconds, got {args.slo}")
    sc = _scenario(args)
    policies = POLICY_CHOICES[args.policy]
    plan = solve_scenario(sc, args.slo, policies=policies)
    try:
        baseline: Plan | None = solve_scenario(sc, args.slo, policies=(Policy.STATIC,))
    except PlanningError:
        baseline = None  # FasterTransformer cannot meet this bound
    verified = None
    if args.verify:
        exact = solve_scenario(sc, args.slo, policies=policies, exhaustive=True)
        verified = plan.prediction.throughput_req_s >= exact.prediction.throughput_req_s
    if args.plot:
        from adaptive.plot import plot_tradeoff

        plot_tradeoff(sc, Path(args.plot))
    if args.json:
        print(json.dumps(_plan_json(sc, plan, baseline, verified, args.slo)))
    else:
        print(_plan_text(plan, baseline, verified))
    return 0


def _prediction_json(p: Prediction) -> dict[str, Any]:
    schedule = asdict(p.schedule)
    schedule["policy"] = p.schedule.policy.value
    return {
        "schedule": schedule,
        "throughput_req_s": p.throughput_req_s,
        "throughput_tok_s": p.throughput_tok_s,
        "latency_s": p.latency_s,
    }


def _plan_json(
    sc: Scenario, plan: Plan, baseline: Plan | None, verified: bool | None, slo: float | None
) -> dict[str, Any]:
    out = _prediction_json(plan.prediction)
    out.update(
        {
            "model": sc.profile.model,
            "devices": sc.cluster.num_devices,
            "lengths": sc.dist.name,
            "slo_s": slo,
            "decode_batch": plan.prediction.decode_batch,
            "memory_gib_per_device": plan.prediction.memory_bytes_per_device / GIB,
            "baseline": _prediction_json(baseline.prediction) if baseline else None,
            "gain": (
                plan.prediction.throughput_req_s / baseline.prediction.throughput_req_s
                if baseline
                else None
            ),
            "solve_ms": plan.solve_ms,
            "evaluations": plan.evaluations,
            "verified": verified,
        }
    )
    return out


def _plan_text(plan: Plan, baseline: Plan | None, verified: bool | None) -> str:
    p = plan.prediction
    lines = [
        f"schedule:   {plan.schedule.describe()}",
        f"throughput: {p.throughput_req_s:.2f} req/s, {p.throughput_tok_s:.1f} tok/s",
        f"latency:    {p.latency_s:.3f} s (p99-length query)",
        f"solve:      {plan.solve_ms:.2f} ms, {plan.evaluations} simulator calls",
    ]
    if baseline:
        b = baseline.prediction
        lines.append(
            f"baseline:   {baseline.schedule.describe()} {b.throughput_req_s:.2f} "
            f"req/s, gain {p.throughput_req_s / b.throughput_req_s:.2f}x"
        )
    else:
        lines.append("baseline:   FasterTransformer cannot meet this bound")
    if verified is not None:
        lines.append(f"verified:   {'matches' if verified else 'DIFFERS FROM'} exhaustive")
    return "\n".join(lines)


def _reproduce(args: argparse.Namespace) -> int:
    from adaptive.reproduce import format_table, run_matrix, summary

    rows = run_matrix(args.profile_set, scale_compute=not args.h100_compute, verify=args.verify)
    print(format_table(rows))
    if args.json:
        payload = {"rows": [r.to_json() for r in rows], "summary": summary(rows)}
        text = json.dumps(payload, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
