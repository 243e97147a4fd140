"""Discrete-event RRA and continuous batching, query by query, to check the closed forms."""

from __future__ import annotations

import math

import numpy as np

from adaptive.kernels.cost import (
    DECODE,
    ENCODE,
    S_N,
    Arr,
    IArr,
    jit,
    n_stages,
    pass_time,
    phase_bubble,
    split_devices,
)


@jit
def mean_context(context: Arr, live: IArr, n_live: int) -> float:
    """Mean context of the running queries live[:n_live]."""
    total = 0.0
    for a in range(n_live):
        total += context[live[a]]
    return total / n_live


@jit
def retire(
    live: IArr, n_live: int, remaining: IArr, context: Arr, latency: Arr, start: Arr, clock: float
) -> int:
    """Advance every running query one token; drop the finished ones, recording latency.
    Returns the number still running."""
    for a in range(n_live):
        q = live[a]
        remaining[q] -= 1
        context[q] += 1.0
    return drop_finished(live, 0, n_live, remaining, latency, start, clock)


@jit
def drop_finished(
    live: IArr, first: int, n_live: int, remaining: IArr, latency: Arr, start: Arr, clock: float
) -> int:
    """Drop the queries of live[first:n_live] with nothing left to decode, recording their
    latency at `clock` (just encoded ones that need no decoding iteration leave with their
    encoding). A dropped query's slot takes the last running one, so live[:n_live] stays
    packed. Returns the number still running."""
    a = first
    while a < n_live:
        q = live[a]
        if remaining[q] == 0:
            latency[q] = clock - start[q]
            n_live -= 1
            live[a] = live[n_live]
        else:
            a += 1
    return n_live


@jit
def summary(latency: Arr, n_done: int, elapsed: float, batch_sum: float, steps: int) -> Arr:
    """[queries/s, mean batch, p99 latency, measured steps] over the measured steps."""
    lat = latency[~np.isnan(latency)]
    p99 = np.quantile(lat, 0.99) if lat.size else math.inf
    rate = n_done / elapsed if elapsed > 0.0 else 0.0
    return np.array([rate, batch_sum / max(steps, 1), p99, float(steps)])


@jit
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
    cap: int,
    in_lens: IArr,
    out_lens: IArr,
    warmup: int,
) -> Arr:
    """Discrete-event RRA: queries join B_E per cycle and leave the iteration they finish
    (`out_lens` are decoding iterations; a query of none leaves with its encoding);
    with a cap on the running batch (0: none) a cycle admits only up to the cap.

    Returns [queries/s, mean decode batch at a cycle's first iteration, p99 latency,
    measured cycles], over the cycles after `warmup` (the start fills an empty batch).
    """
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, g)
    n_q = in_lens.size
    live = np.empty(n_q, np.int64)  # ids of running queries, live[:n_live]
    remaining = out_lens.copy()
    context = in_lens.astype(np.float64)
    start = np.zeros(n_q)
    latency = np.full(n_q, np.nan)
    n_live, nxt, cycle, clock = 0, 0, 0, 0.0
    t0, done0, batch_sum = 0.0, 0, 0.0
    n_done = 0
    while nxt + b_e <= n_q:
        if cycle == warmup:
            t0, done0 = clock, n_done
        in_sum = 0.0
        admit = b_e if cap <= 0 else max(min(b_e, cap - n_live), 0)
        first = n_live
        for _ in range(admit):
            live[n_live] = nxt
            start[nxt] = clock
            in_sum += in_lens[nxt]
            n_live += 1
            nxt += 1
        t_enc = pass_time(tables, axes, s, ENCODE, lay, admit, in_sum / admit) if admit else 0.0
        clock += t_enc
        left = drop_finished(live, first, n_live, remaining, latency, start, clock)
        n_done += n_live - left
        n_live = left
        if cycle >= warmup:
            batch_sum += n_live
        for it in range(n_d):
            if n_live == 0:
                break
            ctx = mean_context(context, live, n_live)
            t_dec = pass_time(tables, axes, s, DECODE, lay, n_live, ctx)
            clock += t_dec
            if it == 0:
                clock += phase_bubble(n_stages(lay), t_enc, t_dec)
            left = retire(live, n_live, remaining, context, latency, start, clock)
            n_done += n_live - left
            n_live = left
        cycle += 1
    return summary(latency, n_done - done0, clock - t0, batch_sum, cycle - warmup)


@jit
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
    `out_lens` are decoding iterations; a query of none leaves with its encoding.

    Returns [queries/s, mean running batch, p99 latency, measured iterations].
    """
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, n)
    n_q = in_lens.size
    live = np.empty(n_q, np.int64)
    remaining = out_lens.copy()
    context = in_lens.astype(np.float64)
    start = np.zeros(n_q)
    latency = np.full(n_q, np.nan)
    n_live, nxt, it, clock = 0, 0, 0, 0.0
    t0, done0, batch_sum, n_done = 0.0, 0, 0.0, 0
    while nxt < n_q:
        if it == warmup:
            t0, done0 = clock, n_done
        joined, in_sum = 0, 0.0
        first = n_live
        while n_live < b and nxt < n_q:
            live[n_live] = nxt
            start[nxt] = clock
            in_sum += in_lens[nxt]
            n_live += 1
            nxt += 1
            joined += 1
        if joined > 0:
            clock += pass_time(tables, axes, s, ENCODE, lay, joined, in_sum / joined)
            left = drop_finished(live, first, n_live, remaining, latency, start, clock)
            n_done += n_live - left
            n_live = left
        if n_live == 0:
            it += 1
            continue
        ctx = mean_context(context, live, n_live)
        clock += pass_time(tables, axes, s, DECODE, lay, n_live, ctx)
        if it >= warmup:
            batch_sum += n_live
        left = retire(live, n_live, remaining, context, latency, start, clock)
        n_done += n_live - left
        n_live = left
        it += 1
    return summary(latency, n_done - done0, clock - t0, batch_sum, it - warmup)
