"""Prometheus metrics and the latency window behind GET /v1/slo.

Each app gets its own CollectorRegistry, so several gateways in one process (tests, the
overhead benchmark) never collide on metric names.

The per-token figures (tokens streamed, the gateway's added delay per token) are updated
on the streaming path once per token, so they are plain numbers that a collector turns
into Prometheus samples at scrape time: a prometheus_client Counter or Histogram takes a
lock and several calls per update, which was a sixth of the gateway's CPU per token.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import protocol as p

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
DELAY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
OUTCOMES = ("finished", "aborted", "error", "rejected", "overloaded")


class TokenMetrics(Collector):
    """Tokens streamed and the per-token delay histogram, as plain numbers."""

    def __init__(self, buckets: tuple[float, ...] = DELAY_BUCKETS) -> None:
        self.num_tokens = 0
        self.buckets = buckets
        self._delay_counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._delay_sum = 0.0

    def observe_delay(self, delay: float) -> None:
        self._delay_counts[bisect.bisect_left(self.buckets, delay)] += 1  # le: upper bound
        self._delay_sum += delay

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "exegpt_generated_tokens", "Tokens streamed to clients", value=self.num_tokens
        )
        cumulative, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self._delay_counts, strict=True):
            total += count
            cumulative.append(("+Inf" if math.isinf(bound) else repr(bound), total))
        yield HistogramMetricFamily(
            "exegpt_token_delay_seconds",
            "Gateway-added delay per token: engine emits it -> written to the client",
            buckets=cumulative,
            sum_value=self._delay_sum,
        )


class Metrics:
    def __init__(self, window_s: float = 10.0, num_latencies: int = 2048) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("exegpt_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.token_metrics = TokenMetrics()
        r.register(self.token_metrics)
        self.in_flight = Gauge("exegpt_requests_in_flight", "Admitted, not ended", registry=r)
        self.queue_length = Gauge(
            "exegpt_queue_length", "Requests waiting in the engine", registry=r
        )
        self.running = Gauge("exegpt_running_batch", "Requests in the running batch", registry=r)
        self.free_slots = Gauge("exegpt_free_kv_slots", "Free KV slots", registry=r)
        self.tokens_per_s = Gauge(
            "exegpt_tokens_per_second",
            f"Generated tokens/s over the last {window_s:.0f} s",
            registry=r,
        )
        self.ttft = Histogram(
            "exegpt_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "exegpt_e2e_latency_seconds",
            "End-to-end request latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slo = Gauge("exegpt_slo_seconds", "Current latency bound (NaN: none)", registry=r)
        self.schedule = Info("exegpt_schedule", "Schedule selected by the SLO", registry=r)
        self.active_schedule = Info(
            "exegpt_active_schedule", "Schedule the engine runs now", registry=r
        )
        self._adaptation_metrics(r)
        self._window_s = window_s
        self._token_times: deque[tuple[float, int]] = deque()
        self.latencies: deque[float] = deque(maxlen=num_latencies)
        self.token_delays: deque[float] = deque(maxlen=200_000)  # read by the benchmark

    def on_tokens(self, count: int) -> None:
        self.token_metrics.num_tokens += count
        self._token_times.append((time.monotonic(), count))

    def on_written(self, emitted_at: float, now: float) -> None:
        if emitted_at > 0:
            delay = max(0.0, now - emitted_at)
            self.token_metrics.observe_delay(delay)
            self.token_delays.append(delay)

    def on_finished(self, latency_s: float) -> None:
        self.requests.labels("finished").inc()
        self.e2e.observe(latency_s)
        self.latencies.append(latency_s)

    def set_slo(self, latency_s: float | None, schedule: p.ScheduleInfo) -> None:
        self.slo.set(math.nan if latency_s is None else latency_s)
        self.schedule.info(schedule_labels(schedule))

    def update_from(self, stats: p.Stats, num_in_flight: int) -> None:
        self.queue_length.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.free_slots.set(stats.num_free_slots)
        self.in_flight.set(num_in_flight)
        self.set_slo(stats.slo_s, stats.schedule)
        self.active_schedule.info(schedule_labels(stats.active_schedule))
        if stats.adaptation is not None:
            self.update_adaptation(stats.adaptation)
        now = time.monotonic()
        while self._token_times and self._token_times[0][0] < now - self._window_s:
            self._token_times.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._token_times) / self._window_s)

    def _adaptation_metrics(self, r: CollectorRegistry) -> None:
        self.length_mean = Gauge(
            "exegpt_length_mean_tokens", "Live (decayed) mean length", ["kind"], registry=r
        )
        self.length_p99 = Gauge(
            "exegpt_length_p99_tokens", "Live (decayed) p99 length", ["kind"], registry=r
        )
        self.predicted_latency = Gauge(
            "exegpt_predicted_latency_seconds", "Planner's latency for the schedule", registry=r
        )
        self.predicted_throughput = Gauge(
            "exegpt_predicted_throughput_requests_per_second",
            "Planner's throughput for the schedule",
            registry=r,
        )
        self.measured_p99 = Gauge(
            "exegpt_measured_p99_latency_seconds",
            "Engine-measured p99 latency (encode start to last token), recent requests",
            registry=r,
        )
        self.measured_throughput = Gauge(
            "exegpt_measured_throughput_requests_per_second",
            "Engine-measured finished requests per second, recent window",
            registry=r,
        )
        self.attainment = Gauge(
            "exegpt_slo_attainment", "Fraction meeting the bound since it was set", registry=r
        )
        self.solves = Gauge("exegpt_schedule_solves", "Schedules solved since start", registry=r)
        self.last_change = Gauge(
            "exegpt_schedule_last_change_timestamp_seconds",
            "When the schedule's knobs last changed (Unix time)",
            registry=r,
        )
        self.change_reason = Info(
            "exegpt_schedule_change", "Why the schedule last changed", registry=r
        )
        self.switch_delay = Gauge(
            "exegpt_schedule_switch_delay_seconds",
            "Trigger to new schedule running, last switch",
            registry=r,
        )
        self.profile_scale = Gauge(
            "exegpt_profile_scale", "Refit factor on the profile's step times", ["kind"], registry=r
        )
        self.bound_factor = Gauge(
            "exegpt_planner_bound_factor",
            "The planner aims at bound * margin / calibration (latency measured / predicted)",
            ["kind"],
            registry=r,
        )

    def update_adaptation(self, info: p.AdaptationInfo) -> None:
        if info.lengths is not None:
            for kind, mean, p99 in (
                ("input", info.lengths.mean_input, info.lengths.p99_input),
                ("output", info.lengths.mean_output, info.lengths.p99_output),
            ):
                self.length_mean.labels(kind).set(mean)
                self.length_p99.labels(kind).set(p99)
        nan = math.nan
        self.predicted_latency.set(_or(info.predicted_latency_s, nan))
        self.predicted_throughput.set(_or(info.predicted_throughput_req_s, nan))
        self.measured_p99.set(_or(info.measured_p99_latency_s, nan))
        self.measured_throughput.set(info.measured_throughput_req_s)
        self.attainment.set(_or(info.slo_attainment, nan))
        self.solves.set(info.num_solves)
        self.last_change.set(info.last_change_at)
        self.change_reason.info({"reason": info.last_change_reason, "last_solve": info.reason})
        self.switch_delay.set(_or(info.switch_delay_s, nan))
        for kind, scale in zip(("encode", "decode"), info.profile_scales, strict=True):
            self.profile_scale.labels(kind).set(scale)
        self.bound_factor.labels("margin").set(info.bound_margin)
        self.bound_factor.labels("calibration").set(info.latency_calibration)

    def latency_percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def schedule_labels(schedule: p.ScheduleInfo) -> dict[str, str]:
    return {
        "policy": schedule.policy,
        "encode_batch": str(schedule.encode_batch),
        "decode_iters": str(schedule.decode_iters),
        "max_batch": str(schedule.max_batch),
        "description": schedule.description,
    }


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
