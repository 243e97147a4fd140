"""exegpt's compiled CPU kernels for bf16 models, built on first use.

- `decode_attention.cpp`: a decode iteration's attention over the slot KV cache, each
  running row over its own context only. The executor's other path, one
  `scaled_dot_product_attention` call over the batch, reads every row's cache up to the
  longest context in the batch and masks the rest, and reads a KV head once per query
  head of its GQA group. The kernel reads a row's keys and values once, up to its own
  length: a decode iteration's attention ran 1.9-2.7x faster on two cores
  (benchmarks/README.md, `benchmarks/kernels_ab.py`). On CPUs with AVX512-BF16 its scores
  and weighted values are bf16 dot products (another 1.35x in isolation), its softmax is
  vectorised and a pass over the values keeps the heads' sums in registers (1.6x more).
- `prefill_attention.cpp`: causal attention over an encoding step's packed prompts, on
  CPUs with AVX512-BF16 (elsewhere it is not built in and torch's flash attention runs):
  scores and weighted values as bf16 dot products with float32 sums, softmax vectorised
  across positions. Torch's flash attention, called once per prompt, spent 40% of a long
  encoding step there at ~60 GFLOP/s.
- `llama_ops.cpp`: the Llama family's RMSNorm and rotary embedding, one pass over the
  activations each instead of five or six torch operations, rounded as those operations
  round in bf16.
- `linear_bf16.cpp`: projections (weights packed once, the SiLU, product or residual sum
  after them applied to the float32 sums), on CPUs with AVX512-BF16. oneDNN's packed
  kernels, which torch runs otherwise, took 1.5x as long for a 32-row decoding iteration
  whose weights come from memory, 1.4x for one row.

`avx512_bf16.h` holds the AVX512-BF16 helpers both attention kernels use, `head_dims.h`
their dispatch to the compiled head sizes (HEAD_DIMS). The sources are compiled with
torch's C++ extension loader (ninja and the machine's C++ compiler, `-march=native`) into
`$EXEGPT_CACHE/kernels/`, once per source and CPU, about 15 s; later starts load the
library. The ops are registered as `torch.ops.exegpt_cpu.*`,
so the step profile sorts them like torch's own. Where the build fails (no compiler) or
`EXEGPT_KERNELS=off`, the executor keeps the torch operations; the log says which. Float32
models always use the torch operations, which are bit for bit Hugging Face's.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from adaptive.cache import cache_dir

logger = logging.getLogger(__name__)

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by the sources
# fast math lets the reductions vectorize; NaN and infinity keep their meaning
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
HEAD_DIMS = (16, 32, 64, 128)  # the kernels' compiled head sizes (head_dims.h)
MAX_GROUP = 16  # query heads per KV head
Tensor = torch.Tensor
DecodeAttention = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
PrefillAttention = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def build_dir() -> Path:
    """Where this source, these flags, this CPU and this torch build the library."""
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
        + " ".join(CFLAGS).encode()
        + _cpu_signature().encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"exegpt_kernels_{digest}"


@cache
def _load() -> bool:
    """Build (or load the cached build of) the kernels; False where that is not possible."""
    if os.environ.get("EXEGPT_KERNELS", "on").lower() in ("off", "0", "false", "no"):
        logger.info("EXEGPT_KERNELS=off: torch operations run instead of exegpt's kernels")
        return False
    build = build_dir()
    library, ready = build / f"{build.name}.so", build / "ready"
    try:
        if not ready.exists():
            _build(build, ready)
        torch.ops.load_library(str(library))
    except Exception as exc:  # no compiler or ninja, a failed build: torch's operations stay
        logger.warning("exegpt's CPU kernels are unavailable (%s); torch operations run", exc)
        return False
    return True


def _build(build: Path, ready: Path) -> None:
    """Compile into `build`, one process at a time: the others wait on a lock the kernel
    releases if its holder dies, so a build killed halfway holds no later start."""
    build.mkdir(parents=True, exist_ok=True)
    with (build / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():  # another process built it meanwhile
            return
        logger.info("building exegpt's CPU kernels into %s (once, ~15 s)", build)
        # torch's loader keeps its own lock file, which a killed build leaves behind and
        # the loader would wait on forever; under ours, any such file is stale
        (build / "lock").unlink(missing_ok=True)
        from torch.utils import cpp_extension  # imports setuptools: only to build

        cpp_extension.load(
            name=build.name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
        )
        ready.touch()


def signature(dtype: torch.dtype, device: torch.device) -> str:
    """What runs for `dtype` models on `device`: the kernels' build (named by a digest of
    their sources, flags, CPU and torch), or "torch"; measurements of one do not stand for
    another."""
    return build_dir().name if enabled_for(dtype, device) else "torch"


def enabled_for(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether executors of `dtype` on `device` run the compiled kernels (building them if
    needed): bf16 models on the CPU; on a GPU torch's operations run."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _load()


def decode_attention(
    dtype: torch.dtype, device: torch.device, head_dim: int, num_heads: int, num_kv_heads: int
) -> DecodeAttention | None:
    """The compiled decode attention for this model's shapes, or None where it does not
    apply (not bf16 on the CPU, other head sizes) or cannot be built.

    The op takes q [n, heads, head_dim], the cache rows' k and v views
    [n, kv_heads, span, head_dim] (head_dim contiguous), each row's number of keys [n]
    (int64) and the softmax scale; it returns [n, heads, head_dim]."""
    if not _attention_applies(dtype, device, head_dim, num_heads, num_kv_heads):
        return None
    op: DecodeAttention = torch.ops.exegpt_cpu.decode_attention
    return op


def prefill_attention(
    dtype: torch.dtype, device: torch.device, head_dim: int, num_heads: int, num_kv_heads: int
) -> PrefillAttention | None:
    """The compiled causal attention over packed prompts, or None where it does not apply
    (as decode_attention's, and on CPUs without AVX512-BF16, where it is not built in).

    The op takes q [T, heads, head_dim], k and v [T, kv_heads, head_dim] (any strides,
    head_dim contiguous), the prompts' lengths [S] (int64, packing order) and the softmax
    scale; it returns [sum(lengths), heads, head_dim], each prompt attending causally
    within itself."""
    if not _attention_applies(dtype, device, head_dim, num_heads, num_kv_heads):
        return None
    if not hasattr(torch.ops.exegpt_cpu, "prefill_attention"):
        return None
    op: PrefillAttention = torch.ops.exegpt_cpu.prefill_attention
    return op


def _attention_applies(
    dtype: torch.dtype, device: torch.device, head_dim: int, num_heads: int, num_kv_heads: int
) -> bool:
    grouped = num_heads % num_kv_heads == 0 and num_heads <= MAX_GROUP * num_kv_heads
    return head_dim in HEAD_DIMS and grouped and enabled_for(dtype, device)


@dataclass(frozen=True)
class Projection:
    """The compiled bf16 projection: `pack(w [N, K])` once, then `apply(x [M, K], packed,
    bias [N] or None, N, post, other [M, N] or None, widen)` -> post(x @ w.T + bias), post
    one of "none", "silu", "mul" (times other), "add" (plus other), rounded to bf16 once;
    with widen those bf16 values come as float32."""

    pack: Callable[[Tensor], Tensor]
    apply: Callable[[Tensor, Tensor, Tensor | None, int, str, Tensor | None, bool], Tensor]


def projection(dtype: torch.dtype, device: torch.device) -> Projection | None:
    """The compiled projection for `dtype` weights on `device`, or None where it does not
    apply (not bf16 on the CPU) or is not built in (no AVX512-BF16)."""
    if not enabled_for(dtype, device) or not hasattr(torch.ops.exegpt_cpu, "linear"):
        return None
    return Projection(torch.ops.exegpt_cpu.pack_linear, torch.ops.exegpt_cpu.linear)


def rms_norm(
    dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor, Tensor, float], Tensor] | None:
    """rms_norm(x [T, H], weight [H], eps) for `dtype` activations on `device`, or None."""
    return torch.ops.exegpt_cpu.rms_norm if enabled_for(dtype, device) else None


def rotary(
    dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """rotary(x [T, heads, D], cos [T, 1, D], sin [T, 1, D]) for `dtype` on `device`, or None."""
    return torch.ops.exegpt_cpu.rotary if enabled_for(dtype, device) else None
