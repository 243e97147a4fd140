"""WAA on the driver (paper section 4.1): the decode side's scheduler and runner.

The workers are split (engine.layout.Allocation): the encode workers encode the batches
the driver hands them, asynchronously, while the driver and the other decode workers run
decoding iterations of the running batch. One engine step is one decoding iteration, or,
while no row is running, a wait for the oldest encode batch:

    schedule  hand up to B_E waiting queries to the encode workers (at most
              MAX_ENCODE_BATCHES batches out; their queries count as running, holding
              their future rows), place the batches that arrived at the last update
    execute   hand out, place, decode the running rows in B_m micro-batches; then take
              the batches that arrived meanwhile and sample their first tokens from the
              logits the encode side sent (sampling stays here, with each request's
              generator)
    update    each row's token as always; each arrived query gets its first token and,
              unless that finished it, a row at the end of the running batch, its KV copied
              in by the next step: it joins at the next iteration boundary

A row whose KV is not placed yet has nothing to compact: when a finished query's row is
refilled by such a row, no copy is queued, and its placement goes to the row it now has;
a query that finishes before its placement (a stop string in its first token, an abort)
is placed nowhere.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from torch.profiler import record_function

from adaptive.schedule import Schedule
from engine.efficiency import PHASE_LABELS
from engine.policies import BatchState, SchedulingPolicy, make_policy
from engine.request import Request
from engine.runner import ModelRunner
from engine.scheduler import Phase, RowMove, Scheduler, StepPlan, StepResult
from engine.workers import WorkerGroup


class WaaScheduler(Scheduler):
    def __init__(self, schedule: Schedule, num_slots: int, eos_ids: frozenset[int]) -> None:
        super().__init__(schedule, num_slots, eos_ids, carry_decode=False)
        self._encoding: deque[tuple[Request, ...]] = deque()  # handed out, oldest first
        self._arrived: list[tuple[Request, ...]] = []  # to place at the next step

    def _policy_for(self, schedule: Schedule) -> SchedulingPolicy:
        if not schedule.policy.is_waa:
            raise ValueError(
                "this engine's workers are split into encode and decode workers: it runs "
                f"waa_c or waa_m schedules, not {schedule.policy.value}"
            )
        return make_policy(schedule)

    @property
    def num_encoding(self) -> int:
        """Queries on the encode workers."""
        return sum(len(batch) for batch in self._encoding)

    def fail_started(self) -> list[Request]:
        started = super().fail_started()
        self._encoding.clear()
        self._arrived = []
        return started

    def _batch_state(self) -> BatchState:
        reserved = self.num_encoding
        return BatchState(
            num_running=self.slots.num_used + reserved,
            num_waiting=len(self.waiting),
            num_free_slots=self.slots.num_free - reserved,
            iters_since_encode=0,
            num_encode_batches=len(self._encoding),
        )

    def _plan(self, admit: int, moves: tuple[RowMove, ...]) -> StepPlan | None:
        new = self._start(admit)
        if new:
            self._encoding.append(new)
        # every arrived batch is placed, even with no query kept: the decode workers
        # drop its buffers in the same order they were announced
        installs = tuple(
            tuple(-1 if r.slot is None else r.slot for r in batch) for batch in self._arrived
        )
        self._arrived = []
        rows = tuple(self.running())
        if not (rows or self._encoding or installs):
            return None
        return StepPlan(
            Phase.DECODE,
            rows,
            moves,
            dispatched=new,
            awaiting=tuple(self._encoding),
            installs=installs,
            num_microbatches=self.schedule_value.decode_microbatches,
        )

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        changed = super().update(plan, result)
        now = time.monotonic()
        for tokens in result.arrived:
            batch = self._encoding.popleft()
            for request, token in zip(batch, tokens, strict=True):
                if self._append(request, token, now):
                    changed.append(request)
                    if not request.status.is_finished:
                        request.slot = self.slots.allocate(request.request_id)
            self._arrived.append(batch)
        return changed

    def _is_cached(self, request: Request) -> bool:
        return not any(r is request for batch in self._arrived for r in batch)


class WaaRunner(ModelRunner):
    """Runs a WaaScheduler's plans on split workers (WorkerGroup.decode, take_encoded)."""

    def __init__(self, workers: WorkerGroup, is_encoder_decoder: bool) -> None:
        super().__init__(workers, is_encoder_decoder)
        self.workers = workers

    def execute(self, plan: StepPlan) -> StepResult:
        with record_function(PHASE_LABELS[plan.phase.value]):
            self._move_rows(plan)
            rows = plan.requests
            logits = self.workers.decode(
                [r.output_ids[-1] for r in rows],
                [self.context_len(r) for r in rows],
                encodes=[[r.prompt_ids for r in plan.dispatched]] if plan.dispatched else [],
                installs=[list(slots) for slots in plan.installs],
                num_microbatches=plan.num_microbatches,
            )
            tokens = self._sample(logits, rows)
        # with no row to decode there is nothing to do but wait for the encode workers
        arrived: list[torch.Tensor] = self.workers.take_encoded(block=not rows)
        assert len(arrived) <= len(plan.awaiting), "more encode batches than handed out"
        batches = zip(arrived, plan.awaiting, strict=False)  # the oldest ones arrived
        return StepResult(tokens, [self._sample(first, batch) for first, batch in batches])
