"""Online length histograms: decayed counts, and their mean and percentile in one pass.

Exponential decay by request count is kept O(1) per sample: instead of multiplying every
bin by the decay factor on each arrival, the k-th sample is added with weight g**k
(g = 2**(1 / half_life) > 1), so relative to the newest sample an old one weighs
2**(-age / half_life). The wrapper rescales the counts when the weight grows large.
"""

from __future__ import annotations

from adaptive.kernels.cost import Arr, IArr, jit


@jit
def add_samples(counts: Arr, lengths: IArr, weight: float, growth: float) -> float:
    """Add lengths (clipped to the histogram) with weights weight, weight*growth, ...;
    returns the weight the next sample gets."""
    top = counts.size - 1
    for length in lengths:
        counts[min(max(length, 1), top)] += weight
        weight *= growth
    return weight


@jit
def histogram_stats(counts: Arr, q: float) -> tuple[float, float, float]:
    """(total weight, mean length, q-quantile length) of a histogram indexed by length."""
    total = 0.0
    moment = 0.0
    for length in range(counts.size):
        total += counts[length]
        moment += length * counts[length]
    if total <= 0.0:
        return 0.0, 0.0, 0.0
    threshold = q * total * (1.0 - 1e-12)
    running = 0.0
    for length in range(counts.size):
        running += counts[length]
        if running >= threshold:
            return total, moment / total, float(length)
    return total, moment / total, float(counts.size - 1)
