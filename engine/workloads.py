"""Benchmark workloads: query lengths (the paper's tasks or a JSONL file) and their prompts.

The task table (the paper's Table 3) and its sampler live in `adaptive.distributions`; this
module only orders them into queries. With seed 0 and 96 queries, tasks S and C1 give
exactly the anchor workloads behind the peer numbers (/work/shared/workloads): all input
lengths are drawn first, then all output lengths, by rejection from a normal on [1, max].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The planner's sampler reproduces the anchor workloads; LengthDistribution.from_task keeps
# only histograms, which lose the arrival order, so queries are drawn here with it directly.
from adaptive.distributions import TASKS, sample_truncated


@dataclass(frozen=True)
class Query:
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"query lengths must be >= 1, got {self}")


def task_queries(task: str, num_queries: int, seed: int = 0, scale: float = 1.0) -> list[Query]:
    """`num_queries` queries of the paper's task, lengths multiplied by `scale` (>= 1 token)."""
    spec = TASKS.get(task.upper())
    if spec is None:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if num_queries < 1 or scale <= 0:
        raise ValueError("need num_queries >= 1 and scale > 0")
    rng = np.random.default_rng(seed)
    inputs = sample_truncated(rng, spec.input_mean, spec.input_std, spec.input_max, num_queries)
    outputs = sample_truncated(rng, spec.output_mean, spec.output_std, spec.output_max, num_queries)
    return [
        Query(max(1, round(i * scale)), max(1, round(o * scale)))
        for i, o in zip(inputs.tolist(), outputs.tolist(), strict=True)
    ]


def read_lengths(path: str | Path, scale: float = 1.0) -> list[Query]:
    """Queries from a JSONL file of {"prompt_len": int, "output_len": int}, in line order."""
    queries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt_len, output_len = int(row["prompt_len"]), int(row["output_len"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'{path}:{number}: expected {{"prompt_len": int, "output_len": int}}'
            ) from None
        queries.append(Query(max(1, round(prompt_len * scale)), max(1, round(output_len * scale))))
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def make_prompts(queries: list[Query], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Uniform random token ids in [100, vocab - 100): timing does not depend on content."""
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab_size - 100, q.prompt_len).tolist() for q in queries]
