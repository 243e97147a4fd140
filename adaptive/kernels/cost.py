"""Numba cost model: scenario-vector layout, layer, stage and pass times.

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
node link and one send to the next stage. Where a pipeline switches from encoding to
decoding, the slower encode stages hold the decodes back for p - 1 stage-slots
(`phase_bubble`); RRA pays it every cycle, FasterTransformer once per batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
from numba import njit

from adaptive.cache import cache_dir

F = TypeVar("F", bound=Callable[..., Any])
Arr = npt.NDArray[np.float64]
IArr = npt.NDArray[np.int64]
Point = tuple[float, float, float, float, float]
# Parallel layout: (k1, kd, d, n_plain, n_groups), the tables' TP index for plain stages
# and for TP groups, the TP degree d, plain stages, TP groups of d devices.
Layout = tuple[int, int, int, int, int]


def numba_cache_dir(kernels: Path) -> str:
    """Where numba keeps the machine code of the kernels in folder `kernels`: a folder
    named by a digest of every kernel source, under $NUMBA_CACHE_DIR if set, else exegpt's
    cache. Numba keys a function's cache on its own file alone, so a kernel calling into an
    edited or upgraded module would load machine code with the old callee inlined."""
    sources = sorted(kernels.glob("*.py"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    root = Path(numba.config.CACHE_DIR or cache_dir() / "numba")  # type: ignore[attr-defined]
    return str(root / f"exegpt_kernels_{digest}")


# read when each kernel below (and in the modules importing this one) is decorated
numba.config.CACHE_DIR = numba_cache_dir(Path(__file__).parent)  # type: ignore[attr-defined]


def jit(fn: F) -> F:
    """njit with an on-disk cache, typed for mypy (numba ships no stubs).

    nogil: the online controller solves on a background thread of the engine process;
    kernels that release the GIL let the step loop run meanwhile."""
    return cast(F, njit(cache=True, nogil=True)(fn))


ENCODE = 0
DECODE = 1

# Scenario vector layout, filled by adaptive.simulator.build_scenario.
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
# A query's decoding iterations: its output length less the tokens its encoding makes
# (exegpt's engine samples the first token from the encoding pass; the paper's model counts
# every output token as a decoding iteration). A query of 0 iterations ends with its encoding.
S_DEC_MEAN = 18
S_DEC_TARGET = 19  # iterations of the output length the latency bound is stated for (p99)
S_DEC_MAX = 20
S_IN_MAX = 21
S_CTX_MEAN = 22  # mean context of a running decode query (length-biased)
S_BUFFER = 23  # WAA's buffer for dynamic workload adjustment, fraction of latency
# Standard deviation of prompt lengths, for RRA's latency percentile over queries (0: the
# paper's latency, every encoding phase at the mean prompt length).
S_IN_SD = 24
# Tokens an encoding step computes beyond its prompts, on average: the engine rounds a
# step's token count up to a multiple of its profile's `pad_tokens_to` (0: the paper's).
S_PAD = 25
S_SIZE = 26

INFEASIBLE = (0.0, math.inf, 0.0, math.inf, 0.0)


@jit
def layer_time(tables: Arr, axes: Arr, kind: int, k: int, batch: float, length: float) -> float:
    """Bilinear interpolation of ln t over (log2 batch, log2 length).

    Past the last profiled batch the time grows with the work, t(b) = t(b_max) * b / b_max
    (slope 1 in log-log, the rule profile loading fills holes with): the layer is compute-
    or bandwidth-bound there, and a batch never costs more than its halves run one after
    the other. Extrapolating the last segment's slope instead carried one segment's
    slope over many doublings (RRA decode batches reach 1e4 at small N_D; 1.4 per doubling
    on roofline-scaled A100 tables gave throughput falling with B_E). Below the first
    batch: flat. Lengths: the last segment's slope.
    """
    nb = tables.shape[2]
    nl = tables.shape[3]
    x = math.log2(max(batch, 1.0)) - axes[0]
    beyond = max(x - (nb - 1), 0.0)  # doublings past the grid, each doubling the time
    x -= beyond
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
    scale: float = 2.0**beyond
    return math.exp(v) * scale


@jit
def padded_length(mean_padding: float, batch: float, length: float) -> float:
    """The prompt length an encoding step of `batch` prompts computes per prompt, its
    padding spread over them."""
    return length + mean_padding / max(batch, 1.0)


@jit
def allreduce_time(s: Arr, nbytes: float, d: int) -> float:
    """Ring all-reduce among d devices of one node."""
    if d <= 1:
        return 0.0
    bandwidth_s: float = 2.0 * (d - 1) / d * nbytes / s[S_INTRA_BW]
    return bandwidth_s + 2.0 * (d - 1) * float(s[S_INTRA_LAT])


@jit
def split_devices(k1: int, kd: int, d: int, n: int, g: int) -> Layout:
    """The layout of n devices, g of them in TP groups of degree d, the rest plain stages."""
    n_groups = g // d if d > 1 else 0
    return k1, kd, d, n - n_groups * d, n_groups


@jit
def n_stages(lay: Layout) -> int:
    """Pipeline stages P: plain stages plus TP groups."""
    return lay[3] + lay[4]


@jit
def stage_time(
    tables: Arr, axes: Arr, s: Arr, kind: int, lay: Layout, b: float, length: float
) -> float:
    """Slowest stage's time for a mini-batch of b queries at `length` tokens of context.

    An encode stage runs the encode layers over all `length` prompt tokens; a decode stage
    the decode layers over one new token per query.
    """
    k1, kd, d, n_plain, n_groups = lay
    if kind == ENCODE:  # each mini-batch is a step of its own, padded
        length = padded_length(s[S_PAD], b, length)
    layers = s[S_L_ENC] if kind == ENCODE else s[S_L_DEC]
    tokens = length if kind == ENCODE else 1.0
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


@jit
def pass_time(
    tables: Arr, axes: Arr, s: Arr, kind: int, lay: Layout, batch: float, length: float
) -> float:
    """All `batch` queries through every layer once, as P pipelined mini-batches."""
    p = n_stages(lay)
    return p * stage_time(tables, axes, s, kind, lay, batch / p, length)


@jit
def weight_bytes(s: Arr) -> float:
    """Weights of the whole model, the shared layers counted once (decoder-only)."""
    shared: float = 0.0 if s[S_W_SHARED] > 0 else s[S_W_DEC]
    return float(s[S_W_ENC]) + shared


@jit
def phase_bubble(p: int, t_enc: float, t_dec: float) -> float:
    """Idle time when an RRA pipeline of p stages switches from encoding to decoding.

    t_enc, t_dec: pass times of the phases, p stage-slots each (stage times e, d). A
    mini-batch's decode enters stage 0 only after its encoding left the last stage, and
    in lock-step every slot that still holds an encode somewhere runs at the encode pace:

        slot:     0   1   2   3   4
        stage 0: E0  E1  E2  D0  D1      p = 3: slots 0..4 (2p - 1) hold an encode,
        stage 1:     E0  E1  E2  D0      p of them charged as the encode pass, the other
        stage 2:         E0  E1  E2      p - 1 carry decodes that wait e - d each.

    The paper's "small amount of bubbles between encoding and decoding phases" (4.1).
    """
    return (p - 1) * max(t_enc - t_dec, 0.0) / p


@jit
def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
