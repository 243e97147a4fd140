"""The engine protocol's framing, the gateway config's validation, the SLO table lookup."""

from __future__ import annotations

import os

import msgspec
import pytest

from adaptive.schedule import Policy
from engine import protocol as p
from engine.slo_table import TABLE, choose_schedule
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
        ({"mqtt": "http://x"}, "mqtt://"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"admin_token": ""}, "admin_token"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        GatewayConfig(**overrides)  # type: ignore[arg-type]


def test_engine_leaves_the_gateway_a_core_unless_told() -> None:
    assert GatewayConfig().engine_threads == max(1, (os.cpu_count() or 1) - 1)
    assert GatewayConfig(num_threads=3).engine_threads == 3


def test_mqtt_targets() -> None:
    assert GatewayConfig(mqtt="mqtt://127.0.0.1:1999").mqtt_target().port == 1999
    embedded = GatewayConfig(mqtt="embedded", mqtt_port=1884).mqtt_target()
    assert (embedded.host, embedded.port) == ("127.0.0.1", 1884)


def test_slo_table_picks_the_best_feasible_row() -> None:
    choice = choose_schedule(Policy.RRA, 4.6, max_num_seqs=64)
    rra_rows = [r for r in TABLE if r.schedule.policy == Policy.RRA and r.latency_s <= 4.6]
    assert choice.is_feasible
    assert (
        choice.schedule.predicted_latency_s
        == max(rra_rows, key=lambda r: r.throughput_req_s).latency_s
    )
    unbounded = choose_schedule(Policy.RRA, None, max_num_seqs=8)
    assert unbounded.schedule.encode_batch <= 8 and unbounded.schedule.max_batch <= 8


def test_slo_table_falls_back_to_the_fastest_row_when_infeasible() -> None:
    choice = choose_schedule(Policy.RRA, 0.01, max_num_seqs=64)
    assert not choice.is_feasible
    fastest = min(r.latency_s for r in TABLE if r.schedule.policy == Policy.RRA)
    assert choice.schedule.predicted_latency_s == fastest
    with pytest.raises(ValueError, match="no measured"):
        choose_schedule(Policy.WAA_C, 1.0, max_num_seqs=64)
