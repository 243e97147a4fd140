"""Carrying measured layer profiles to another device or tensor-parallel degree.

The packaged profiles were measured on an H100, but the paper's clusters are A40s and
A100s (Table 2). Mixing H100 compute with A40 PCIe links and memory makes communication
look 5-7x more expensive relative to compute than on the real card, which penalises
whatever uses tensor parallelism (FasterTransformer at full TP above all). `on_device`
rescales every table cell by the ratio of the two devices' roofline times for that cell:

    t_target = t_measured * max(F / peak_t, B / bw_t) / max(F / peak_s, B / bw_s)

with F the layer shard's FLOPs and B its bytes moved (weights, KV cache, activations)
at that (batch, length). Measured inefficiencies survive as a multiplier; what changes
is where a layer turns from bandwidth- to compute-bound (A100: ~150 FLOP/byte, A40:
~215, H100: ~295). Launch overhead would scale too, which is why the reproduction uses
the CUDA-graph profiles. The rescaled table is made monotone and subadditive in batch
again (`adaptive.profile.monotone_subadditive`): the ratio rises with batch over the
target's earlier turn to compute-bound, and uncorrected it gave A100 decode layers a
log-log slope of 1.4 per doubling, so throughput fell as batches grew.

`with_degree` adds a tensor-parallel degree the profile lacks (the CUDA-graph run stopped
before tp=8) from the nearest measured degree, time scaled by shard size: the layer is
bandwidth- or compute-bound on its shard, both of which shrink with the degree.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from adaptive.cluster import Device
from adaptive.profile import BYTES_BF16, Profile, monotone_subadditive

FloatArray = npt.NDArray[np.float64]
CROSS_SELF_TOKENS = 64  # T5 cross_decode points: self-attention over 64 generated tokens


def layer_work(
    profile: Profile, kind: int, tp: int, batch: FloatArray, length: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(FLOPs, bytes) of one layer shard; kind 0 encodes `length` tokens per query,
    kind 1 decodes one token per query over `length` cached ones."""
    h, a, f = profile.hidden, profile.heads * profile.head_dim, profile.ffn
    cross = kind == 1 and profile.is_encdec
    params = ((8 if cross else 4) * h * a + 2 * h * f) / tp
    if kind == 0:
        tokens = batch * length
        causal = 1.0 if profile.is_encdec else 0.5
        flops = 2.0 * tokens * params + 4.0 * causal * batch * length**2 * a / tp
        activations = BYTES_BF16 * tokens * (4 * h + (4 * a + 2 * f) / tp)
        return flops, BYTES_BF16 * params + activations
    context = length + (CROSS_SELF_TOKENS if cross else 0)
    flops = 2.0 * batch * params + 4.0 * batch * context * a / tp
    kv = 2.0 * BYTES_BF16 * batch * context * a / tp
    return flops, BYTES_BF16 * params + kv


def _roofline(flops: FloatArray, nbytes: FloatArray, device: Device) -> FloatArray:
    return np.maximum(flops / device.peak_flops, nbytes / device.memory_bandwidth)


def on_device(profile: Profile, source: Device, target: Device) -> Profile:
    """The profile as if measured on `target` (it was measured on `source`)."""
    nb, nl = profile.tables.shape[2:]
    batch = np.exp2(profile.log2_batch0 + np.arange(nb, dtype=np.float64))[:, None]  # [nb, 1]
    length = np.exp2(profile.log2_len0 + np.arange(nl, dtype=np.float64))[None, :]  # [1, nl]
    tables = profile.tables.copy()  # [kind, tp, batch, length] ln seconds
    for kind in (0, 1):
        for k, tp in enumerate(profile.tps):
            flops, nbytes = layer_work(profile, kind, tp, batch, length)
            ratio = _roofline(flops, nbytes, target) / _roofline(flops, nbytes, source)
            # The ratio grows with batch where the target turns compute-bound first
            # (A100 vs H100: log-log slopes up to 1.4), which would make a doubled batch
            # cost more than two halves; restore the profile's invariants.
            tables[kind, k] = monotone_subadditive(tables[kind, k] + np.log(ratio))
    return replace(profile, tables=tables, source=f"{profile.source} on {target.name}")


def with_degree(profile: Profile, degree: int) -> Profile:
    """The profile with tensor-parallel `degree` added, if missing (see module doc)."""
    if degree in profile.tps or profile.heads % degree:
        return profile
    near = min(profile.tps, key=lambda t: (abs(math.log2(t / degree)), -t))
    tps = tuple(sorted((*profile.tps, degree)))
    extra = profile.tables[:, profile.tps.index(near)] + math.log(near / degree)
    tables = np.insert(profile.tables, tps.index(degree), extra, axis=1)
    return replace(profile, tps=tps, tables=np.ascontiguousarray(tables))
