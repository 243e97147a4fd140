"""`exegpt profile`: per-layer encode and decode times of a model on this device.

The planner (adaptive/profile.py) needs the time of ONE layer at (batch, length) points,
in the format of adaptive/profiles/README.md. We time the engine's own executor (packed
prefill, slot KV cache, masked decode, argmax sampling), not a stand-in layer, on models
cut down to the first k layers of each stack. Every point is measured as interleaved
pairs of a k_lo- and a k_hi-layer model, so drift in machine load hits both alike:

    layer_ms = median(t_hi - t_lo) / (k_hi - k_lo)
    head_ms  = median(t_lo) - k_lo * layer_ms      # embedding, final norm, LM head, argmax

and a whole-model step is `layers * layer_ms + head_ms` (`head_ms` is written beside the
layer times because on a 135M model with a 49k vocabulary the head is a large share of a
decode step). k_lo is 1, not 0, because a T5 executor needs its first block (it holds
the relative position bias). Encode uses k_hi = 2 (a layer dwarfs the head there);
decode uses k_hi = min(layers, 8), because a decode layer is small next to the head and
the difference of two close numbers would be mostly noise. `--statistic min` replaces the
medians by each slice's fastest run, for a machine shared with other jobs.

Layer time grows with batch and with length (the paper finds 96-97% of its points monotone
within 5%). A grid measured while other processes fought for the cores is not: neighbouring
points come out inverted by orders of magnitude, and a planner fed with it picks absurd
schedules. So every grid is checked: where more than MAX_INVERTED_SHARE of the pairs of
neighbours (batch or length doubled) have the larger point over INVERSION times faster,
the grid is measured again, up to `attempts` times, and the cleanest is kept; its share is
recorded as `inverted_share`, and the serving profile cache keeps only a clean one.

For T5 ("encdec"), "encode" is one encoder layer plus the decoder-side work the engine does
per layer while encoding (cross-attention K/V projection, first decoder step); "decode" is
a decoder layer with self-attention over ctx_len tokens and cross-attention over 64 encoder
tokens; "cross_decode" the reverse (what the planner reads for T5, see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from engine.model_loader import LoadedModel, load_model
from engine.models import EncodeItem, ModelExecutor, build_executor, pad_tokens_to
from engine.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

# The module lists that hold each architecture's layers, as attribute paths.
LAYER_STACKS = {
    "llama": ("model.layers",),
    "mistral": ("model.layers",),
    "qwen2": ("model.layers",),
    "gpt2": ("transformer.h",),
    "t5": ("encoder.block", "decoder.block"),
}
ENCDEC_FIXED_LEN = 64  # the other side's length in T5 decode points (README: 64 generated)
MIN_LAYER_MS = 1e-4  # floor for a layer time lost in noise (logged when used)
INVERSION = 1.5  # a smaller point this many times slower than its larger neighbour
MAX_INVERTED_SHARE = 0.1  # of neighbouring pairs; more: the grid is noise, measured again


@dataclass(frozen=True)
class ProfileOptions:
    max_batch: int = 64
    min_len: int = 32
    max_len: int = 1024
    max_tokens: int = 16384  # encode points above batch * seq_len tokens are skipped
    warmup: int = 2
    runs: int = 5
    # "median" (default) or "min": on a CPU shared with other jobs, interference only ever
    # adds time, and the minimum of each slice's runs estimates the undisturbed cost
    statistic: str = "median"
    decode_layers: int = 8  # k_hi for decode points (capped at the model's layers)
    attempts: int = 3  # measurements of a grid that keeps coming out inverted (docstring)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.min_len < 1 or self.max_len < self.min_len:
            raise ValueError("profile grid needs max_batch >= 1 and max_len >= min_len >= 1")
        if self.runs < 1 or self.warmup < 0 or self.attempts < 1:
            raise ValueError("profile needs runs >= 1, warmup >= 0 and attempts >= 1")
        if self.statistic not in ("median", "min"):
            raise ValueError(f"statistic must be 'median' or 'min', got {self.statistic!r}")

    @property
    def batches(self) -> list[int]:
        return _powers_of_two(1, self.max_batch)

    @property
    def lengths(self) -> list[int]:
        return _powers_of_two(self.min_len, self.max_len)


QUICK = ProfileOptions(max_batch=16, max_len=256, max_tokens=4096, warmup=1, runs=3)


def _powers_of_two(low: int, high: int) -> list[int]:
    return [2**i for i in range(high.bit_length()) if low <= 2**i <= high]


# -- model facts -------------------------------------------------------------------------
def layer_shape(loaded: LoadedModel) -> dict[str, Any]:
    cfg = loaded.model.config
    if loaded.is_encoder_decoder:
        heads, head_dim, hidden = cfg.num_heads, cfg.d_kv, cfg.d_model
        return {
            "hidden": hidden,
            "heads": heads,
            "head_dim": head_dim,
            "ffn": cfg.d_ff,
            "layers": cfg.num_layers + cfg.num_decoder_layers,
            "encdec": True,
        }
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden,
        "heads": heads,
        "head_dim": head_dim,
        "ffn": ffn,
        "layers": layers,
        "encdec": False,
    }


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """K and V bytes one cached token costs over all decoder layers (T5: self or cross)."""
    cfg = loaded.model.config
    if loaded.is_encoder_decoder:
        kv_heads, head_dim, layers = cfg.num_heads, cfg.d_kv, cfg.num_decoder_layers
    else:
        shape = layer_shape(loaded)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or shape["heads"]
        head_dim, layers = shape["head_dim"], shape["layers"]
    return 2 * kv_heads * head_dim * layers * loaded.dtype.itemsize


def device_info(loaded: LoadedModel) -> tuple[str, int]:
    """(device name, total device memory in bytes): the GPU's, else the CPU's and RAM."""
    if loaded.device.type == "cuda":
        props = torch.cuda.get_device_properties(loaded.device)
        return props.name, int(props.total_memory)
    name, memory = platform.processor() or "cpu", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return name, memory


# -- slicing and timing ------------------------------------------------------------------
@contextlib.contextmanager
def _first_layers(loaded: LoadedModel, k: int) -> Iterator[None]:
    """Temporarily keep only the first k layers of every stack of the (profiler-owned) model.

    The whole call runs inside: a T5 executor walks the encoder's blocks at call time.
    """
    model_type = loaded.model.config.model_type
    if model_type not in LAYER_STACKS:
        raise ValueError(f"profile: unsupported architecture {model_type!r}")
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    for path in LAYER_STACKS[model_type]:
        parent_path, name = path.rsplit(".", 1)
        parent = loaded.model.get_submodule(parent_path)
        full = getattr(parent, name)
        saved.append((parent, name, full))
        setattr(parent, name, nn.ModuleList(list(full)[:k]))
    try:
        yield
    finally:
        for parent, name, full in saved:
            setattr(parent, name, full)


class _Slice:
    """An executor over the first k layers, sized for the whole grid."""

    def __init__(self, loaded: LoadedModel, k: int, num_slots: int, max_len: int) -> None:
        self.loaded, self.k = loaded, k
        self.is_cuda = loaded.device.type == "cuda"
        with _first_layers(loaded, k):
            self.executor: ModelExecutor = build_executor(loaded, num_slots, max_len)

    def time_ms(self, call: Callable[[ModelExecutor], torch.Tensor]) -> float:
        """Wall time of one executor call plus sampling, as the engine's step pays it."""
        with _first_layers(self.loaded, self.k):
            self._sync()
            start = time.perf_counter()
            logits = call(self.executor)
            sample(logits, [_GREEDY] * logits.shape[0], [None] * logits.shape[0])
            self._sync()
            return (time.perf_counter() - start) * 1000.0

    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()


_GREEDY = SamplingParams(max_tokens=1)
Call = Callable[[ModelExecutor], torch.Tensor]


def _measure(lo: _Slice, hi: _Slice, call: Call, opts: ProfileOptions) -> tuple[float, float]:
    """(layer_ms, head_ms) from interleaved runs of the two slices (module docstring)."""
    for _ in range(opts.warmup):
        lo.time_ms(call)
        hi.time_ms(call)
    pairs = [(lo.time_ms(call), hi.time_ms(call)) for _ in range(opts.runs)]
    if opts.statistic == "min":
        t_lo, t_hi = min(low for low, _ in pairs), min(h for _, h in pairs)
        layer = (t_hi - t_lo) / (hi.k - lo.k)
    else:  # median of paired differences: load drift between pairs cancels
        t_lo = statistics.median(low for low, _ in pairs)
        layer = statistics.median(h - low for low, h in pairs) / (hi.k - lo.k)
    if layer < MIN_LAYER_MS:
        logger.warning("layer time lost in noise (%.4f ms); floored at %s ms", layer, MIN_LAYER_MS)
        layer = MIN_LAYER_MS
    head = max(t_lo - lo.k * layer, MIN_LAYER_MS)
    return layer, head


# -- the grid ----------------------------------------------------------------------------
Points = dict[str, list[list[float]]]


def _points(kind: str, opts: ProfileOptions) -> list[tuple[int, int]]:
    grid = [(b, n) for n in opts.lengths for b in opts.batches]
    return [(b, n) for b, n in grid if kind != "encode" or b * n <= opts.max_tokens]


def _prompts(loaded: LoadedModel, batch: int, length: int, seed: int) -> list[EncodeItem]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, loaded.vocab_size - 100, (batch, length), generator=gen, device="cpu")
    return [EncodeItem(slot=i, token_ids=row) for i, row in enumerate(ids.tolist())]


def _encode_point(
    loaded: LoadedModel, lo: _Slice, hi: _Slice, batch: int, length: int, opts: ProfileOptions
) -> tuple[float, float]:
    items = _prompts(loaded, batch, length, seed=length)
    return _measure(lo, hi, lambda ex: ex.forward(items, [], []), opts)


def _decode_point(
    loaded: LoadedModel,
    lo: _Slice,
    hi: _Slice,
    kind: str,
    batch: int,
    ctx: int,
    opts: ProfileOptions,
) -> tuple[float, float]:
    if loaded.is_encoder_decoder:
        # the cached side that is not being varied is fixed at 64 tokens (README format)
        enc_len, self_len = (
            (ctx, ENCDEC_FIXED_LEN) if kind == "cross_decode" else (ENCDEC_FIXED_LEN, ctx)
        )
        items = _prompts(loaded, batch, enc_len, seed=batch)
        for piece in (lo, hi):
            piece.time_ms(
                lambda ex: ex.forward(items, [], [])
            )  # untimed: sets rows' encoder lengths
        ctx = self_len
    tokens, lens = [1000] * batch, [ctx] * batch
    return _measure(lo, hi, lambda ex: ex.forward([], tokens, lens), opts)


def _profile_points(
    loaded: LoadedModel, opts: ProfileOptions, bar: tqdm[Any]
) -> tuple[Points, Points]:
    """(layer points, head points) per kind: {kind: [[batch, length, ms], ...]}."""
    shape = layer_shape(loaded)
    per_stack = shape["layers"] // 2 if shape["encdec"] else shape["layers"]
    if per_stack < 2:
        raise ValueError("profile needs a model with at least 2 layers per stack")
    slots, max_len = opts.max_batch, max(opts.max_len, ENCDEC_FIXED_LEN) + 1
    lo, enc_hi = _Slice(loaded, 1, slots, max_len), _Slice(loaded, 2, slots, max_len)
    k_dec = min(per_stack, opts.decode_layers)
    dec_hi = enc_hi if k_dec == 2 else _Slice(loaded, k_dec, slots, max_len)
    layers: Points = {}
    heads: Points = {}
    for kind in _kinds(loaded):
        layers[kind], heads[kind] = [], []
        for batch, length in _points(kind, opts):
            bar.set_postfix_str(f"{kind} b={batch} len={length}")
            if kind == "encode":
                layer, head = _encode_point(loaded, lo, enc_hi, batch, length, opts)
            else:
                layer, head = _decode_point(loaded, lo, dec_hi, kind, batch, length, opts)
            layers[kind].append([batch, length, round(layer, 5)])
            heads[kind].append([batch, length, round(head, 5)])
            bar.update()
    return layers, heads


def _kinds(loaded: LoadedModel) -> tuple[str, ...]:
    return (
        ("encode", "decode", "cross_decode") if loaded.is_encoder_decoder else ("encode", "decode")
    )


def inverted_share(layers: Points) -> float:
    """The share of neighbouring grid points (batch or length doubled) where the larger
    point measured over INVERSION times faster than the smaller: near 0 on a clean grid."""
    pairs = inverted = 0
    for points in layers.values():
        ms = {(int(b), int(n)): t for b, n, t in points}
        for (b, n), t in ms.items():
            for larger in ((2 * b, n), (b, 2 * n)):
                if larger in ms:
                    pairs += 1
                    inverted += t > INVERSION * ms[larger]
    return inverted / pairs if pairs else 0.0


def is_clean(raw: dict[str, Any]) -> bool:
    """Whether every TP entry of a profile's JSON passes the inversion check."""
    kinds = ("encode", "decode", "cross_decode")
    return all(
        inverted_share({k: entry[k] for k in kinds if k in entry}) <= MAX_INVERTED_SHARE
        for entry in raw.get("tp", [])
    )


def profile_model(
    loaded: LoadedModel, opts: ProfileOptions, *, progress: bool = True
) -> dict[str, Any]:
    """Measure the grid and return the profile as a JSON-ready dict (README format); a
    grid that comes out inverted is measured again (module docstring).

    The model's layer lists are cut down while this runs: no engine may use it meanwhile.
    """
    total = sum(len(_points(kind, opts)) for kind in _kinds(loaded))
    started = time.perf_counter()
    measured: list[tuple[float, Points, Points]] = []
    for attempt in range(1, opts.attempts + 1):
        desc = f"profile {loaded.name}" + (f" (attempt {attempt})" if attempt > 1 else "")
        with tqdm(total=total, desc=desc, disable=not progress) as bar:
            layers, heads = _profile_points(loaded, opts, bar)
        share = inverted_share(layers)
        measured.append((share, layers, heads))
        if share <= MAX_INVERTED_SHARE:
            break
        logger.warning(
            "profile of %s: %.0f%% of neighbouring points inverted (over %.0f%%): the "
            "machine was busy; measuring again",
            loaded.name,
            100 * share,
            100 * MAX_INVERTED_SHARE,
        )
    share, layers, heads = min(measured, key=lambda m: m[0])
    shape = layer_shape(loaded)
    device, memory = device_info(loaded)
    entry: dict[str, Any] = {
        "tp": 1,
        "shard": shape,
        **layers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return {
        "model": loaded.name,
        "device": device,
        "torch": torch.__version__,
        "dtype": str(loaded.dtype),
        "num_threads": torch.get_num_threads(),
        "layer": shape,
        "tp": [entry],
        "head_ms": heads,  # per step, not per layer: embedding + final norm + LM head + argmax
        "weight_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        "kv_bytes_per_token": kv_bytes_per_token(loaded),
        "pad_tokens_to": pad_tokens_to(loaded),
        "device_memory_bytes": memory,
        "statistic": opts.statistic,
        "inverted_share": round(share, 4),
        "method": f"engine executor on 1..k-layer slices, {opts.runs} interleaved runs after "
        f"{opts.warmup} warm-ups; layer = {opts.statistic} (t_hi - t_lo) / (k_hi - k_lo), "
        "head = t_lo - layer (engine/profiler.py)",
    }


# -- command line ------------------------------------------------------------------------
def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_device_argument, add_model_arguments

    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch (2^k)")
    parser.add_argument("--max-len", type=int, default=None, help="longest prompt/context")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="skip encode points over this many tokens per call",
    )
    parser.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="per-point reducer; 'min' for a machine shared with other jobs",
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small grid (batch <= 16, length <= 256), 3 runs per point",
    )


def options_from_args(args: argparse.Namespace) -> ProfileOptions:
    base = QUICK if args.quick else ProfileOptions()
    return ProfileOptions(
        max_batch=args.max_batch or base.max_batch,
        min_len=base.min_len,
        max_len=args.max_len or base.max_len,
        max_tokens=args.max_tokens or base.max_tokens,
        warmup=base.warmup,
        runs=base.runs,
        statistic=args.statistic,
        decode_layers=base.decode_layers,
        attempts=base.attempts,
    )


def run_profile(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    # as the engine does: all cores unless told (the profile must match how it will run)
    torch.set_num_threads(args.num_threads or os.cpu_count() or 1)
    loaded = load_model(args.model, args.dtype)
    profile = profile_model(loaded, opts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    entry = profile["tp"][0]
    print(
        f"wrote {args.out}: {len(entry['encode'])} encode and {len(entry['decode'])} decode "
        f"points in {entry['seconds']} s on {profile['device']}, "
        f"{100 * profile['inverted_share']:.0f}% of neighbouring points inverted"
    )
    return 0
