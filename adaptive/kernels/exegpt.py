"""ExeGPT's policies in closed form: RRA and WAA points (paper sections 4 and 6)."""

from __future__ import annotations

import numpy as np

from adaptive.kernels.cost import (
    DECODE,
    ENCODE,
    INFEASIBLE,
    S_BUFFER,
    S_CTX_MEAN,
    S_HOST_BW,
    S_IN_MEAN,
    S_KV_TOKEN,
    S_L_DEC,
    S_L_ENC,
    S_N,
    S_OUT_MEAN,
    S_OUT_TARGET,
    S_W_DEC,
    S_W_ENC,
    Arr,
    Point,
    jit,
    layer_time,
    n_stages,
    pass_time,
    phase_bubble,
    split_devices,
    stage_time,
    weight_bytes,
)


@jit
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
    cap: int,
) -> Point:
    """RRA: (queries/s, latency of the target-length query, B_D, bytes/device, 0).

    Each cycle encodes B_E queries then runs N_D decode iterations. A query of output
    length S spends c = ceil(S / N_D) cycles and leaves at iteration 1 + (S-1) mod N_D of
    its last. Little's law: B_D = B_E * E[c]. The paper: B_D = B_E / E[1/c] (smaller).
    A running batch capped at `cap` rows (0: none) admits only what leaves: when B_D
    would pass the cap, each cycle encodes B_E * cap / B_D queries and B_D = cap.
    """
    n = int(s[S_N])
    lay = split_devices(k1, kd, d, n, g)
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
    admitted = float(b_e)
    if 0 < cap < b_d:
        admitted *= cap / b_d
        b_d = float(cap)
    target = int(s[S_OUT_TARGET])
    k = (target + n_d - 1) // n_d
    r = target - (k - 1) * n_d
    t_enc = pass_time(tables, axes, s, ENCODE, lay, admitted, s[S_IN_MEAN])
    cycle = t_enc
    partial = 0.0
    alive = b_d
    bubble = 0.0
    for u in range(1, n_d + 1):
        t_u = pass_time(tables, axes, s, DECODE, lay, max(alive, 1.0), s[S_CTX_MEAN])
        if u == 1:
            bubble = phase_bubble(n_stages(lay), t_enc, t_u)
        cycle += t_u
        if u <= r:
            partial += t_u
        alive -= b_d * done_paper[u] if paper else admitted * done[u]
    cycle += bubble
    latency = t_enc + bubble + (k - 1) * cycle + partial
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
    latency = (p_e * stage_e + handover + per_token * (s[S_OUT_TARGET] + 1)) * (1 + s[S_BUFFER])
    mem_e = (s[S_W_ENC] + s[S_KV_TOKEN] * admitted * s[S_IN_MEAN] * p_e) / n_e
    mem_d = (s[S_W_DEC] + s[S_KV_TOKEN] * groups * b_d * s[S_CTX_MEAN]) / n_dd
    return admitted / period, latency, groups * b_d, max(mem_e, mem_d), float(n_e)
