"""Scheduling policies: when to run an encoding phase and how many queries it admits.

Each policy answers one question per step, `num_to_admit`: 0 means run a decoding iteration
of the running batch; k > 0 means run an encoding phase for the next k waiting queries
(under WAA: hand them to the encode workers, and decode on). Everything else (slots, early
termination, compaction) is shared by the scheduler.

- RRA (paper section 4.1): one encoding phase of B_E queries, then N_D decoding iterations.
  Queries finish and leave at once; newly encoded ones join the running batch.
- STATIC (FasterTransformer-like): a batch is encoded together and decoded until its longest
  member finishes; finished rows keep being computed (no early termination), nobody joins.
- CONTINUOUS (ORCA/vLLM-like): iteration-level; a waiting query is encoded as soon as a slot
  is free, then joins the running batch at the next iteration.
- WAA (paper section 4.1, engine/waa.py): encode batches of up to B_E queries go to the
  encode workers while the decode side iterates; an arrived batch joins the running batch
  at the next iteration. Its queries hold their future rows from the hand-out on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adaptive.schedule import Policy, Schedule


@dataclass(frozen=True)
class BatchState:
    num_running: int  # rows in the cache, finished-but-held rows included
    num_waiting: int
    num_free_slots: int
    iters_since_encode: int  # decoding iterations since the last encoding phase
    num_encode_batches: int = 0  # WAA: batches on the encode workers (counted as running)


class SchedulingPolicy(Protocol):
    @property
    def holds_finished_rows(self) -> bool:
        """True: finished queries keep their row until the whole batch ends."""
        ...

    def num_to_admit(self, state: BatchState) -> int: ...

    def at_phase_boundary(self, state: BatchState) -> bool:
        """Whether a new schedule may take over before this step (nothing is cut)."""
        ...


def _room(state: BatchState, cap: int) -> int:
    return max(0, min(cap, state.num_waiting, state.num_free_slots))


@dataclass(frozen=True)
class RoundRobin:
    encode_batch: int
    decode_iters: int
    max_batch: int
    holds_finished_rows: bool = False

    def num_to_admit(self, state: BatchState) -> int:
        if state.num_running and state.iters_since_encode < self.decode_iters:
            return 0
        return _room(state, min(self.encode_batch, self.max_batch - state.num_running))

    def at_phase_boundary(self, state: BatchState) -> bool:
        """Any step: a decoding iteration is never cut, and the next schedule counts the
        iterations run since the last encoding phase against its own N_D, so it takes over
        within a step rather than after up to N_D iterations (seconds at large N_D)."""
        return True


@dataclass(frozen=True)
class StaticBatching:
    batch_size: int
    holds_finished_rows: bool = True

    def num_to_admit(self, state: BatchState) -> int:
        return 0 if state.num_running else _room(state, self.batch_size)

    def at_phase_boundary(self, state: BatchState) -> bool:
        return not state.num_running


@dataclass(frozen=True)
class ContinuousBatching:
    max_batch: int
    holds_finished_rows: bool = False

    def num_to_admit(self, state: BatchState) -> int:
        return _room(state, self.max_batch - state.num_running)

    def at_phase_boundary(self, state: BatchState) -> bool:
        return True


# One encode batch being computed and one queued behind it keep the encode workers busy
# without taking more queries from the queue than that ahead of the decode side.
MAX_ENCODE_BATCHES = 2


@dataclass(frozen=True)
class WorkloadAware:
    encode_batch: int
    max_batch: int
    holds_finished_rows: bool = False

    def num_to_admit(self, state: BatchState) -> int:
        if state.num_encode_batches >= MAX_ENCODE_BATCHES:
            return 0
        return _room(state, min(self.encode_batch, self.max_batch - state.num_running))

    def at_phase_boundary(self, state: BatchState) -> bool:
        return True


def make_policy(schedule: Schedule, lanes: int = 1) -> SchedulingPolicy:
    """The policy of one of `lanes` schedulers that share the schedule's batches
    (engine/pipelined.py): each takes 1/lanes of them, rounded up."""
    encode_batch = -(-schedule.encode_batch // lanes)
    max_batch = -(-schedule.max_batch // lanes)
    if schedule.policy is Policy.RRA:
        return RoundRobin(encode_batch, schedule.decode_iters, max_batch)
    if schedule.policy is Policy.STATIC:
        return StaticBatching(encode_batch)
    if schedule.policy is Policy.CONTINUOUS:
        return ContinuousBatching(max_batch)
    return WorkloadAware(encode_batch, max_batch)
