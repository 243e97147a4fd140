"""A query's lifecycle inside the engine.

Status only moves forward: WAITING -> ENCODING -> DECODING -> FINISHED_*. The scheduler's
update step is the only place that changes a request; the runner reads, never writes.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    ENCODING = 1
    DECODING = 2
    FINISHED_STOPPED = 3  # EOS or a stop string
    FINISHED_LENGTH = 4  # reached max_tokens
    FINISHED_ABORTED = 5  # client went away or the server is shutting down

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    slot: int | None = None  # KV slot while encoded and not finished
    encode_start_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_context_tokens(self) -> int:
        """Tokens whose keys and values sit in the cache after the last step."""
        return self.num_prompt_tokens + max(self.num_output_tokens - 1, 0)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
