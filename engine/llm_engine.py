"""LLMEngine: requests in, token deltas out, one scheduler step at a time.

The engine is synchronous and single-threaded; whoever drives it (the engine process, a
benchmark, `exegpt generate`) calls `step()` in a loop while `has_unfinished()`. Under a
WAA schedule its workers are split into encode and decode workers for the engine's life,
and its steps are the decode side's (engine/waa.py). On workers in pipeline stages it runs
one lane per stage, each step serving the next lane (engine/pipelined.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from adaptive.schedule import Policy, Schedule
from engine.detokenizer import DetokenizerState, next_text
from engine.layout import Allocation, split_evenly
from engine.model_loader import LoadedModel, load_model
from engine.models import ModelExecutor, build_executor, pad_tokens_to
from engine.pipelined import LaneRunner, LaneStep
from engine.protocol import WorkerSpec, check_placement
from engine.request import Request
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import Phase, RequestTable, Scheduler, StepPlan
from engine.waa import WaaRunner, WaaScheduler
from engine.workers import WorkerFailure, WorkerGroup

logger = logging.getLogger(__name__)


def default_schedule() -> Schedule:
    return Schedule(Policy.RRA, encode_batch=16, decode_iters=8, max_batch=64)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "bfloat16"
    max_num_seqs: int = 64  # KV rows = the largest running batch
    max_model_len: int = 2048  # prompt + output tokens per query (capped by the model's)
    schedule: Schedule = field(default_factory=default_schedule)
    num_threads: int | None = None  # torch threads, shared by the workers; None = all cores
    detokenize: bool = True  # benchmarks that only count tokens can skip text
    # encoding phases carry the running batch's decoding iteration (Scheduler.carry_decode)
    carry_decode: bool = True
    # model worker processes (engine/workers.py): num_workers / tp_degree pipeline stages of
    # tp_degree tensor slices each; 1 worker runs the model in this process. A WAA schedule
    # spans them all, its encode_workers encoding apart (`allocation`)
    num_workers: int = 1
    tp_degree: int = 1
    worker_timeout_s: float = 300.0  # longest wait on another worker within a step
    # workers on other machines: this process listens for them at `rendezvous` (HOST:PORT)
    # and starts only `local_workers` of the group itself, itself included (None: all);
    # each other rank joins with `exegpt worker --rendezvous HOST:PORT --rank R`
    rendezvous: str | None = None
    local_workers: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        self.allocation_for(self.schedule)  # raises on workers that cannot be laid out
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        check_placement(self.num_workers, self.rendezvous, self.local_workers)

    def allocation_for(self, schedule: Schedule) -> Allocation:
        """How `schedule` splits the workers (WAA: its encode workers); ValueError if it
        cannot run on them."""
        policy = schedule.policy
        if not policy.is_waa:
            return Allocation(self.num_workers, self.tp_degree)
        if schedule.num_workers != self.num_workers:
            raise ValueError(
                f"policy {policy.value} runs encode and decode on separate workers: its "
                f"schedule spans {schedule.num_workers}, the engine has {self.num_workers} "
                "(--workers)"
            )
        return Allocation(self.num_workers, self.tp_degree, schedule.encode_workers)

    @property
    def threads_per_worker(self) -> int:
        """The cores here, shared by the workers here."""
        here = self.local_workers or self.num_workers
        return max(1, (self.num_threads or os.cpu_count() or 1) // here)


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    # time.monotonic() stamps, for latency accounting (the paper's query latency runs from
    # encode_start_time to the finish_time of its last token); None until they happen
    encode_start_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_free_slots: int
    schedule: Schedule


@dataclass
class StepCounters:
    """Work done since the engine started: what efficiency reports divide by."""

    # an encoding forward's rows are rounded up to a multiple of this (engine.models)
    pad_tokens_to: int = 1
    encode_steps: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0  # tokens encoded
    decode_rows: int = 0  # rows computed by decoding iterations (held finished rows included)
    padding_rows: int = 0  # rows encoding forwards computed beyond their tokens

    def record(self, plan: StepPlan) -> None:
        # WAA: the encode workers encode what is handed to them in one forward, apart from
        # the steps
        dispatched = sum(r.num_prompt_tokens for r in plan.dispatched)
        self.prompt_tokens += dispatched
        self.padding_rows += -dispatched % self.pad_tokens_to
        if plan.phase is Phase.ENCODE:
            self.encode_steps += 1
            prompts = sum(r.num_prompt_tokens for r in plan.requests)
            self.prompt_tokens += prompts
            self.decode_rows += len(plan.carried)
            self.padding_rows += -(prompts + len(plan.carried)) % self.pad_tokens_to
        elif plan.requests:  # (a WAA step without rows waited for the encode workers)
            self.decode_steps += 1
            self.decode_rows += len(plan.requests)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens + self.decode_rows + self.padding_rows


@dataclass(frozen=True)
class StepTiming:
    """What the last step ran and how long the model took: the controller's refit input.

    An encoding phase that carried the running rows' iteration is reported as encoding;
    its time includes those rows, which the planner prices as a decoding iteration of its
    own, so the refit errs on the slow side. A pipelined lane's step is timed from its
    submission to its logits: its way through every stage, which the planner prices as
    one device's time for its batch."""

    is_encode: bool
    batch: int
    length: float  # mean prompt length (encode) or mean cached context (decode)
    seconds: float


@dataclass
class Lane:
    """A scheduler over its own cache rows, its runner, and its step in flight."""

    scheduler: Scheduler
    runner: ModelRunner
    step: LaneStep | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LoadedModel | None = None) -> None:
        self.config = config
        torch.set_num_threads(config.threads_per_worker)
        self.model = model or load_model(config.model, config.dtype)
        self.max_model_len = min(config.max_model_len, self.model.max_model_len)
        self.allocation = config.allocation_for(config.schedule)
        self.workers: WorkerGroup | None = None
        executor: ModelExecutor
        if config.num_workers > 1:
            spec = WorkerSpec(
                model=self.model.name,
                dtype=str(self.model.dtype).removeprefix("torch."),
                num_slots=config.max_num_seqs,
                max_len=self.max_model_len,
                num_workers=config.num_workers,
                tp_degree=config.tp_degree,
                num_threads=config.threads_per_worker,
                timeout_s=config.worker_timeout_s,
                encode_workers=self.allocation.encode_workers,
            )
            executor = self.workers = WorkerGroup(
                self.model, spec, config.rendezvous, config.local_workers
            )
        else:
            executor = build_executor(self.model, config.max_num_seqs, self.max_model_len)
        self.lanes = self._lanes(executor)
        self._turn = 0  # the lane the next step serves
        self._detok: dict[str, DetokenizerState] = {}
        self._aborted: list[Request] = []
        self.counters = StepCounters(pad_tokens_to(self.model))
        self.last_step: StepTiming | None = None

    def _lanes(self, executor: ModelExecutor) -> list[Lane]:
        """One lane, or one per pipeline stage (engine/pipelined.py) on workers in stages."""
        config, eos_ids = self.config, self.model.eos_token_ids
        is_encdec = self.model.is_encoder_decoder
        if self.workers is not None and self.allocation.encode_workers:
            waa = WaaScheduler(config.schedule, config.max_num_seqs, eos_ids)
            return [Lane(waa, WaaRunner(self.workers, is_encdec))]
        stages = self.allocation.decode.num_stages if self.workers is not None else 1
        count = min(stages, config.max_num_seqs)
        table = RequestTable()
        lanes = []
        for rows in split_evenly(config.max_num_seqs, count):
            scheduler = Scheduler(
                config.schedule,
                len(rows),
                eos_ids,
                carry_decode=config.carry_decode,
                lanes=count,
                table=table,
            )
            runner = ModelRunner(executor, is_encdec)
            if count > 1:
                assert self.workers is not None
                runner = LaneRunner(self.workers, is_encdec, rows.start)
            lanes.append(Lane(scheduler, runner))
        return lanes

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of an engine that is not pipelined (one lane)."""
        assert len(self.lanes) == 1, "a pipelined engine has a scheduler per lane"
        return self.lanes[0].scheduler

    def close(self) -> None:
        """Stop the model workers, if any (the engine cannot step afterwards)."""
        if self.workers is not None:
            self.workers.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context limit of {self.max_model_len} tokens"
            )
        self.lanes[0].scheduler.add(Request(request_id, list(prompt_ids), params))
        self._detok[request_id] = DetokenizerState()

    def abort_request(self, request_id: str) -> None:
        request = self._lane_of(request_id).scheduler.abort(request_id)
        if request is not None:
            self._aborted.append(request)

    def _lane_of(self, request_id: str) -> Lane:
        """The lane whose row the request holds; the first while it holds none (the
        lanes share the queue)."""
        holders = [lane for lane in self.lanes if lane.scheduler.slots.holds(request_id)]
        return holders[0] if holders else self.lanes[0]

    def has_unfinished(self) -> bool:
        in_flight = any(lane.step is not None for lane in self.lanes)
        return bool(self.lanes[0].scheduler.num_unfinished or self._aborted or in_flight)

    def set_schedule(self, schedule: Schedule) -> None:
        if self.config.allocation_for(schedule) != self.allocation:
            raise ValueError(
                f"{schedule.describe()} splits the workers otherwise than "
                f"{self.lanes[0].scheduler.schedule_value.describe()}: re-allocating their "
                "layers needs a new engine"
            )
        for lane in self.lanes:
            lane.scheduler.set_schedule(schedule)

    def stats(self) -> EngineStats:
        schedulers = [lane.scheduler for lane in self.lanes]
        return EngineStats(
            num_waiting=len(schedulers[0].waiting),
            num_running=sum(s.slots.num_used for s in schedulers),
            num_free_slots=sum(s.slots.num_free for s in schedulers),
            schedule=schedulers[0].schedule_value,
        )

    def step(self) -> list[RequestOutput]:
        """Serve the next lane: take its step in flight, if any, then plan and start its
        next one (with one lane, run it to the end)."""
        outputs = [self._output(r, [], "") for r in self._aborted]
        self._aborted.clear()
        lane = self.lanes[self._turn]
        self._turn = (self._turn + 1) % len(self.lanes)
        try:
            if lane.step is not None:
                outputs += self._complete(lane)
            plan = lane.scheduler.schedule()
            if plan is not None:
                start = time.perf_counter()
                lane.step = LaneStep(plan, lane.runner.submit(plan), start)
                if not lane.runner.is_pipelined:
                    outputs += self._complete(lane)
        except WorkerFailure:  # the caches went with the group
            for each in self.lanes:
                self._aborted += each.scheduler.fail_started()
                each.step = None
            raise
        return outputs

    def _complete(self, lane: Lane) -> list[RequestOutput]:
        """Wait for the lane's step in flight and apply its result."""
        assert lane.step is not None
        plan = lane.step.plan
        result, seconds = lane.step.finish()
        lane.step = None
        self.counters.record(plan)
        if plan.requests:  # (a WAA step may only have waited for the encode workers)
            is_encode = plan.phase is Phase.ENCODE
            lengths = [
                r.num_prompt_tokens if is_encode else lane.runner.context_len(r)
                for r in plan.requests
            ]
            mean = sum(lengths) / len(lengths)
            self.last_step = StepTiming(is_encode, len(lengths), mean, seconds)
        outputs = []
        for request in lane.scheduler.update(plan, result):
            text = self._new_text(lane.scheduler, request)
            outputs.append(self._output(request, request.output_ids[-1:], text))
        return outputs

    def _new_text(self, scheduler: Scheduler, request: Request) -> str:
        if not self.config.detokenize:
            return ""
        state = self._detok[request.request_id]
        text = next_text(self.model.tokenizer, request.output_ids, state)
        request.output_text += text
        for stop in request.params.stop:
            cut = request.output_text.find(stop)
            if cut != -1:
                # release only what precedes the stop string
                released_before = len(request.output_text) - len(text)
                request.output_text = request.output_text[:cut]
                scheduler.finish_stopped(request)
                return request.output_text[released_before:]
        return text

    def _output(self, request: Request, token_ids: list[int], text: str) -> RequestOutput:
        if request.status.is_finished:
            self._detok.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=request.status.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            encode_start_time=request.encode_start_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
        )
