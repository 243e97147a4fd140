"""External reference for the offline bench: Hugging Face `generate` with static batches.

The same queries in arrival order, cut into batches of a fixed size, each padded on the
left to its longest prompt and decoded until its longest output (EOS suppressed with
min_new_tokens = max_new_tokens), like FasterTransformer's static batching. A stopping
criterion stamps the time of every generated token, so a query's latency ends at its own
last token (its output_len-th), as in our engine, not when the batch returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from engine.bench_offline import RunResult, RunWork
from engine.model_loader import LoadedModel
from engine.workloads import Query

logger = logging.getLogger(__name__)


class _TokenClock(StoppingCriteria):
    """Records when each new token exists; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.stamps.append(time.monotonic())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [batch, width]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def _generate_batch(
    loaded: LoadedModel, prompts: Sequence[list[int]], new_tokens: int
) -> list[float]:
    """Token timestamps of one padded batch, relative to the start of its generate call."""
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    ids, mask = _left_padded(prompts, pad_id)
    clock = _TokenClock()
    start = time.monotonic()
    loaded.model.generate(  # type: ignore[operator]
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    return [stamp - start for stamp in clock.stamps]


def run_hf_static(
    loaded: LoadedModel,
    task: str,
    batch_size: int,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
) -> RunResult:
    latencies: list[float] = []
    computed = 0  # left padding to the longest prompt, every row to the longest output
    start = time.monotonic()
    for first in range(0, len(queries), batch_size):
        batch = queries[first : first + batch_size]
        longest = max(q.output_len for q in batch)
        computed += len(batch) * (max(q.prompt_len for q in batch) + longest - 1)
        stamps = _generate_batch(loaded, prompts[first : first + batch_size], longest)
        latencies.extend(stamps[q.output_len - 1] for q in batch)
    makespan = time.monotonic() - start
    tokens = sum(q.output_len for q in queries)
    work = RunWork.of(loaded, queries, computed)
    knobs = {"batch_size": batch_size}
    return RunResult("hf_generate", task, knobs, tuple(latencies), makespan, tokens, work)


def warm_up_hf(loaded: LoadedModel, prompts: Sequence[list[int]]) -> None:
    """One short generate, so one-time setup does not land in the first measured batch."""
    _generate_batch(loaded, [p[:32] for p in prompts[:2]], 2)
