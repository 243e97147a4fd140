"""The paper's trade-off figure: best throughput against the latency bound, per policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptive.errors import PlanningError
from adaptive.schedule import Policy
from adaptive.search import solve_scenario
from adaptive.simulator import Scenario

CURVES: tuple[tuple[str, tuple[Policy, ...]], ...] = (
    ("RRA", (Policy.RRA,)),
    ("WAA-C", (Policy.WAA_C,)),
    ("WAA-M", (Policy.WAA_M,)),
    ("continuous (ORCA/vLLM-like)", (Policy.CONTINUOUS,)),
    ("FasterTransformer", (Policy.STATIC,)),
)


def plot_tradeoff(sc: Scenario, path: Path, num_bounds: int = 24) -> None:
    """Sweep bounds from the tightest any policy meets to FT's unbounded latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = solve_scenario(sc, None, policies=(Policy.STATIC,)).prediction.latency_s
    bounds = np.geomspace(ft / 30.0, ft * 1.5, num_bounds)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, policies in CURVES:
        xs, ys = [], []
        for bound in bounds:
            try:
                plan = solve_scenario(sc, float(bound), policies=policies)
            except PlanningError:
                continue  # nothing meets this bound under this policy
            xs.append(bound)
            ys.append(plan.prediction.throughput_req_s)
        style = "k--" if policies == (Policy.STATIC,) else "-"
        ax.plot(xs, ys, style, marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency bound (s), p99-length query (FT: max length)")
    ax.set_ylabel("throughput (queries/s)")
    ax.set_title(f"{sc.profile.model}, {sc.cluster.num_devices} devices, task {sc.dist.name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
