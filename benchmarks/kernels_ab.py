"""exegpt's compiled bf16 kernels (engine/kernels) against torch's operations, interleaved.

Each round starts two fresh processes, one with EXEGPT_KERNELS=on and one with it off, in
an order that alternates between rounds, so drift of a shared machine hits both alike.
Each runs one schedule over a task's queries (as `exegpt bench offline` runs it) for the
throughput, then profiles that schedule's first steps (its `--profile-steps` profile).
Prints the medians over rounds and every round's throughput.

    python benchmarks/kernels_ab.py --task S --policy continuous --knob max_batch=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

MODES = ("on", "off")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One process's run and step profile (the kernels as EXEGPT_KERNELS says)."""
    from engine import kernels
    from engine.bench import warm_up
    from engine.bench_offline import make_engine, profile_run, run_engine, schedule_for
    from engine.model_loader import load_model
    from engine.workloads import make_prompts, task_queries

    loaded = load_model(args.model)
    queries = task_queries(args.task, args.num_queries)
    prompts = make_prompts(queries, loaded.vocab_size)
    knobs = dict(args.knob)
    max_batch = schedule_for(args.policy, knobs).max_batch
    with make_engine(loaded, queries, max_batch) as engine:
        warm_up(engine, args.task, queries, prompts)
        run = run_engine(engine, args.task, args.policy, knobs, queries, prompts, "ab")
        steps = profile_run(engine, args.policy, knobs, prompts, queries, args.profile_steps)
    return {
        "req_s": run.throughput_req_s,
        "p99_s": run.latency_percentile_s(99),
        "ms_per_step": steps.ms_per_step,
        "kernels": kernels.enabled_for(loaded.dtype, loaded.device),
    }


def _knob(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    return name, int(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="S")
    parser.add_argument("--num-queries", type=int, default=96)
    parser.add_argument("--policy", default="continuous")
    parser.add_argument("--knob", type=_knob, action="append", default=[], help="NAME=VALUE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=40)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.knob:
        args.knob = [("max_batch", 32)]
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    command = [sys.executable, __file__, "--child", *sys.argv[1:]]
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            env = os.environ | {"EXEGPT_KERNELS": mode}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["kernels"] != (mode == "on"):
                raise RuntimeError(f"EXEGPT_KERNELS={mode}, yet kernels ran: {result['kernels']}")
            results[mode].append(result)
            print(f"round {round_ + 1} kernels {mode}: {result['req_s']:.2f} req/s", flush=True)
    print(f"\n{args.task} {args.policy} {dict(args.knob)}, medians of {args.rounds} rounds")
    for mode in MODES:
        runs = results[mode]
        rates = ", ".join(f"{r['req_s']:.2f}" for r in runs)
        median = statistics.median(r["req_s"] for r in runs)
        print(f"kernels {mode}: {median:.2f} req/s (rounds: {rates})")
        for phase in ("encode", "decode"):
            steps = [r["ms_per_step"][phase] for r in runs if phase in r["ms_per_step"]]
            if steps:
                cells = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
                total = sum(cells.values())
                parts = "  ".join(f"{k} {v:.1f}" for k, v in cells.items())
                print(f"  {phase} ms/step {total:.1f}: {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
