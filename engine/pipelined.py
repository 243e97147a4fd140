"""Pipelined steps over model workers in pipeline stages: one scheduler per stage.

A step's tokens are the next step's inputs, so the steps of one running batch cannot
overlap: with the batch cut into micro-batches inside a step, P stages are all busy only
in its middle, and each step pays the pipeline's fill and drain (P - 1 stage times). The
engine therefore splits its cache rows into P lanes, each with a scheduler of its own
over 1/P of the schedule's batches, fed from one queue, and keeps one step of each lane
in flight. A lane's step goes to the workers as one micro-batch; while it passes the
later stages, the driver samples the lane ahead of it and starts that lane's next step:

    stage 0:  A0  B0  A1  B1  A2          step() k: take lane k's logits, update it,
    stage 1:      A0  B0  A1  B1          plan and submit its next step

This is the planner's model of a pipeline (adaptive/kernels/cost.py: P mini-batches of
B / P, a pass of all B costs P stage times) and the paper's 7 -> 3 2/3 (section 4.2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch.profiler import record_function

from engine.efficiency import PHASE_LABELS
from engine.runner import ModelRunner
from engine.scheduler import StepPlan, StepResult
from engine.workers import WorkerGroup


class LaneRunner(ModelRunner):
    """Runs one lane's plans on the rows [first_row, first_row + its slots) of the
    workers' caches; `submit` returns once the driver's stage has done its part."""

    is_pipelined = True

    def __init__(self, workers: WorkerGroup, is_encoder_decoder: bool, first_row: int) -> None:
        super().__init__(workers, is_encoder_decoder)
        self.workers = workers
        self.first_row = first_row

    def submit(self, plan: StepPlan) -> Callable[[], StepResult]:
        label = PHASE_LABELS[plan.phase.value]  # for `--profile-steps`, as execute's
        with record_function(label):
            self._move_rows(plan, self.first_row)
            step = self.workers.submit(*self._inputs(plan, self.first_row), self.first_row)

        def result() -> StepResult:
            with record_function(label):
                return StepResult(self._sample(self.workers.collect(step), plan.computed))

        return result


@dataclass
class LaneStep:
    """A lane's step between its submission and its result."""

    plan: StepPlan
    result: Callable[[], StepResult]
    started: float  # time.perf_counter() at submission

    def finish(self) -> tuple[StepResult, float]:
        """The result (waited for) and the seconds from submission to it."""
        result = self.result()
        return result, time.perf_counter() - self.started
