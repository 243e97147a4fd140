"""The gateway's one frozen configuration, validated on construction (no IO here)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.protocol import check_device, check_placement

POLICIES = ("rra", "continuous", "static", "waa_c", "waa_m")
WAA_POLICIES = ("waa_c", "waa_m")  # encode and decode on separate workers


RESERVE_GATEWAY_CORE_FROM = 4  # cores at which the gateway gets one of its own


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int


@dataclass(frozen=True)
class GatewayConfig:
    model: str = "smollm2"
    dtype: str = "bfloat16"
    device: str = "cpu"  # or "cuda[:N]": the engine process's model on that GPU
    host: str = "127.0.0.1"
    port: int = 8000
    slo_s: float | None = None  # None: no latency bound (highest-throughput schedule)
    policy: str = "rra"
    max_num_seqs: int = 64
    max_model_len: int = 2048
    num_threads: int | None = None  # engine torch threads; None: see engine_threads
    # model worker processes; pipeline stages = num_workers / tp_degree (engine/workers.py)
    num_workers: int = 1
    tp_degree: int = 1
    # workers on other machines join at `rendezvous` (HOST:PORT) with `exegpt worker`;
    # `local_workers` of them start here, the engine's process included (None: all)
    rendezvous: str | None = None
    local_workers: int | None = None
    # The planner's profile: "full" or "quick" grid, measured once per model and device and
    # cached, or a file made by `exegpt profile`. adapt False: solved once at start, kept.
    profile: str = "full"
    adapt: bool = True
    # Admission: requests in flight (queued in the engine or running) before 429.
    max_queued_requests: int = 1024
    retry_after_s: int = 1
    max_body_bytes: int = 1024 * 1024
    max_tokens_limit: int | None = None  # None: the model's context length
    api_key: str | None = None
    admin_token: str | None = None
    # MQTT: "off", "embedded" (amqtt in-process on 127.0.0.1:mqtt_port) or mqtt://host:port.
    mqtt: str = "off"
    mqtt_port: int = 1883
    mqtt_request_topic: str = "exegpt/requests"
    mqtt_error_topic: str = "exegpt/errors"
    mqtt_share_group: str | None = "exegpt"  # MQTT 5 shared subscription on external brokers
    engine_start_timeout_s: float = 600.0  # the first load may convert the model once

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "mqtt_port": 0 <= self.mqtt_port <= 65535,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_model_len": self.max_model_len >= 2,
            "max_queued_requests": self.max_queued_requests >= 1,
            "retry_after_s": self.retry_after_s >= 1,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "engine_start_timeout_s": self.engine_start_timeout_s > 0,
            "num_threads": self.num_threads is None or self.num_threads >= 1,
            "num_workers": self.num_workers >= 1,
            "tp_degree": self.tp_degree >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"GatewayConfig.{name} is out of range: {getattr(self, name)!r}")
        if self.slo_s is not None and not self.slo_s > 0:
            raise ValueError(f"the SLO must be a positive number of seconds, got {self.slo_s}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy in WAA_POLICIES and self.num_workers < 2:
            raise ValueError(
                f"policy {self.policy} runs encode and decode on separate workers: it needs "
                f"--workers 2 or more, got {self.num_workers}"
            )
        check_placement(self.num_workers, self.rendezvous, self.local_workers)
        check_device(self.device, self.num_workers)
        if not self.profile:
            raise ValueError("profile must be 'full', 'quick' or a profile file")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError("max_tokens_limit must be >= 1")
        if self.mqtt not in ("off", "embedded"):
            self.mqtt_target()  # raises ValueError with a clear message
        for secret in ("api_key", "admin_token"):
            if getattr(self, secret) == "":
                raise ValueError(f"{secret} must not be empty (leave it unset instead)")

    @property
    def engine_threads(self) -> int:
        """The engine's torch threads. The gateway streams every token of every step, and
        when it waits for a core the engine's threads hold, each token waits with it, so
        on 4 cores or more one is left to it (as vLLM's CPU build does). On fewer, a core
        is half the machine's arithmetic, far more than the gateway needs (~25 us per
        token), so the engine takes them all and its OpenMP threads sleep when idle."""
        if self.num_threads:
            return self.num_threads
        cores = os.cpu_count() or 1
        return cores - 1 if cores >= RESERVE_GATEWAY_CORE_FROM else cores

    @property
    def is_mqtt_enabled(self) -> bool:
        return self.mqtt != "off"

    def mqtt_target(self) -> MqttTarget:
        """Where the MQTT consumer connects: the embedded broker or the URL's host:port."""
        if self.mqtt == "embedded":
            return MqttTarget("127.0.0.1", self.mqtt_port)
        parts = urlsplit(self.mqtt)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(
                f"--mqtt must be 'embedded', 'off' or mqtt://host:port, got {self.mqtt!r}"
            )
        return MqttTarget(parts.hostname, parts.port or 1883)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
