"""Live length histograms: every finished request's input and output length, decayed.

The controller reads these to plan for the traffic as it is now. Old requests fade with a
half-life counted in requests (a quiet server does not forget what it saw), so after
`half_life` new requests the older traffic weighs half as much. Means and p99s are one
pass over the bins (a numba kernel), cheap enough to read on every controller check.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from adaptive.distributions import LengthDistribution
from adaptive.errors import PlanningError
from adaptive.kernels.online import add_samples, histogram_stats

RESCALE_AT = 1e100  # sample weights grow geometrically; fold them back well before overflow


@dataclass(frozen=True)
class LengthSummary:
    """What the planner reads from a length distribution, and the drift distance uses."""

    mean_input: float
    p99_input: float
    mean_output: float
    p99_output: float
    weight: float  # effective number of requests behind the numbers (inf: analytic)

    @classmethod
    def of(cls, dist: LengthDistribution) -> LengthSummary:
        return cls(
            dist.mean_input,
            float(dist.p99_input),
            dist.mean_output,
            float(dist.p99_output),
            dist.weight,
        )

    def drift_from(self, reference: LengthSummary) -> float:
        """Largest relative change of a planner input (input mean, output mean and p99)."""
        pairs = (
            (self.mean_input, reference.mean_input),
            (self.mean_output, reference.mean_output),
            (self.p99_output, reference.p99_output),
        )
        return max(abs(new - old) / max(old, 1.0) for new, old in pairs)


class LiveLengths:
    """Decayed histograms of input and output lengths; thread-safe (the engine thread
    writes, the controller's solver thread and stats readers read)."""

    def __init__(self, max_len: int, half_life: float) -> None:
        if max_len < 1:
            raise PlanningError(f"max_len must be >= 1, got {max_len}")
        if not half_life > 0:
            raise PlanningError(f"half_life must be a positive number of requests, got {half_life}")
        self._inputs = np.zeros(max_len + 1)  # [max_len + 1] decayed counts, index = length
        self._outputs = np.zeros(max_len + 1)
        self._growth = 2.0 ** (1.0 / half_life)
        self._next_weight = 1.0
        self._lock = threading.Lock()
        self.num_observed = 0

    def observe(self, input_lens: npt.ArrayLike, output_lens: npt.ArrayLike) -> None:
        ins = np.asarray(input_lens, dtype=np.int64).ravel()
        outs = np.asarray(output_lens, dtype=np.int64).ravel()
        if ins.size != outs.size:
            raise PlanningError("input and output lengths must pair up one to one")
        with self._lock:
            add_samples(self._inputs, ins, self._next_weight, self._growth)
            self._next_weight = add_samples(self._outputs, outs, self._next_weight, self._growth)
            if self._next_weight > RESCALE_AT:
                for counts in (self._inputs, self._outputs):
                    counts /= self._next_weight
                self._next_weight = 1.0
            self.num_observed += int(ins.size)

    @property
    def weight(self) -> float:
        """Effective number of requests: total weight relative to the newest sample's."""
        with self._lock:
            return float(self._outputs.sum() * self._growth / self._next_weight)

    def summary(self) -> LengthSummary | None:
        """Means and p99s, or None before the first request."""
        with self._lock:
            total, mean_in, p99_in = histogram_stats(self._inputs, 0.99)
            _, mean_out, p99_out = histogram_stats(self._outputs, 0.99)
            scale = self._growth / self._next_weight
        if total <= 0:
            return None
        return LengthSummary(mean_in, p99_in, mean_out, p99_out, total * scale)

    def distribution(self, name: str = "live") -> LengthDistribution | None:
        """The histograms as a planner distribution (p99 output as the latency target)."""
        with self._lock:
            if not self._outputs.any():
                return None
            inputs, outputs = self._inputs.copy(), self._outputs.copy()
            scale = self._growth / self._next_weight
        weight = float(outputs.sum()) * scale
        # trim the empty tails so the planner's max lengths are the observed ones
        inputs = inputs[: int(np.flatnonzero(inputs)[-1]) + 1]
        outputs = outputs[: int(np.flatnonzero(outputs)[-1]) + 1]
        return LengthDistribution(inputs, outputs, weight=weight, name=name)
