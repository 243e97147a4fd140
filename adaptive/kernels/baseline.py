"""The baselines in closed form: FasterTransformer (static) and ORCA/vLLM (continuous).

FasterTransformer as the paper ran it (section 7.1, the ORCA paper's setup): a fixed
batch, TP over a node, PP across nodes with one micro-batch per stage, no early
termination. Two choices keep it from being needlessly pessimistic: a batch decodes
E[max of its b output lengths] steps, not the task's maximum (task S: 59 steps for
b = 32, 71 for b = 512, against a maximum of 80), and throughput counts all b queries.
Its latency stays the paper's, the max-length batch. Like RRA it pays the pipeline's
encode -> decode bubble (`phase_bubble`), once per batch.
"""

from __future__ import annotations

import math

from adaptive.kernels.cost import (
    DECODE,
    ENCODE,
    S_CTX_MEAN,
    S_DEC_MAX,
    S_DEC_MEAN,
    S_DEC_TARGET,
    S_IN_MAX,
    S_IN_MEAN,
    S_KV_TOKEN,
    S_N,
    Arr,
    Point,
    jit,
    n_stages,
    pass_time,
    phase_bubble,
    split_devices,
    weight_bytes,
)

POISSON_SUM_MAX = 400.0  # continuous_point: expected joins past which the mean stands in


@jit
def expected_batch_max(iters_pmf: Arr, b: int) -> float:
    """E[max of b queries' decoding iterations]: how long a batch without early termination
    decodes."""
    total = 0.0
    cdf = iters_pmf[0]  # queries that end with their encoding
    below = cdf**b  # P(one query runs < i iterations) ** b
    for iters in range(1, iters_pmf.size):
        cdf += iters_pmf[iters]
        upto = min(cdf, 1.0) ** b
        total += iters * (upto - below)
        below = upto
    return total


@jit
def static_point(
    tables: Arr, axes: Arr, s: Arr, iters_pmf: Arr, k1: int, kd: int, d: int, b: int
) -> Point:
    """FasterTransformer: a fixed batch of b, no early termination, TP in a node, PP across.

    A batch decodes until its longest member ends, E[max of b lengths] steps, then all b
    queries leave (throughput counts every one). Latency is the paper's for FT: a batch
    that runs to the maximum output length (its bound "applies to the max length").
    """
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, n)
    t_enc = pass_time(tables, axes, s, ENCODE, lay, b, s[S_IN_MEAN])
    steps = expected_batch_max(iters_pmf, b)
    # Attention cost is linear in context: the mean context over a run of `steps` tokens.
    ctx_max = s[S_IN_MEAN] + s[S_DEC_MAX] / 2.0
    ctx_run = s[S_IN_MEAN] + steps / 2.0
    dec_max = pass_time(tables, axes, s, DECODE, lay, b, ctx_max)
    dec_run = pass_time(tables, axes, s, DECODE, lay, b, ctx_run)
    # Micro-batched across nodes, FT meets the same encode -> decode switch as RRA.
    t_enc += phase_bubble(n_stages(lay), t_enc, dec_run)
    latency = t_enc + s[S_DEC_MAX] * dec_max
    kv = s[S_KV_TOKEN] * b * (s[S_IN_MAX] + s[S_DEC_MAX])  # slots preallocated at max length
    return b / (t_enc + steps * dec_run), latency, b, (weight_bytes(s) + kv) / n, 0.0


@jit
def continuous_point(tables: Arr, axes: Arr, s: Arr, k1: int, kd: int, d: int, b: int) -> Point:
    """ORCA/vLLM-like: b running queries; each iteration prefills the b / I_D that joined
    (I_D: mean decoding iterations). A query's latency is the prefill it joins in, then its
    target's decoding iterations."""
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, n)
    joined = b / s[S_DEC_MEAN]
    t_dec = pass_time(tables, axes, s, DECODE, lay, b, s[S_CTX_MEAN])
    # Joins per iteration are ~Poisson(joined); prefill costs E[t(X); X > 0]. Past
    # POISSON_SUM_MAX joins the count is within a few percent of its mean.
    if joined > POISSON_SUM_MAX:
        t_enc = pass_time(tables, axes, s, ENCODE, lay, joined, s[S_IN_MEAN])
        t_own = t_enc
    else:
        t_enc = 0.0
        pmf = math.exp(-joined)
        for x in range(1, int(joined + 6.0 * math.sqrt(joined) + 10.0)):
            pmf *= joined / x
            t_enc += pmf * pass_time(tables, axes, s, ENCODE, lay, x, s[S_IN_MEAN])
        t_own = t_enc / (1.0 - math.exp(-joined))  # E[t(X) | X > 0]: the query is in X
    iteration = t_dec + t_enc
    latency = t_own + s[S_DEC_TARGET] * iteration
    kv = s[S_KV_TOKEN] * b * s[S_CTX_MEAN]  # paged: only live tokens
    return joined / iteration, latency, b, (weight_bytes(s) + kv) / n, 0.0
