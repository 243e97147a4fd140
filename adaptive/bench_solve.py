"""Solve-time benchmark: `python -m adaptive.bench_solve [--repeats N] [--json FILE]`.

Runs the paper's evaluation matrix (adaptive.reproduce) once to warm the JIT, then
`repeats` more times, and prints the median solve time per scenario (branch-and-bound,
all policies and TP settings of that scenario), with the exhaustive search's for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from adaptive.cluster import preset_cluster
from adaptive.distributions import LengthDistribution
from adaptive.profile import load_profile
from adaptive.reproduce import MATRIX, paper_bounds
from adaptive.schedule import Policy
from adaptive.search import EXEGPT_POLICIES, solve_scenario
from adaptive.simulator import build_scenario


def measure(repeats: int) -> dict[str, float]:
    """Median and p90 solve ms per scenario, BnB and exhaustive."""
    cases = []
    for group, model, devices, cluster, tasks in MATRIX:
        policies = EXEGPT_POLICIES if group == "small/mid" else (Policy.RRA,)
        for task in tasks:
            sc = build_scenario(
                load_profile(model),
                preset_cluster(cluster, devices),
                LengthDistribution.from_task(task),
                model="paper",  # the paper's matrix, as reproduced
            )
            cases += [(sc, bound, policies) for bound in paper_bounds(sc)]
    bnb: list[float] = []
    full: list[float] = []
    for sc, bound, policies in cases:  # warm-up: JIT compile and caches
        solve_scenario(sc, bound, policies=policies)
    for _ in range(repeats):
        for sc, bound, policies in cases:
            start = time.perf_counter()
            solve_scenario(sc, bound, policies=policies)
            bnb.append((time.perf_counter() - start) * 1000.0)
    for sc, bound, policies in cases:
        full.append(solve_scenario(sc, bound, policies=policies, exhaustive=True).solve_ms)
    return {
        "scenarios": float(len(cases)),
        "bnb_median_ms": statistics.median(bnb),
        "bnb_p90_ms": statistics.quantiles(bnb, n=10)[-1],
        "bnb_max_ms": max(bnb),
        "exhaustive_median_ms": statistics.median(full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.repeats)
    for key, value in result.items():
        print(f"{key:>22}: {value:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
