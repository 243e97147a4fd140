"""Factories for the planner tests: packaged profiles, paper clusters, paper tasks."""

from __future__ import annotations

import pytest

from adaptive.cluster import preset_cluster
from adaptive.distributions import LengthDistribution
from adaptive.profile import Profile, load_profile
from adaptive.simulator import Scenario, build_scenario


@pytest.fixture(scope="session")
def opt13b() -> Profile:
    return load_profile("opt-13b")


@pytest.fixture(scope="session")
def scenario_s(opt13b: Profile) -> Scenario:
    """OPT-13B on 4 A40s, task S (the paper's Table 6 case study)."""
    return build_scenario(opt13b, preset_cluster("a40", 4), LengthDistribution.from_task("S"))
