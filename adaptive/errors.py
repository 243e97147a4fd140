"""The one error type the planner raises for bad input, so callers catch a single class."""

from __future__ import annotations


class PlanningError(ValueError):
    """A bad planning input: unknown task, empty histogram, malformed profile, impossible bound."""
