"""Planning: the paper's XSimulator and XScheduler, pure functions over arrays.

Public entry points (the engine and the online controller call these):

    load_profile(name_or_path) -> Profile
    LengthDistribution.from_task / from_jsonl / from_samples; observe(prev, ins, outs, decay=)
    preset_cluster(name, devices) -> Cluster
    simulate(profile, cluster, dist, schedule, slo_s=) -> Prediction
    simulate_discrete(profile, cluster, dist, schedule, num_queries=, seed=) -> DiscreteResult
    solve(profile, cluster, dist, slo_s, policies=, exhaustive=) -> Plan

Online (the engine process): `adaptive.online.LiveLengths` (decayed length histograms),
`adaptive.serving.ServingTarget` (one engine as a planning target) and
`adaptive.controller.Controller` (owns the schedule, re-solves on SLO change, drift,
latency breach and profile refit).
"""

from adaptive.cluster import Cluster, Link, preset_cluster
from adaptive.distributions import LengthDistribution, observe
from adaptive.errors import PlanningError
from adaptive.profile import Profile, load_profile
from adaptive.schedule import Policy, Schedule
from adaptive.search import Plan, solve
from adaptive.simulator import Prediction, simulate, simulate_discrete

__all__ = [
    "Cluster",
    "LengthDistribution",
    "Link",
    "Plan",
    "PlanningError",
    "Policy",
    "Prediction",
    "Profile",
    "Schedule",
    "load_profile",
    "observe",
    "preset_cluster",
    "simulate",
    "simulate_discrete",
    "solve",
]
