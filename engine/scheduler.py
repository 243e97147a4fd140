"""The scheduler: plans each engine step and applies its result.

One step of the engine is

    plan = scheduler.schedule()        # encode phase for k new queries, or decode iteration
    result = runner.execute(plan)      # model forward + sampling; reads requests only
    changed = scheduler.update(plan, result)

An encoding phase may carry the running rows' decoding iteration (`carry_decode`): the
runner then makes a token for the new queries and for every running row in one pass.

`update` is the only place a request changes. A query that finishes leaves at once
(early termination): its KV row is released and the last running row is moved into it
(see `engine.kv_slots`); the copy is carried in the next plan so the runner applies it
before it reads the cache. The policy object decides only when to encode and how many.
WAA, whose encoding runs on other workers while the driver decodes, plans on the same
rows in a subclass (engine/waa.py).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from adaptive.schedule import Schedule
from engine.kv_slots import SlotManager
from engine.policies import BatchState, SchedulingPolicy, make_policy
from engine.request import Request, RequestStatus


class Phase(enum.Enum):
    ENCODE = "encode"
    DECODE = "decode"


@dataclass(frozen=True)
class RowMove:
    """Copy the cache row of `request` from src to dst before the step runs."""

    src: int
    dst: int
    request: Request


@dataclass(frozen=True)
class StepPlan:
    phase: Phase
    requests: tuple[Request, ...]  # ENCODE: the new queries; DECODE: rows 0..n-1 in order
    moves: tuple[RowMove, ...] = ()
    # ENCODE only: rows 0..n-1 decoding in the same forward pass (see `carry_decode`)
    carried: tuple[Request, ...] = ()
    # WAA (DECODE only): the queries handed to the encode workers now; the batches on them,
    # oldest first (this one last); the rows of the arrived batches' queries (-1: not kept),
    # to fill before the forward; the decoding iteration's micro-batches
    dispatched: tuple[Request, ...] = ()
    awaiting: tuple[tuple[Request, ...], ...] = ()
    installs: tuple[tuple[int, ...], ...] = ()
    num_microbatches: int = 0

    @property
    def computed(self) -> tuple[Request, ...]:
        """Every request this step makes a token for, in the order of the runner's tokens."""
        return self.requests + self.carried


@dataclass(frozen=True)
class StepResult:
    """What the runner made of a plan: one token per `plan.computed`; under WAA also the
    first token of every query of each encode batch that arrived, oldest first."""

    tokens: list[int]
    arrived: list[list[int]] = field(default_factory=list)


@dataclass
class RequestTable:
    """The queue and the live requests, shared by the schedulers of a pipelined engine."""

    waiting: deque[Request] = field(default_factory=deque)
    requests: dict[str, Request] = field(default_factory=dict)  # unfinished or row-holding


class Scheduler:
    """carry_decode: an encoding phase also runs the running batch's next decoding
    iteration in the same forward pass (ORCA's selective batching), so the running queries
    never stall while new ones are encoded; False gives the paper's strict alternation.

    A pipelined engine (engine/pipelined.py) runs `lanes` schedulers, each over rows of
    its own and 1/lanes of the schedule's batches, taking queries from one `table`."""

    def __init__(
        self,
        schedule: Schedule,
        num_slots: int,
        eos_ids: frozenset[int],
        *,
        carry_decode: bool = True,
        lanes: int = 1,
        table: RequestTable | None = None,
    ) -> None:
        self.eos_ids = eos_ids
        self.carry_decode = carry_decode
        self.lanes = lanes
        self.slots = SlotManager(num_slots)
        self.schedule_value = schedule
        self.policy: SchedulingPolicy = self._policy_for(schedule)
        self._next_schedule: Schedule | None = None
        table = table or RequestTable()
        self.waiting = table.waiting
        self.requests = table.requests
        self._pending_moves: list[RowMove] = []
        self._iters_since_encode = 0

    # -- requests in and out -------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request as aborted and free its row now; None if unknown or finished."""
        request = self.requests.get(request_id)
        if request is None or request.status.is_finished:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def set_schedule(self, schedule: Schedule) -> None:
        """Takes effect at the next step where the running policy allows it: the next one
        under RRA and continuous batching, after the batch under static batching."""
        self._policy_for(schedule)  # reject a schedule this engine cannot run, now
        self._next_schedule = schedule

    def _policy_for(self, schedule: Schedule) -> SchedulingPolicy:
        if schedule.policy.is_waa:
            raise ValueError(
                f"policy {schedule.policy.value} encodes on separate workers: it needs an "
                "engine started with a WAA schedule over 2 or more workers"
            )
        return make_policy(schedule, self.lanes)

    @property
    def num_unfinished(self) -> int:
        return sum(not r.status.is_finished for r in self.requests.values())

    def running(self) -> list[Request]:
        """Requests holding cache rows, in row order."""
        return [self.requests[owner] for owner in self.slots.owners()]

    def fail_started(self) -> list[Request]:
        """The model workers were lost, and with them every cache row: finish the requests
        that held one of this scheduler's as aborted (the caller reports the failure);
        waiting ones stay."""
        started = [
            r
            for r in self.requests.values()
            if r.status > RequestStatus.WAITING
            and (r.slot is None or self.slots.holds(r.request_id))
        ]
        for request in started:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._pending_moves = []
        return started

    # -- one step ----------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step, or None when there is nothing to run."""
        moves, self._pending_moves = tuple(self._pending_moves), []
        state = self._batch_state()
        if self._next_schedule is not None and self.policy.at_phase_boundary(state):
            self.schedule_value, self._next_schedule = self._next_schedule, None
            self.policy = self._policy_for(self.schedule_value)
        return self._plan(self.policy.num_to_admit(state), moves)

    def _batch_state(self) -> BatchState:
        return BatchState(
            num_running=self.slots.num_used,
            num_waiting=len(self.waiting),
            num_free_slots=self.slots.num_free,
            iters_since_encode=self._iters_since_encode,
        )

    def _plan(self, admit: int, moves: tuple[RowMove, ...]) -> StepPlan | None:
        if admit:
            carried = tuple(self.running()) if self.carry_decode else ()
            new = self._start(admit)
            for request in new:
                request.slot = self.slots.allocate(request.request_id)
            # a carried iteration is the first of the N_D decoding iterations that follow
            self._iters_since_encode = 1 if carried else 0
            return StepPlan(Phase.ENCODE, new, moves, carried)
        if self.slots.num_used:
            self._iters_since_encode += 1
            return StepPlan(Phase.DECODE, tuple(self.running()), moves)
        return None

    def _start(self, count: int) -> tuple[Request, ...]:
        """The next `count` waiting queries, now encoding."""
        new = tuple(self.waiting.popleft() for _ in range(count))
        now = time.monotonic()
        for request in new:
            request.status = RequestStatus.ENCODING
            request.encode_start_time = now
        return new

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append each row's new token, finish what is done; returns requests that changed."""
        now = time.monotonic()
        return [
            request
            for request, token in zip(plan.computed, result.tokens, strict=True)
            if self._append(request, token, now)
        ]

    def _append(self, request: Request, token: int, now: float) -> bool:
        """Give `request` its next token and finish it if that ends it; False (nothing
        done) for a held row (static batching) or a request aborted mid-step."""
        if request.status.is_finished:
            return False
        request.output_ids.append(token)
        if request.status is RequestStatus.ENCODING:
            request.status = RequestStatus.DECODING
            request.first_token_time = now
        if token in self.eos_ids and not request.params.ignore_eos:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        elif request.num_output_tokens >= request.params.max_tokens:
            self._finish(request, RequestStatus.FINISHED_LENGTH)
        return True

    def finish_stopped(self, request: Request) -> None:
        """A stop string was found in the request's text."""
        if not request.status.is_finished:
            self._finish(request, RequestStatus.FINISHED_STOPPED)

    # -- rows --------------------------------------------------------------------------
    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finish_time = time.monotonic()
        if request.slot is None:
            del self.requests[request.request_id]
            return
        holds = self.policy.holds_finished_rows
        if not holds or status is RequestStatus.FINISHED_ABORTED:
            self._release(request)
        # static batching: finished rows are computed until the whole batch is done, and
        # released together, whether its last member finished or was aborted
        running = self.running()
        if holds and running and all(r.status.is_finished for r in running):
            for held in running:
                self._release(held)

    def _release(self, request: Request) -> None:
        move = self.slots.free(request.request_id)
        if move is not None:
            moved = self.requests[self.slots.owners()[move.dst]]
            moved.slot = move.dst
            if self._is_cached(moved):
                # a row moved twice before the next step still has its data at the first src
                earlier = [m for m in self._pending_moves if m.request is moved]
                src = earlier[0].src if earlier else move.src
                self._pending_moves = [m for m in self._pending_moves if m.request is not moved]
                self._pending_moves.append(RowMove(src, move.dst, moved))
        request.slot = None
        del self.requests[request.request_id]

    def _is_cached(self, request: Request) -> bool:
        """Whether the row's data is in the cache yet (WAA: not before it is placed)."""
        return True
