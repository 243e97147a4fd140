"""ExeGPT's policies in closed form: RRA and WAA points (paper sections 4 and 6)."""

from __future__ import annotations

import math

import numpy as np

from adaptive.kernels.cost import (
    DECODE,
    ENCODE,
    INFEASIBLE,
    S_BUFFER,
    S_CTX_MEAN,
    S_DEC_MEAN,
    S_DEC_TARGET,
    S_HOST_BW,
    S_IN_MEAN,
    S_IN_SD,
    S_KV_TOKEN,
    S_L_DEC,
    S_L_ENC,
    S_N,
    S_W_DEC,
    S_W_ENC,
    Arr,
    Layout,
    Point,
    jit,
    layer_time,
    n_stages,
    normal_cdf,
    pass_time,
    phase_bubble,
    split_devices,
    stage_time,
    weight_bytes,
)

ALIVE_MIN = 1e-9  # expected running rows below which a cycle decodes no further
QUANTILE_MAX = 0.999  # the highest latency percentile a target length is taken for
BISECTIONS = 32  # halvings of the latency interval searched for the percentile
TAIL_SDS = 8.0  # past this many standard deviations a normal's cdf is taken as 0 or 1


@jit
def finish_time(iters: int, t_enc: float, bubble: float, cycle: float, cum: Arr) -> float:
    """When an RRA query of `iters` decoding iterations leaves, from its encoding phase's
    start: its c = ceil(iters / N_D) cycles, the last one cut after its own iteration
    (cum[u]: a cycle's first u iterations); with none, its encoding alone."""
    if iters <= 0:
        return t_enc
    n_d = cum.size - 1
    c = (iters + n_d - 1) // n_d
    return t_enc + bubble + (c - 1) * cycle + float(cum[iters - (c - 1) * n_d])


@jit
def rra_quantile(
    tables: Arr,
    axes: Arr,
    s: Arr,
    lay: Layout,
    iters_pmf: Arr,
    admitted: float,
    t_enc: float,
    bubble: float,
    cycle: float,
    cum: Arr,
) -> float:
    """RRA's latency at the target length's percentile over all queries.

    A query of I iterations finishes at L(I) (`finish_time`), priced at the mean prompt
    length. It meets max(c, 1) encoding phases, its own and the ones
    between its cycles; each phase's prompts are a sample of the prompt lengths, so its
    time varies with their mean, whose sd is sd / sqrt(B_E): half the phase's time from
    one such sd below the mean to one above is its sd. Over queries the latency is the
    mixture sum_I P(I) N(L(I), max(c, 1) * var_phase), and the bound is read at the
    percentile of the target length, P(I < target) + P(I = target) / 2: with equal
    prompts, L(target).
    """
    n_d = cum.size - 1
    mean_in = s[S_IN_MEAN]
    # a phase's mean prompt length varies by sd / sqrt(B_E): its time, one sd either side
    h = min(s[S_IN_SD] / math.sqrt(max(admitted, 1.0)), 0.9 * mean_in)
    spread = pass_time(tables, axes, s, ENCODE, lay, admitted, mean_in + h) - pass_time(
        tables, axes, s, ENCODE, lay, admitted, mean_in - h
    )
    var_phase = (0.5 * spread) ** 2
    size = iters_pmf.size
    lat = np.empty(size)
    sd = np.empty(size)
    q = 0.0
    target = int(s[S_DEC_TARGET])
    for i in range(size):
        lat[i] = finish_time(i, t_enc, bubble, cycle, cum)
        sd[i] = math.sqrt(max((i + n_d - 1) // n_d, 1) * var_phase)
        if i < target:
            q += iters_pmf[i]
        elif i == target:
            q += 0.5 * iters_pmf[i]  # mid-distribution: a sampled p99 is often the longest
    q = min(q, QUANTILE_MAX)
    lo: float = lat[0] - TAIL_SDS * sd[0]
    hi: float = lat[size - 1] + TAIL_SDS * sd[size - 1]
    for _ in range(BISECTIONS):
        x = 0.5 * (lo + hi)
        below = 0.0
        for i in range(size):
            w = iters_pmf[i]
            if w > 0.0:
                gap = x - lat[i]
                if gap >= TAIL_SDS * sd[i]:  # (sd 0: a step at lat[i])
                    below += w
                elif gap > -TAIL_SDS * sd[i]:
                    below += w * normal_cdf(gap / sd[i])
        if below < q:
            lo = x
        else:
            hi = x
    return 0.5 * (lo + hi)


@jit
def no_row_left(cdf: Arr, n_d: int, u: int, admitted: float) -> float:
    """The probability that no query needs iteration u of an RRA cycle: every query
    admitted k cycles earlier has fewer than k * N_D + u iterations (cdf: P(I <= i))."""
    log_p = 0.0
    for i in range(u - 1, cdf.size - 1, n_d):  # past the last entry, F = 1
        if cdf[i] <= 0.0:
            return 0.0
        log_p += math.log(min(cdf[i], 1.0))
    return math.exp(admitted * log_p)


@jit
def rra_point(
    tables: Arr,
    axes: Arr,
    s: Arr,
    iters_pmf: Arr,
    k1: int,
    kd: int,
    d: int,
    g: int,
    b_e: int,
    n_d: int,
    paper: bool,
    cap: int,
) -> Point:
    """RRA: (queries/s, latency of the target-length query, B_D, bytes/device, 0).

    Each cycle encodes B_E queries then runs N_D decode iterations. A query of I decoding
    iterations spends c = ceil(I / N_D) cycles and leaves at iteration 1 + (I-1) mod N_D of
    its last; with I = 0 it leaves with its encoding and holds no row. Little's law:
    B_D = B_E * E[c]. The paper: B_D = B_E / E[1/c] (smaller).
    A running batch capped at `cap` rows (0: none) admits only what leaves: when B_D
    would pass the cap, each cycle encodes B_E * cap / B_D queries and B_D = cap.

    A cycle stops decoding once every row has left, so iteration u runs with the
    probability that some row is still there: a query admitted k cycles earlier is there
    if I >= k * N_D + u, so none is with probability prod_k F(k * N_D + u - 1)^B_E (F the
    cdf of I, queries independent). It costs that probability times a step over the rows
    present when it runs; a query's own iterations all run.
    """
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, g)
    done = np.zeros(n_d + 1)  # done[u]: fraction completing at iteration u, per cycle
    done_paper = np.zeros(n_d + 1)
    e_cycles = 0.0
    e_inv = 0.0
    for iters in range(1, iters_pmf.size):
        w = iters_pmf[iters]
        if w > 0.0:
            c = (iters + n_d - 1) // n_d
            u = 1 + (iters - 1) % n_d
            done[u] += w
            done_paper[u] += w / c
            e_cycles += w * c
            e_inv += w / c
    b_d = b_e / e_inv if paper else b_e * e_cycles
    admitted = float(b_e)
    if 0 < cap < b_d:
        admitted *= cap / b_d
        b_d = float(cap)
    t_enc = pass_time(tables, axes, s, ENCODE, lay, admitted, s[S_IN_MEAN])
    cycle = t_enc
    cum = np.zeros(n_d + 1)  # cum[u]: a cycle's first u decoding iterations
    alive = b_d
    bubble = 0.0
    cdf = np.cumsum(iters_pmf)
    for u in range(1, n_d + 1):
        runs = 1.0 - no_row_left(cdf, n_d, u, admitted)
        t_u = 0.0
        if alive > ALIVE_MIN and runs > 0.0:  # else every query has left: the next cycle
            rows = max(alive / runs, 1.0)
            t_u = pass_time(tables, axes, s, DECODE, lay, rows, s[S_CTX_MEAN])
        if u == 1:
            bubble = phase_bubble(n_stages(lay), t_enc, t_u) if t_u > 0.0 else 0.0
        cycle += runs * t_u
        cum[u] = cum[u - 1] + t_u
        alive -= b_d * done_paper[u] if paper else admitted * done[u]
    cycle += bubble
    if s[S_IN_SD] > 0.0:
        latency = rra_quantile(tables, axes, s, lay, iters_pmf, admitted, t_enc, bubble, cycle, cum)
    else:
        latency = finish_time(int(s[S_DEC_TARGET]), t_enc, bubble, cycle, cum)
    kv = s[S_KV_TOKEN] * (b_d * s[S_CTX_MEAN] + admitted * s[S_IN_MEAN])
    return admitted / cycle, latency, b_d, (weight_bytes(s) + kv) / n, 0.0


@jit
def waa_point(
    tables: Arr,
    axes: Arr,
    s: Arr,
    k1: int,
    kd: int,
    d: int,
    b_e: int,
    m: int,
    by_memory: bool,
    fixed_e: int,
    cap: int,
) -> Point:
    """WAA-C / WAA-M: (queries/s, latency, live decode queries, bytes/device, encode devices).

    Encode devices pipeline encode batches; decode devices hold G = ceil(P_D / m) groups of
    B_D = B_E * S_D queries (Little), each split into m micro-batches, so G * m
    micro-batches keep the decode stages busy. More micro-batches: smaller kernels (less
    throughput) but a group's token comes back sooner (less latency), the paper's 7 -> 3 2/3.
    The split comes from the policy (compute or memory shares) unless fixed_e > 0.
    Decode rows capped at `cap` (0: none) admit only what leaves, as in rra_point: when
    G * B_D would pass the cap, each period encodes B_E * cap / (G * B_D) queries and the
    groups hold cap rows.
    """
    n = int(s[S_N])
    if n < 2 * d:
        return INFEASIBLE
    b_d = b_e * s[S_DEC_MEAN]
    if by_memory:
        side_e = s[S_W_ENC] + s[S_KV_TOKEN] * b_e * s[S_IN_MEAN]
        side_d = s[S_W_DEC] + s[S_KV_TOKEN] * b_d * s[S_CTX_MEAN]
    else:
        side_e = s[S_L_ENC] * layer_time(tables, axes, ENCODE, k1, b_e, s[S_IN_MEAN])
        side_d = s[S_L_DEC] * layer_time(tables, axes, DECODE, k1, b_d, s[S_CTX_MEAN])
    n_e = round(n * side_e / (side_e + side_d) / d) * d
    n_e = min(max(n_e, d), (n // d - 1) * d) if fixed_e == 0 else fixed_e
    n_dd = n - n_e
    p_e = n_e // d
    p_d = n_dd // d
    tp = 1 if d > 1 else 0
    lay_e = (k1, kd, d, p_e * (1 - tp), p_e * tp)
    lay_d = (k1, kd, d, p_d * (1 - tp), p_d * tp)
    m_eff = min(m, p_d)
    groups = (p_d + m_eff - 1) // m_eff
    admitted = float(b_e)
    if 0 < cap < groups * b_d:
        admitted *= cap / (groups * b_d)
        b_d = cap / groups
    stage_e = stage_time(tables, axes, s, ENCODE, lay_e, admitted, s[S_IN_MEAN])
    stage_d = stage_time(tables, axes, s, DECODE, lay_d, b_d / m_eff, s[S_CTX_MEAN])
    period = max(m_eff * stage_d, stage_e)
    per_token = groups * period
    handover = 2.0 * admitted * s[S_IN_MEAN] * s[S_KV_TOKEN] / s[S_HOST_BW]
    latency = (p_e * stage_e + handover + per_token * (s[S_DEC_TARGET] + 1)) * (1 + s[S_BUFFER])
    mem_e = (s[S_W_ENC] + s[S_KV_TOKEN] * admitted * s[S_IN_MEAN] * p_e) / n_e
    mem_d = (s[S_W_DEC] + s[S_KV_TOKEN] * groups * b_d * s[S_CTX_MEAN]) / n_dd
    return admitted / period, latency, groups * b_d, max(mem_e, mem_d), float(n_e)
