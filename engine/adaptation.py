"""The online controller wired to one engine (the engine process's step loop calls it).

Startup: the model is loaded once, profiled (or its cached profile read, engine/
profile_cache.py) before the engine takes it, and the controller solves the first
schedule. Then, per loop iteration, `after_step` reports what ran and what finished,
and `tick` lets the controller start a re-solve and applies solved schedules; a new
schedule takes effect at the scheduler's next step (Scheduler.set_schedule).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from adaptive.controller import AdaptiveConfig, Controller, ControllerState, Decision
from adaptive.distributions import TASKS, LengthDistribution
from adaptive.schedule import Policy
from adaptive.serving import ServingTarget
from engine import protocol as p
from engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from engine.model_loader import load_model
from engine.process import schedule_info
from engine.profile_cache import serving_profile

logger = logging.getLogger(__name__)

# Before the first requests finish, the planner assumes the paper's conversational task
# (moderate prompts and outputs), shrunk to fit the context when it is shorter; live
# histograms replace it after min_requests.
PRIOR_TASK = "C1"


def prior_lengths(max_len: int) -> LengthDistribution:
    spec = TASKS[PRIOR_TASK]
    longest = spec.input_max + spec.output_max
    return LengthDistribution.from_task(PRIOR_TASK, scale=min(1.0, max_len / longest))


class Adaptation:
    def __init__(self, engine: LLMEngine, controller: Controller, profile_source: str) -> None:
        self.engine = engine
        self.controller = controller
        self.profile_source = profile_source
        self._active = engine.stats().schedule
        self._wall_offset = time.time() - time.monotonic()  # one offset: stable wall times

    @property
    def is_solving(self) -> bool:
        return self.controller.is_solving

    def set_slo(self, latency_s: float | None, update_id: int) -> None:
        self.controller.set_slo(latency_s, update_id)

    def after_step(self, outputs: list[RequestOutput]) -> None:
        timing = self.engine.last_step
        if timing is not None:
            self.controller.on_step(timing.is_encode, timing.batch, timing.length, timing.seconds)
            self.engine.last_step = None
        for o in outputs:
            if o.finished and o.finish_reason != "abort" and o.encode_start_time is not None:
                latency = (o.finish_time or time.monotonic()) - o.encode_start_time
                self.controller.on_finished(
                    o.num_prompt_tokens, o.num_output_tokens, latency, o.encode_start_time
                )
        active = self.engine.stats().schedule
        if active is not self._active:
            self._active = active
            self.controller.on_active(active)

    def tick(self) -> list[p.FromEngine]:
        """Start a re-solve if one is due; apply what is solved; SLO replies to send."""
        self.controller.check()
        replies: list[p.FromEngine] = []
        for decision in self.controller.poll():
            self.engine.set_schedule(decision.schedule)
            logger.info(
                "schedule %s -> %s (%s, solved in %.1f ms)",
                self._active.describe(),
                decision.schedule.describe(),
                decision.reason,
                decision.choice.solve_ms,
            )
            if decision.update_id is not None:
                replies.append(self._slo_applied(decision))
        return replies

    def _slo_applied(self, decision: Decision) -> p.SloApplied:
        assert decision.update_id is not None
        return p.SloApplied(
            decision.update_id,
            decision.slo_s,
            schedule_info(decision.schedule),
            decision.choice.is_feasible,
            f"planner ({decision.reason}, profile {self.profile_source})",
        )

    def info(self) -> p.AdaptationInfo:
        s: ControllerState = self.controller.state()
        lengths = None
        if s.lengths is not None:
            lengths = p.LengthStats(
                s.lengths.mean_input,
                s.lengths.p99_input,
                s.lengths.mean_output,
                s.lengths.p99_output,
                s.lengths.weight,
            )
        return p.AdaptationInfo(
            is_enabled=s.is_enabled,
            lengths=lengths,
            reason=s.reason.value,
            last_change_at=self._wall_offset + s.changed_at,
            last_change_reason=s.change_reason.value,
            num_solves=s.num_solves,
            last_solve_ms=s.last_solve_ms,
            switch_delay_s=s.switch_delay_s,
            profile=self.profile_source,
            profile_scales=list(s.scales),
            fitted_scales=list(s.fitted_scales),
            bound_margin=s.margin,
            latency_calibration=s.calibration,
            predicted_latency_s=s.schedule.predicted_latency_s,
            predicted_throughput_req_s=s.schedule.predicted_throughput_req_s,
            measured_p99_latency_s=s.measured_p99_s,
            measured_throughput_req_s=s.measured_throughput_req_s,
            slo_attainment=s.slo_attainment,
            num_finished=s.num_finished,
        )

    def close(self) -> None:
        self.controller.close()


def build_adaptive_engine(options: p.EngineOptions) -> Adaptation:
    """Load, profile, solve the first schedule, and start the engine on it."""
    torch.set_num_threads(options.num_threads or os.cpu_count() or 1)
    loaded = load_model(options.model, options.dtype)
    profile = serving_profile(loaded, options.profile)
    max_len = min(options.max_model_len, loaded.max_model_len)
    prior = prior_lengths(max_len)
    policy = Policy(options.policy)
    target = ServingTarget(
        profile, options.max_num_seqs, policy, options.num_workers, options.tp_degree
    )
    controller = Controller(
        target.pinned(prior, options.slo_s),
        AdaptiveConfig(is_enabled=options.adapt),
        prior,
        options.slo_s,
        max_len=max_len,
    )
    config = EngineConfig(
        model=options.model,
        dtype=options.dtype,
        max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len,
        schedule=controller.current.schedule,
        num_threads=options.num_threads,
        num_workers=options.num_workers,
        tp_degree=options.tp_degree,
        rendezvous=options.rendezvous,
        local_workers=options.local_workers,
    )
    engine = LLMEngine(config, model=loaded)
    logger.info(
        "first schedule %s (profile %s)", controller.current.schedule.describe(), profile.source
    )
    return Adaptation(engine, controller, profile.source)
