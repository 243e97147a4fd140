"""Numba kernels: the simulator's hot loops, over arrays and scalars only.

Typed wrappers live in `adaptive.simulator`; nothing here knows about dataclasses. All
times are seconds, sizes bytes. `s` is the scenario vector (layout below), `tables` the
profile's [kind, tp, batch, length] ln-seconds grid, `axes` its (log2 batch0, log2 len0).

Parallel layout (paper section 4.2, partial tensor parallelism). N devices, `g` of them in
tensor-parallel groups of degree `d`, the rest plain pipeline stages:

    stages P = (N - g) + g / d        [plain][plain][ TP x d ][ TP x d ]  ->  P = 2 + 2
    every device holds L / N layers (a TP group of d devices holds d * L / N),

so weights and KV spread evenly over devices. A batch of B queries runs as P mini-batches
of B / P (one per stage, FasterTransformer style), so one pass of all B costs P times the
slowest stage at B / P; a stage pays its layers' compute, d-way ring all-reduces over the
node link and one send to the next stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

F = TypeVar("F", bound=Callable[..., Any])
Arr = npt.NDArray[np.float64]
IArr = npt.NDArray[np.int64]
Point = tuple[float, float, float, float, float]


def _jit(fn: F) -> F:
    """njit with an on-disk cache, typed for mypy (numba ships no stubs)."""
    return cast(F, njit(cache=True)(fn))


ENCODE = 0
DECODE = 1

# Scenario vector layout, filled by adaptive.simulator.scenario_vector.
S_L_ENC = 0  # layers an encode pass runs
S_L_DEC = 1  # layers a decode iteration runs
S_HIDDEN = 2
S_AR_ENC = 3  # all-reduces per encode layer under TP (Megatron: 2)
S_AR_DEC = 4  # per decode layer (2; 3 with cross-attention)
S_W_ENC = 5  # weight bytes of the encode side
S_W_DEC = 6  # weight bytes of the decode side
S_W_SHARED = 7  # 1 when both sides are the same layers (decoder-only)
S_KV_TOKEN = 8  # KV bytes per token, whole model
S_MEM = 9  # usable bytes per device
S_N = 10  # devices
S_NODE = 11  # devices per node
S_INTRA_BW = 12
S_INTRA_LAT = 13
S_INTER_BW = 14
S_INTER_LAT = 15
S_HOST_BW = 16  # WAA KV hand-over path, device -> host -> device
S_IN_MEAN = 17
S_OUT_MEAN = 18
S_OUT_TARGET = 19  # output length the latency bound is stated for (p99)
S_OUT_MAX = 20
S_IN_MAX = 21
S_CTX_MEAN = 22  # mean context of a running decode query (length-biased)
S_BUFFER = 23  # WAA's buffer for dynamic workload adjustment, fraction of latency
S_SIZE = 24

INFEASIBLE = (0.0, math.inf, 0.0, math.inf, 0.0)


@_jit
def layer_time(tables: Arr, axes: Arr, kind: int, k: int, batch: float, length: float) -> float:
    """Bilinear interpolation of ln t over (log2 batch, log2 length); linear beyond."""
    nb = tables.shape[2]
    nl = tables.shape[3]
    x = math.log2(max(batch, 1.0)) - axes[0]
    y = math.log2(max(length, 1.0)) - axes[1]
    i = min(max(math.floor(x), 0), nb - 2)
    j = min(max(math.floor(y), 0), nl - 2)
    fx = max(x - i, 0.0)
    fy = max(y - j, -4.0)
    t = tables[kind, k]
    v = (
        (1 - fx) * (1 - fy) * t[i, j]
        + fx * (1 - fy) * t[i + 1, j]
        + (1 - fx) * fy * t[i, j + 1]
        + fx * fy * t[i + 1, j + 1]
    )
    return math.exp(v)


@_jit
def allreduce_time(s: Arr, nbytes: float, d: int) -> float:
    """Ring all-reduce among d devices of one node."""
    if d <= 1:
        return 0.0
    bandwidth_s: float = 2.0 * (d - 1) / d * nbytes / s[S_INTRA_BW]
    return bandwidth_s + 2.0 * (d - 1) * float(s[S_INTRA_LAT])


@_jit
def stage_time(
    tables: Arr,
    axes: Arr,
    s: Arr,
    kind: int,
    k1: int,
    kd: int,
    d: int,
    n_plain: int,
    n_groups: int,
    layers: float,
    b: float,
    length: float,
    tokens: float,
) -> float:
    """Slowest stage's time for a mini-batch of b queries of `tokens` new tokens each."""
    n_dev = n_plain + n_groups * d
    nbytes = b * tokens * s[S_HIDDEN] * 2.0
    per_device = layers / n_dev
    worst = 0.0
    if n_plain > 0:
        worst = per_device * layer_time(tables, axes, kind, k1, b, length)
    if n_groups > 0:
        n_ar = s[S_AR_ENC] if kind == ENCODE else s[S_AR_DEC]
        t_layer = layer_time(tables, axes, kind, kd, b, length)
        worst = max(worst, per_device * d * (t_layer + n_ar * allreduce_time(s, nbytes, d)))
    if n_plain + n_groups > 1:
        if n_dev > s[S_NODE]:
            worst += s[S_INTER_LAT] + nbytes / s[S_INTER_BW]
        else:
            worst += s[S_INTRA_LAT] + nbytes / s[S_INTRA_BW]
    return worst


@_jit
def pass_time(
    tables: Arr,
    axes: Arr,
    s: Arr,
    kind: int,
    k1: int,
    kd: int,
    d: int,
    n_plain: int,
    n_groups: int,
    layers: float,
    batch: float,
    length: float,
    tokens: float,
) -> float:
    """All `batch` queries through every layer once, as P pipelined mini-batches."""
    p = n_plain + n_groups
    return p * stage_time(
        tables, axes, s, kind, k1, kd, d, n_plain, n_groups, layers, batch / p, length, tokens
    )


@_jit
def rra_point(
    tables: Arr,
    axes: Arr,
    s: Arr,
    out_pmf: Arr,
    k1: int,
    kd: int,
    d: int,
    g: int,
    b_e: int,
    n_d: int,
    paper: bool,
) -> Point:
    """RRA: (queries/s, latency of the target-length query, B_D, bytes/device, 0).

    Each cycle encodes B_E queries then runs N_D decode iterations. A query of output
    length S spends c = ceil(S / N_D) cycles and leaves at iteration 1 + (S-1) mod N_D of
    its last. Little's law: B_D = B_E * E[c]. The paper: B_D = B_E / E[1/c] (smaller).
    """
    n = int(s[S_N])
    n_groups = g // d if d > 1 else 0
    n_plain = n - n_groups * d
    done = np.zeros(n_d + 1)  # done[u]: fraction completing at iteration u, per cycle
    done_paper = np.zeros(n_d + 1)
    e_cycles = 0.0
    e_inv = 0.0
    for length in range(1, out_pmf.size):
        w = out_pmf[length]
        if w > 0.0:
            c = (length + n_d - 1) // n_d
            u = 1 + (length - 1) % n_d
            done[u] += w
            done_paper[u] += w / c
            e_cycles += w * c
            e_inv += w / c
    b_d = b_e / e_inv if paper else b_e * e_cycles
    target = int(s[S_OUT_TARGET])
    k = (target + n_d - 1) // n_d
    r = target - (k - 1) * n_d
    t_enc = pass_time(
        tables,
        axes,
        s,
        ENCODE,
        k1,
        kd,
        d,
        n_plain,
        n_groups,
        s[S_L_ENC],
        b_e,
        s[S_IN_MEAN],
        s[S_IN_MEAN],
    )
    cycle = t_enc
    partial = 0.0
    alive = b_d
    for u in range(1, n_d + 1):
        t_u = pass_time(
            tables,
            axes,
            s,
            DECODE,
            k1,
            kd,
            d,
            n_plain,
            n_groups,
            s[S_L_DEC],
            max(alive, 1.0),
            s[S_CTX_MEAN],
            1.0,
        )
        cycle += t_u
        if u <= r:
            partial += t_u
        alive -= b_d * done_paper[u] if paper else b_e * done[u]
    latency = t_enc + (k - 1) * cycle + partial
    weights = s[S_W_ENC] + (0.0 if s[S_W_SHARED] > 0 else s[S_W_DEC])
    kv = s[S_KV_TOKEN] * (b_d * s[S_CTX_MEAN] + b_e * s[S_IN_MEAN])
    return b_e / cycle, latency, b_d, (weights + kv) / n, 0.0


@_jit
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
) -> Point:
    """WAA-C / WAA-M: (queries/s, latency, live decode queries, bytes/device, encode devices).

    Encode devices pipeline encode batches; decode devices hold G = ceil(P_D / m) groups of
    B_D = B_E * S_D queries (Little), each split into m micro-batches, so G * m
    micro-batches keep the decode stages busy. More micro-batches: smaller kernels (less
    throughput) but a group's token comes back sooner (less latency), the paper's 7 -> 3 2/3.
    The split comes from the policy (compute or memory shares) unless fixed_e > 0.
    """
    n = int(s[S_N])
    if n < 2 * d:
        return INFEASIBLE
    b_d = b_e * s[S_OUT_MEAN]
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
    stage_e = stage_time(
        tables,
        axes,
        s,
        ENCODE,
        k1,
        kd,
        d,
        p_e * (1 - tp),
        p_e * tp,
        s[S_L_ENC],
        b_e,
        s[S_IN_MEAN],
        s[S_IN_MEAN],
    )
    m_eff = min(m, p_d)
    groups = (p_d + m_eff - 1) // m_eff
    stage_d = stage_time(
        tables,
        axes,
        s,
        DECODE,
        k1,
        kd,
        d,
        p_d * (1 - tp),
        p_d * tp,
        s[S_L_DEC],
        b_d / m_eff,
        s[S_CTX_MEAN],
        1.0,
    )
    period = max(m_eff * stage_d, stage_e)
    per_token = groups * period
    handover = 2.0 * b_e * s[S_IN_MEAN] * s[S_KV_TOKEN] / s[S_HOST_BW]
    latency = (p_e * stage_e + handover + per_token * (s[S_OUT_TARGET] + 1)) * (1 + s[S_BUFFER])
    mem_e = (s[S_W_ENC] + s[S_KV_TOKEN] * b_e * s[S_IN_MEAN] * p_e) / n_e
    mem_d = (s[S_W_DEC] + s[S_KV_TOKEN] * groups * b_d * s[S_CTX_MEAN]) / n_dd
    return b_e / period, latency, groups * b_d, max(mem_e, mem_d), float(n_e)


@_jit
def static_point(tables: Arr, axes: Arr, s: Arr, k1: int, kd: int, d: int, b: int) -> Point:
    """FasterTransformer: a batch of b decodes max-length outputs; no early termination."""
    n = int(s[S_N])
    n_groups = n // d if d > 1 else 0
    n_plain = n - n_groups * d
    t_enc = pass_time(
        tables,
        axes,
        s,
        ENCODE,
        k1,
        kd,
        d,
        n_plain,
        n_groups,
        s[S_L_ENC],
        b,
        s[S_IN_MEAN],
        s[S_IN_MEAN],
    )
    ctx = s[S_IN_MEAN] + s[S_OUT_MAX] / 2.0  # attention cost is linear in context
    t_dec = pass_time(
        tables, axes, s, DECODE, k1, kd, d, n_plain, n_groups, s[S_L_DEC], b, ctx, 1.0
    )
    latency = t_enc + s[S_OUT_MAX] * t_dec
    weights = s[S_W_ENC] + (0.0 if s[S_W_SHARED] > 0 else s[S_W_DEC])
    kv = s[S_KV_TOKEN] * b * (s[S_IN_MAX] + s[S_OUT_MAX])  # slots preallocated at max length
    return b / latency, latency, b, (weights + kv) / n, 0.0


@_jit
def continuous_point(tables: Arr, axes: Arr, s: Arr, k1: int, kd: int, d: int, b: int) -> Point:
    """ORCA/vLLM-like: b running queries; each iteration prefills the b / S_D that joined."""
    n = int(s[S_N])
    n_groups = n // d if d > 1 else 0
    n_plain = n - n_groups * d
    joined = b / s[S_OUT_MEAN]
    t_dec = pass_time(
        tables, axes, s, DECODE, k1, kd, d, n_plain, n_groups, s[S_L_DEC], b, s[S_CTX_MEAN], 1.0
    )
    # Joins per iteration are ~Poisson(joined); prefill costs E[t(X); X > 0].
    t_enc = 0.0
    pmf = math.exp(-joined)
    for x in range(1, int(joined + 6.0 * math.sqrt(joined) + 10.0)):
        pmf *= joined / x
        t_enc += pmf * pass_time(
            tables,
            axes,
            s,
            ENCODE,
            k1,
            kd,
            d,
            n_plain,
            n_groups,
            s[S_L_ENC],
            x,
            s[S_IN_MEAN],
            s[S_IN_MEAN],
        )
    iteration = t_dec + t_enc
    weights = s[S_W_ENC] + (0.0 if s[S_W_SHARED] > 0 else s[S_W_DEC])
    kv = s[S_KV_TOKEN] * b * s[S_CTX_MEAN]  # paged: only live tokens
    return joined / iteration, s[S_OUT_TARGET] * iteration, b, (weights + kv) / n, 0.0


@_jit
def rra_des(
    tables: Arr,
    axes: Arr,
    s: Arr,
    k1: int,
    kd: int,
    d: int,
    g: int,
    b_e: int,
    n_d: int,
    in_lens: IArr,
    out_lens: IArr,
    warmup: int,
) -> Arr:
    """Discrete-event RRA: queries join B_E per cycle and leave the iteration they finish.

    Returns [queries/s, mean decode batch at a cycle's first iteration, p99 latency,
    measured cycles], over the cycles after `warmup` (the start fills an empty batch).
    """
    n = int(s[S_N])
    n_groups = g // d if d > 1 else 0
    n_plain = n - n_groups * d
    n_q = in_lens.size
    live = np.empty(n_q, np.int64)  # ids of running queries, live[:n_live]
    remaining = out_lens.copy()
    ctx = in_lens.astype(np.float64)
    start = np.zeros(n_q)
    latency = np.full(n_q, np.nan)
    n_live, nxt, cycle, clock = 0, 0, 0, 0.0
    t0, done0, batch_sum = 0.0, 0, 0.0
    n_done = 0
    while nxt + b_e <= n_q:
        if cycle == warmup:
            t0, done0 = clock, n_done
        in_sum = 0.0
        for _ in range(b_e):
            live[n_live] = nxt
            start[nxt] = clock
            in_sum += in_lens[nxt]
            n_live += 1
            nxt += 1
        clock += pass_time(
            tables,
            axes,
            s,
            ENCODE,
            k1,
            kd,
            d,
            n_plain,
            n_groups,
            s[S_L_ENC],
            b_e,
            in_sum / b_e,
            in_sum / b_e,
        )
        if cycle >= warmup:
            batch_sum += n_live
        for _ in range(n_d):
            if n_live == 0:
                break
            ctx_sum = 0.0
            for a in range(n_live):
                ctx_sum += ctx[live[a]]
            clock += pass_time(
                tables,
                axes,
                s,
                DECODE,
                k1,
                kd,
                d,
                n_plain,
                n_groups,
                s[S_L_DEC],
                n_live,
                ctx_sum / n_live,
                1.0,
            )
            a = 0
            while a < n_live:
                q = live[a]
                remaining[q] -= 1
                ctx[q] += 1.0
                if remaining[q] == 0:
                    latency[q] = clock - start[q]
                    n_done += 1
                    n_live -= 1
                    live[a] = live[n_live]
                else:
                    a += 1
        cycle += 1
    measured = max(cycle - warmup, 1)
    lat = latency[~np.isnan(latency)]
    p99 = np.quantile(lat, 0.99) if lat.size else math.inf
    rate = (n_done - done0) / (clock - t0) if clock > t0 else 0.0
    return np.array([rate, batch_sum / measured, p99, float(cycle - warmup)])


@_jit
def continuous_des(
    tables: Arr,
    axes: Arr,
    s: Arr,
    k1: int,
    kd: int,
    d: int,
    b: int,
    in_lens: IArr,
    out_lens: IArr,
    warmup: int,
) -> Arr:
    """Discrete-event iteration-level batching: a query joins as soon as a slot frees.

    Returns [queries/s, mean running batch, p99 latency, measured iterations].
    """
    n = int(s[S_N])
    n_groups = n // d if d > 1 else 0
    n_plain = n - n_groups * d
    n_q = in_lens.size
    live = np.empty(n_q, np.int64)
    remaining = out_lens.copy()
    ctx = in_lens.astype(np.float64)
    start = np.zeros(n_q)
    latency = np.full(n_q, np.nan)
    n_live, nxt, it, clock = 0, 0, 0, 0.0
    t0, done0, batch_sum, n_done = 0.0, 0, 0.0, 0
    while nxt < n_q:
        if it == warmup:
            t0, done0 = clock, n_done
        joined, in_sum = 0, 0.0
        while n_live < b and nxt < n_q:
            live[n_live] = nxt
            start[nxt] = clock
            in_sum += in_lens[nxt]
            n_live += 1
            nxt += 1
            joined += 1
        if joined > 0:
            clock += pass_time(
                tables,
                axes,
                s,
                ENCODE,
                k1,
                kd,
                d,
                n_plain,
                n_groups,
                s[S_L_ENC],
                joined,
                in_sum / joined,
                in_sum / joined,
            )
        ctx_sum = 0.0
        for a in range(n_live):
            ctx_sum += ctx[live[a]]
        clock += pass_time(
            tables,
            axes,
            s,
            DECODE,
            k1,
            kd,
            d,
            n_plain,
            n_groups,
            s[S_L_DEC],
            n_live,
            ctx_sum / n_live,
            1.0,
        )
        if it >= warmup:
            batch_sum += n_live
        a = 0
        while a < n_live:
            q = live[a]
            remaining[q] -= 1
            ctx[q] += 1.0
            if remaining[q] == 0:
                latency[q] = clock - start[q]
                n_done += 1
                n_live -= 1
                live[a] = live[n_live]
            else:
                a += 1
        it += 1
    measured = max(it - warmup, 1)
    lat = latency[~np.isnan(latency)]
    p99 = np.quantile(lat, 0.99) if lat.size else math.inf
    rate = (n_done - done0) / (clock - t0) if clock > t0 else 0.0
    return np.array([rate, batch_sum / measured, p99, float(it - warmup)])
