"""The engine protocol's framing and the gateway config's validation."""

from __future__ import annotations

import os

import msgspec
import pytest

from engine import protocol as p
from gateway.config import GatewayConfig


def test_frames_round_trip_every_message() -> None:
    schedule = p.ScheduleInfo("rra", 1, 1, 1, "rra(B_E=1, N_D=1)")
    to_engine: list[p.ToEngine] = [
        p.Submit("a", messages=[p.ChatMessage("user", "hi")], max_tokens=3, stop=["x"]),
        p.Abort("a"), p.SetSlo(1, 2.5), p.StatsRequest(), p.Shutdown(),
    ]  # fmt: skip
    from_engine: list[p.FromEngine] = [
        p.Ready("m", 64, 4, None, schedule), p.Accepted("a", 2, 3),
        p.TokenDelta("a", [1, 2], "hé"), p.Finished("a", "stop", 2, 2),
        p.Error("a", "bad", 400), p.SloApplied(1, 2.5, schedule, True, "table"),
        p.Stats(0, 1, 3, 2.5, schedule, schedule),
        p.Stats(0, 1, 3, None, schedule, schedule, _adaptation()),
    ]  # fmt: skip
    frame = p.encode_frame(to_engine)
    assert p.frame_length(frame[:4]) == len(frame) - 4
    assert p.decode_to_engine(frame[4:]) == to_engine
    assert p.decode_from_engine(p.encode_frame(from_engine)[4:]) == from_engine


def test_frame_guards() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        p.frame_length(p.FRAME_HEADER.pack(p.MAX_FRAME_BYTES + 1))
    with pytest.raises(msgspec.DecodeError):
        p.decode_to_engine(p.encode_frame([p.Accepted("a", 1, 1)])[4:])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"slo_s": -1.0}, "positive"),
        ({"policy": "fastest"}, "unknown policy"),
        ({"policy": "waa_c"}, "separate workers: it needs --workers 2"),
        ({"mqtt": "http://x"}, "mqtt://"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"admin_token": ""}, "admin_token"),
        ({"num_threads": 0}, "num_threads"),
        ({"num_workers": 2, "local_workers": 1}, "rendezvous address"),
        ({"num_workers": 2, "local_workers": 3, "rendezvous": "h:1"}, "between 1 and"),
        ({"num_workers": 2, "rendezvous": "no-port"}, "HOST:PORT"),
        ({"num_workers": 2, "rendezvous": "h:99999"}, "HOST:PORT"),
        ({"device": "gpu"}, "'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "cuda", "num_workers": 2}, "model workers run on the CPU"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        GatewayConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (4, 3), (16, 15)])
def test_engine_leaves_the_gateway_a_core_from_four_cores_up(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert GatewayConfig().engine_threads == threads
    assert GatewayConfig(num_threads=3).engine_threads == 3


def test_mqtt_targets() -> None:
    assert GatewayConfig(mqtt="mqtt://127.0.0.1:1999").mqtt_target().port == 1999
    embedded = GatewayConfig(mqtt="embedded", mqtt_port=1884).mqtt_target()
    assert (embedded.host, embedded.port) == ("127.0.0.1", 1884)


def _adaptation() -> p.AdaptationInfo:
    return p.AdaptationInfo(
        True, p.LengthStats(12.0, 30.0, 16.0, 16.0, 40.0), "drift", 1.7e9, "drift", 2, 3.5,
        0.2, "quick", [1.0, 1.0], [1.1, 0.9], 1.0, 0.8, 0.4, 20.0, 0.35, 18.0, 0.99, 40,
    )  # fmt: skip


def test_the_engine_process_is_started_on_the_configured_device() -> None:
    from gateway.app import engine_options

    assert engine_options(GatewayConfig()).device == "cpu"
    assert engine_options(GatewayConfig(device="cuda:1")).device == "cuda:1"
