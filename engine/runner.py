"""The model runner: executes a StepPlan on the model and samples one token per row.

It reads requests and never changes them; the cache rows it writes are the ones the plan
names (plus the compaction copies the plan carries, applied first). WAA's runner, which
drives split workers, is in engine/waa.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

from engine.efficiency import KV_MOVE_LABEL, PHASE_LABELS, SAMPLING_LABEL
from engine.models import EncodeItem, ModelExecutor
from engine.request import Request
from engine.sampling import sample
from engine.scheduler import Phase, StepPlan, StepResult


class ModelRunner:
    # whether `submit` returns before the step is done (engine/pipelined.py)
    is_pipelined = False

    def __init__(self, executor: ModelExecutor, is_encoder_decoder: bool) -> None:
        self.executor = executor
        self.is_encoder_decoder = is_encoder_decoder

    def context_len(self, request: Request) -> int:
        """Cached positions of a row once its last output token is the next input.

        Decoder-only rows cache the prompt and all outputs but the newest; encoder-decoder
        rows cache the decoder start token and all outputs but the newest.
        """
        cached_outputs = max(request.num_output_tokens - 1, 0)
        return cached_outputs + (1 if self.is_encoder_decoder else request.num_prompt_tokens)

    def submit(self, plan: StepPlan) -> Callable[[], StepResult]:
        """Start the plan's step; the callable gives its result. Here the step runs to the
        end first."""
        result = self.execute(plan)
        return lambda: result

    def execute(self, plan: StepPlan) -> StepResult:
        # the labels let `engine.efficiency.profile_steps` sort a step's time; free otherwise
        with record_function(PHASE_LABELS[plan.phase.value]):
            self._move_rows(plan)
            logits = self.executor.forward(*self._inputs(plan))
            return StepResult(self._sample(logits, plan.computed))

    def _inputs(
        self, plan: StepPlan, first_row: int = 0
    ) -> tuple[list[EncodeItem], list[int], list[int]]:
        """ModelExecutor.forward's arguments for the plan, its rows counted from
        `first_row` in the cache."""
        items = []
        if plan.phase is Phase.ENCODE:
            for r in plan.requests:
                assert r.slot is not None, f"request {r.request_id} scheduled without a row"
                items.append(EncodeItem(slot=first_row + r.slot, token_ids=r.prompt_ids))
        rows = plan.carried if plan.phase is Phase.ENCODE else plan.requests
        return items, [r.output_ids[-1] for r in rows], [self.context_len(r) for r in rows]

    def _move_rows(self, plan: StepPlan, first_row: int = 0) -> None:
        with record_function(KV_MOVE_LABEL):
            for move in plan.moves:
                length = self.context_len(move.request)
                self.executor.move_slot(first_row + move.src, first_row + move.dst, length)

    @staticmethod
    def _sample(logits: torch.Tensor, requests: tuple[Request, ...]) -> list[int]:
        with record_function(SAMPLING_LABEL):
            return sample(logits, [r.params for r in requests], [r.generator for r in requests])
