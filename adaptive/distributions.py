"""Input and output length distributions (the paper's P_E and P_D).

A `LengthDistribution` holds two histograms indexed by length (index 0 is always empty)
and the output length the latency bound is stated for (the paper's 99th-percentile
length). It is built three ways: from the paper's task table (Table 3: truncated normals,
either as exact discrete PMFs or as a seeded sample), from a JSONL file of lengths, or
from observed samples, exponentially decayed so the online controller can follow drift.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from adaptive.errors import PlanningError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TaskSpec:
    """A row of Table 3: inputs (mean, std, max); outputs (mean, std, p99, max)."""

    input_mean: float
    input_std: float
    input_max: int
    output_mean: float
    output_std: float
    output_p99: int
    output_max: int


TASKS: dict[str, TaskSpec] = {
    "S": TaskSpec(256, 252, 512, 32, 13, 63, 80),  # summarization
    "T": TaskSpec(128, 81, 256, 128, 68, 292, 320),  # translation
    "G": TaskSpec(64, 23, 128, 192, 93, 417, 480),  # code generation
    "C1": TaskSpec(256, 115, 512, 64, 30, 137, 160),  # conversational Q&A
    "C2": TaskSpec(512, 252, 1024, 256, 134, 579, 640),  # conversational Q&A, long
}


def _readonly(values: FloatArray) -> FloatArray:
    values.setflags(write=False)
    return values


def _percentile(pmf: FloatArray, q: float) -> int:
    cdf = np.cumsum(pmf)
    return int(np.searchsorted(cdf, q * cdf[-1] - 1e-12))


@dataclass(frozen=True, eq=False)
class LengthDistribution:
    """Histograms of input and output lengths, normalised to PMFs.

    input_pmf, output_pmf: [max_len + 1] probabilities, index = length, index 0 is zero.
    target_output_len:     the output length the latency bound applies to (p99 by default).
    weight:                effective number of samples behind the histograms (inf: analytic).
    """

    input_pmf: FloatArray
    output_pmf: FloatArray
    target_output_len: int = 0
    weight: float = math.inf
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        for label in ("input_pmf", "output_pmf"):
            pmf = np.asarray(getattr(self, label), dtype=np.float64)
            if pmf.ndim != 1 or pmf.size < 2 or not np.all(np.isfinite(pmf)):
                raise PlanningError(f"{label} must be a 1-D finite histogram over lengths")
            if np.any(pmf < 0) or pmf[1:].sum() <= 0:
                raise PlanningError(f"{label} is empty: no positive length has any weight")
            pmf = pmf.copy()
            pmf[0] = 0.0
            object.__setattr__(self, label, _readonly(pmf / pmf.sum()))
        if self.target_output_len <= 0:
            object.__setattr__(self, "target_output_len", _percentile(self.output_pmf, 0.99))
        if self.target_output_len > self.max_output:
            raise PlanningError("target_output_len exceeds the longest output length")

    @property
    def mean_input(self) -> float:
        return float(np.dot(np.arange(self.input_pmf.size), self.input_pmf))

    @property
    def mean_output(self) -> float:
        return float(np.dot(np.arange(self.output_pmf.size), self.output_pmf))

    @property
    def p99_input(self) -> int:
        return _percentile(self.input_pmf, 0.99)

    @property
    def p99_output(self) -> int:
        return _percentile(self.output_pmf, 0.99)

    @property
    def max_input(self) -> int:
        return int(np.flatnonzero(self.input_pmf)[-1])

    @property
    def max_output(self) -> int:
        return int(np.flatnonzero(self.output_pmf)[-1])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """Draw n independent (input, output) length pairs."""
        inputs = rng.choice(self.input_pmf.size, size=n, p=self.input_pmf)
        outputs = rng.choice(self.output_pmf.size, size=n, p=self.output_pmf)
        return inputs.astype(np.int64), outputs.astype(np.int64)

    @classmethod
    def from_task(
        cls, task: str, *, num_samples: int | None = None, seed: int = 0, scale: float = 1.0
    ) -> LengthDistribution:
        """The paper's Table 3 task as truncated normals on [1, max].

        Without num_samples the histograms are the exact discretised PMFs (deterministic);
        with it, num_samples lengths are drawn with numpy's default_rng(seed), by
        rejection as in the anchor workloads. Either way the latency target is Table 3's
        99th-percentile output length, because no simple reading of (mean, std)
        reproduces the paper's percentiles. `scale` shrinks every length (mean, spread,
        maximum, p99) by that factor, e.g. to fit a smaller context.
        """
        spec = TASKS.get(task.upper())
        if spec is None:
            raise PlanningError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if not 0 < scale <= 1:
            raise PlanningError(f"scale must be in (0, 1], got {scale}")
        if scale < 1:
            spec = TaskSpec(
                input_mean=spec.input_mean * scale,
                input_std=spec.input_std * scale,
                input_max=max(1, round(spec.input_max * scale)),
                output_mean=spec.output_mean * scale,
                output_std=spec.output_std * scale,
                output_p99=max(1, round(spec.output_p99 * scale)),
                output_max=max(1, round(spec.output_max * scale)),
            )
        if num_samples is None:
            inputs = _truncated_normal_pmf(spec.input_mean, spec.input_std, spec.input_max)
            outputs = _truncated_normal_pmf(spec.output_mean, spec.output_std, spec.output_max)
        else:
            rng = np.random.default_rng(seed)
            in_lens = sample_truncated(
                rng, spec.input_mean, spec.input_std, spec.input_max, num_samples
            )
            out_lens = sample_truncated(
                rng, spec.output_mean, spec.output_std, spec.output_max, num_samples
            )
            inputs = _histogram(in_lens, spec.input_max)
            outputs = _histogram(out_lens, spec.output_max)
        target = min(spec.output_p99, int(np.flatnonzero(outputs)[-1]))
        return cls(inputs, outputs, target_output_len=target, name=task.upper())

    @classmethod
    def from_samples(
        cls, input_lens: npt.ArrayLike, output_lens: npt.ArrayLike, *, name: str = "samples"
    ) -> LengthDistribution:
        """Histograms of observed lengths, each sample weighing one."""
        return observe(None, input_lens, output_lens, decay=1.0, name=name)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> LengthDistribution:
        """Lengths from a JSONL file of {"prompt_len": int, "output_len": int} objects."""
        inputs: list[int] = []
        outputs: list[int] = []
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise PlanningError(f"cannot read lengths file {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                inputs.append(int(row["prompt_len"]))
                outputs.append(int(row["output_len"]))
            except (ValueError, KeyError, TypeError):
                raise PlanningError(
                    f'{path}:{number}: expected {{"prompt_len": int, "output_len": int}}'
                ) from None
        return cls.from_samples(inputs, outputs, name=Path(path).stem)


def observe(
    previous: LengthDistribution | None,
    input_lens: npt.ArrayLike,
    output_lens: npt.ArrayLike,
    *,
    decay: float,
    name: str = "observed",
) -> LengthDistribution:
    """Fold new samples into a decayed copy of `previous` (counts * decay + new counts).

    The online controller calls this per window of completed requests; decay in (0, 1]
    sets how fast old traffic is forgotten (1 = never). An analytic `previous` (infinite
    weight) cannot be decayed into counts and is rejected.
    """
    if not 0.0 < decay <= 1.0:
        raise PlanningError(f"decay must be in (0, 1], got {decay}")
    ins = np.asarray(input_lens, dtype=np.int64).ravel()
    outs = np.asarray(output_lens, dtype=np.int64).ravel()
    if ins.size != outs.size:
        raise PlanningError("input and output length samples must pair up one to one")
    if ins.size and (ins.min() < 1 or outs.min() < 1):
        raise PlanningError("lengths must be >= 1")
    size_in = max(int(ins.max(initial=0)), previous.max_input if previous else 0)
    size_out = max(int(outs.max(initial=0)), previous.max_output if previous else 0)
    in_counts = _histogram(ins, size_in)
    out_counts = _histogram(outs, size_out)
    weight = float(ins.size)
    if previous is not None:
        if not math.isfinite(previous.weight):
            raise PlanningError("cannot decay an analytic distribution; start from samples")
        old = previous.weight * decay
        in_counts[: previous.input_pmf.size] += previous.input_pmf * old
        out_counts[: previous.output_pmf.size] += previous.output_pmf * old
        weight += old
    if weight <= 0:
        raise PlanningError("no length samples to build a distribution from")
    return LengthDistribution(in_counts, out_counts, weight=weight, name=name)


def _histogram(lengths: IntArray, max_len: int) -> FloatArray:
    return np.bincount(lengths, minlength=max_len + 1).astype(np.float64)


def _truncated_normal_pmf(mean: float, std: float, max_len: int) -> FloatArray:
    lengths = np.arange(max_len + 1, dtype=np.float64)
    pmf = np.exp(-0.5 * ((lengths - mean) / std) ** 2)
    pmf[0] = 0.0
    return np.asarray(pmf / pmf.sum(), dtype=np.float64)


def sample_truncated(
    rng: np.random.Generator, mean: float, std: float, max_len: int, n: int
) -> IntArray:
    """n lengths from a normal(mean, std) truncated to [1, max_len], in draw order."""
    # Rejection keeps the shape of the normal inside [1, max] (as the anchor workloads do).
    out = np.empty(0, dtype=np.float64)
    while out.size < n:
        draw = rng.normal(mean, std, size=max(2 * n, 16))
        out = np.concatenate([out, draw[(draw >= 1) & (draw <= max_len)]])
    return np.clip(np.rint(out[:n]), 1, max_len).astype(np.int64)
