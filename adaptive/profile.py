"""Measured layer profiles: loading, validation and the dense log-space cost tables.

A profile file (format in `adaptive/profiles/README.md`) lists per-layer times at scattered
(batch, length) points for each tensor-parallel degree. The simulator needs a time at any
(batch, length), so loading turns the points into a dense table on a power-of-two grid of
ln(seconds), later interpolated bilinearly in (log2 batch, log2 length):

    table[kind, tp_index, i, j] = ln t(batch = 2**(b0 + i), length = 2**(l0 + j))
    kind 0 = encode (prefill / encoder layer), kind 1 = decode (cross_decode for T5)

Holes are filled by linear-in-batch extrapolation (slope 1 in log-log: past the grid the
layer is compute- or bandwidth-bound, so time grows with the work), missing lengths the
same way, a degree with no points at all from the nearest measured degree scaled by shard
size. Measurement noise makes raw times dip (decode batch 32 faster than batch 16) or
jump; the table is made monotone (a running maximum along both axes) and subadditive in
batch, t(2b) <= 2 t(b), since a batch of 2b could always run as two batches of b. Then
time never falls and throughput never falls as a batch grows, which is the monotonicity
the branch-and-bound relies on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adaptive.errors import PlanningError

FloatArray = npt.NDArray[np.float64]
PACKAGED = Path(__file__).resolve().parent / "profiles"
BYTES_BF16 = 2
VOCAB = 51200  # embedding rows counted in the weight estimate (OPT/GPT-3 vocabularies)
LAYER_KEYS = ("hidden", "heads", "head_dim", "ffn", "layers")


@dataclass(frozen=True, eq=False)
class Profile:
    """One model's cost tables plus the shape facts the memory model needs.

    tables: [2, len(tps), nb, nl] ln(seconds) per layer, see the module docstring.
    """

    model: str
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    layers: int
    is_encdec: bool
    tps: tuple[int, ...]
    tables: FloatArray
    log2_batch0: float
    log2_len0: float
    weight_bytes: float
    kv_bytes_per_token: float
    device_memory_bytes: float | None = None
    source: str = ""
    pad_tokens_to: int = 1  # the engine rounds an encoding step's tokens up to a multiple

    @property
    def mean_encode_padding(self) -> float:
        """Tokens an encoding step adds on average: its count's remainder is about
        uniform, so (pad_tokens_to - 1) / 2."""
        return (self.pad_tokens_to - 1) / 2.0

    @property
    def encode_layers(self) -> int:
        """Layers an encode pass runs (T5: the encoder half; decoder-only: all)."""
        return self.layers // 2 if self.is_encdec else self.layers

    @property
    def decode_layers(self) -> int:
        return self.layers - self.encode_layers if self.is_encdec else self.layers

    def layer_time_s(self, kind: str, tp: int, batch: float, length: float) -> float:
        """Interpolated time of one layer, for inspection and tests (the kernels inline it)."""
        from adaptive.kernels import layer_time

        if tp not in self.tps:
            raise PlanningError(f"profile {self.model} has no tp={tp}; it has {self.tps}")
        axes = np.array([self.log2_batch0, self.log2_len0])
        return layer_time(
            self.tables, axes, ("encode", "decode").index(kind), self.tps.index(tp), batch, length
        )


def load_profile(ref: str | Path) -> Profile:
    """Load a profile by path, or by model name (`opt-13b`, `h100-cudagraphs/opt-13b`).

    Names resolve to the packaged H100 profiles, then to `$EXEGPT_PROFILE_DIR/<name>.json`
    (where `exegpt profile` output may be kept).
    """
    path = _resolve(str(ref))
    return parse_profile(read_profile_json(path), source=str(path))


def read_profile_json(path: Path) -> Any:
    """A profile file's decoded JSON, unvalidated (parse_profile checks it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanningError(f"malformed profile {path}: {exc}") from None


def _resolve(ref: str) -> Path:
    candidate = Path(ref)
    if candidate.is_file():
        return candidate
    name = ref.removesuffix(".json")
    dirs = [PACKAGED / "h100", PACKAGED]
    if os.environ.get("EXEGPT_PROFILE_DIR"):
        dirs.append(Path(os.environ["EXEGPT_PROFILE_DIR"]))
    for directory in dirs:
        if (directory / f"{name}.json").is_file():
            return directory / f"{name}.json"
    known = sorted(p.stem for p in (PACKAGED / "h100").glob("*.json") if p.stem != "roofline")
    raise PlanningError(f"no profile {ref!r}: not a file, and not one of {', '.join(known)}")


def parse_profile(raw: Any, *, source: str = "<dict>") -> Profile:
    """Validate a decoded profile JSON object and build its dense tables."""
    if not isinstance(raw, dict) or not isinstance(raw.get("layer"), dict):
        raise PlanningError(f"malformed profile {source}: missing the 'layer' object")
    layer = raw["layer"]
    try:
        shape = {key: int(layer[key]) for key in LAYER_KEYS}
    except (KeyError, TypeError, ValueError):
        raise PlanningError(
            f"malformed profile {source}: 'layer' needs integer {', '.join(LAYER_KEYS)}"
        ) from None
    if min(shape.values()) < 1:
        raise PlanningError(f"malformed profile {source}: layer sizes must be positive")
    is_encdec = bool(layer.get("encdec", False))
    entries = raw.get("tp")
    if not isinstance(entries, list) or not entries:
        raise PlanningError(f"malformed profile {source}: 'tp' must be a non-empty list")
    points = _collect_points(entries, is_encdec, source)
    if isinstance(raw.get("head_ms"), dict):
        per_kind = (
            (shape["layers"] // 2, shape["layers"] // 2) if is_encdec else (shape["layers"],) * 2
        )
        _fold_head(points, raw["head_ms"], is_encdec, per_kind)
    tps = tuple(sorted(points))
    tables, b0, l0 = _dense_tables(points, tps, source)
    attn = shape["heads"] * shape["head_dim"]
    per_layer = BYTES_BF16 * (4 * shape["hidden"] * attn + 2 * shape["hidden"] * shape["ffn"])
    weights = per_layer * shape["layers"] + BYTES_BF16 * VOCAB * shape["hidden"]
    # K and V per token on every decoder layer (T5: cross K/V over inputs + self K/V).
    kv_layers = shape["layers"] // 2 if is_encdec else shape["layers"]
    kv_token = 2 * BYTES_BF16 * attn * kv_layers
    memory = raw.get("device_memory_bytes")
    return Profile(
        model=str(raw.get("model", Path(source).stem)),
        **shape,
        is_encdec=is_encdec,
        tps=tps,
        tables=tables,
        log2_batch0=b0,
        log2_len0=l0,
        weight_bytes=float(raw.get("weight_bytes", weights)),
        kv_bytes_per_token=float(raw.get("kv_bytes_per_token", kv_token)),
        device_memory_bytes=float(memory) if memory is not None else None,
        source=source,
        pad_tokens_to=int(raw.get("pad_tokens_to", 1)),
    )


Points = dict[int, tuple[list[list[float]], list[list[float]]]]


def _collect_points(entries: list[Any], is_encdec: bool, source: str) -> Points:
    points: Points = {}
    decode_key = "cross_decode" if is_encdec else "decode"
    for entry in entries:
        try:
            tp = int(entry["tp"])
            kinds = (entry.get("encode", []), entry.get(decode_key, []))
            rows = tuple([[float(v) for v in row] for row in kind] for kind in kinds)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PlanningError(f"malformed profile {source}: bad 'tp' entry") from None
        bad = [
            r
            for kind in rows
            for r in kind
            if len(r) != 3 or min(r) <= 0 or not all(map(math.isfinite, r))
        ]
        if tp < 1 or bad:
            raise PlanningError(
                f"malformed profile {source}: tp={tp} has points that are not "
                "[batch > 0, length > 0, ms > 0]"
            )
        points[tp] = (rows[0], rows[1])
    for kind, label in ((0, "encode"), (1, decode_key)):
        if not any(points[tp][kind] for tp in points):
            raise PlanningError(f"malformed profile {source}: no {label} points at any tp")
    return points


def _fold_head(
    points: Points, head_ms: dict[str, Any], is_encdec: bool, layers: tuple[int, int]
) -> None:
    """Spread an engine profile's per-step head time (embedding, final norm, LM head,
    sampling; `exegpt profile` writes it beside the layer times) over the layers.

    The simulator prices a step as layers x layer time; on a small model the head is a
    large share of a decode step, and without it predictions would undershoot what the
    engine measures. Only the tp=1 entry has a head (the engine profiles one device).
    """
    if 1 not in points:
        return
    keys = ("encode", "cross_decode" if is_encdec else "decode")
    for kind, (key, num_layers) in enumerate(zip(keys, layers, strict=True)):
        head = {(row[0], row[1]): row[2] for row in head_ms.get(key, []) if len(row) == 3}
        for row in points[1][kind]:
            row[2] += head.get((row[0], row[1]), 0.0) / num_layers


def _dense_tables(
    points: Points, tps: tuple[int, ...], source: str
) -> tuple[FloatArray, float, float]:
    rows = [r for tp in tps for kind in points[tp] for r in kind]
    log_b = np.rint(np.log2([r[0] for r in rows]))
    log_l = np.rint(np.log2([r[1] for r in rows]))
    b0, l0 = float(log_b.min()), float(log_l.min())
    nb = max(int(log_b.max() - b0) + 1, 2)
    nl = max(int(log_l.max() - l0) + 1, 2)
    tables = np.full((2, len(tps), nb, nl), np.nan)  # [kind, tp, batch, length]
    for k, tp in enumerate(tps):
        for kind in (0, 1):
            for batch, length, ms in points[tp][kind]:
                i = round(math.log2(batch) - b0)
                j = round(math.log2(length) - l0)
                tables[kind, k, i, j] = math.log(ms / 1000.0)
    for kind in (0, 1):
        for k in range(len(tps)):
            if np.isnan(tables[kind, k]).all():
                tables[kind, k] = _from_nearest_tp(tables[kind], tps, k)
            tables[kind, k] = _fill_grid(tables[kind, k])
    if not np.all(np.isfinite(tables)):
        raise PlanningError(f"malformed profile {source}: cannot fill the cost grid")
    return tables, b0, l0


def _from_nearest_tp(kind_tables: FloatArray, tps: tuple[int, ...], k: int) -> FloatArray:
    # A degree with no points: the nearest measured degree, time scaled by shard size.
    measured = [m for m in range(len(tps)) if not np.isnan(kind_tables[m]).all()]
    src = min(measured, key=lambda m: abs(math.log2(tps[m] / tps[k])))
    return np.asarray(kind_tables[src] + math.log(tps[src] / tps[k]), dtype=np.float64)


def _fill_grid(grid: FloatArray) -> FloatArray:
    out = grid.copy()  # [batch, length] of ln seconds, NaN where unmeasured
    for j in range(out.shape[1]):
        out[:, j] = _fill_line(out[:, j])
    for i in range(out.shape[0]):
        out[i, :] = _fill_line(out[i, :])
    return monotone_subadditive(out)


def monotone_subadditive(grid: FloatArray) -> FloatArray:
    """The cost invariants on one [batch, length] grid of ln seconds: never faster with
    more work (running maximum along both axes), never slower per query than two half
    batches (t(2b) <= 2 t(b)). Whatever rescales a table must restore them."""
    out = np.maximum.accumulate(grid, axis=1)
    for i in range(1, out.shape[0]):
        out[i] = np.minimum(np.maximum(out[i], out[i - 1]), out[i - 1] + math.log(2.0))
    return out


def _fill_line(line: FloatArray) -> FloatArray:
    known = np.flatnonzero(~np.isnan(line))
    if known.size == 0:
        return line
    idx = np.arange(line.size)
    filled = np.interp(idx, known, line[known])
    # Past the last point: one doubling doubles the time. Before the first: flat.
    above = idx > known[-1]
    filled[above] = line[known[-1]] + math.log(2.0) * (idx[above] - known[-1])
    return np.asarray(filled, dtype=np.float64)
