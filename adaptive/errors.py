"""The one error type the planner raises for bad input, so callers catch a single class."""

from __future__ import annotations


class PlanningError(ValueError):
    """A bad planning input: unknown task, empty histogram, malformed profile, impossible bound."""


class InfeasibleBound(PlanningError):
    """No schedule meets the bound; `min_latency_s` is the lowest latency one that fits has
    (a caller that must run something can solve again with it as the bound)."""

    def __init__(self, message: str, min_latency_s: float) -> None:
        super().__init__(message)
        self.min_latency_s = min_latency_s
