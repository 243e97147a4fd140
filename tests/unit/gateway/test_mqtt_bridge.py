"""The MQTT bridge's request handling (no broker: it reads what lands in the outbox)."""

from __future__ import annotations

import asyncio
import json

from gateway_fakes import FakeEngine, fake_gateway

from gateway.mqtt import BRIDGE, MqttBridge


def drain(bridge: MqttBridge) -> list[tuple[str, dict[str, object]]]:
    out = []
    while not bridge.outbox.empty():
        topic, payload = bridge.outbox.get_nowait()
        out.append((topic, json.loads(payload)))
    return out


async def until_terminal(bridge: MqttBridge) -> list[tuple[str, dict[str, object]]]:
    seen: list[tuple[str, dict[str, object]]] = []
    for _ in range(100):
        seen += drain(bridge)
        if seen and seen[-1][1]["type"] in ("finished", "error"):
            return seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"no terminal message: {seen}")


async def test_request_becomes_deltas_then_final() -> None:
    # An unreachable broker: the bridge keeps retrying while the outbox fills.
    async with fake_gateway(FakeEngine(num_tokens=3), mqtt="mqtt://127.0.0.1:9") as server:
        bridge = server.app[BRIDGE]
        request = {"id": "r1", "prompt": "hi", "max_tokens": 3, "reply_topic": "out/r1"}
        bridge.accept(json.dumps(request).encode())
        messages = await until_terminal(bridge)
    assert {topic for topic, _ in messages} == {"out/r1"}
    assert [m["type"] for _, m in messages] == ["delta", "delta", "delta", "finished"]
    assert [m["index"] for _, m in messages[:3]] == [0, 1, 2]
    final = messages[-1][1]
    assert final["text"] == "t0 t1 t2 " and final["usage"]["completion_tokens"] == 3  # type: ignore[index]


async def test_malformed_payloads_are_answered_once() -> None:
    async with fake_gateway(FakeEngine(), mqtt="mqtt://127.0.0.1:9") as server:
        bridge = server.app[BRIDGE]
        bridge.accept(b"not json")
        bridge.accept(json.dumps({"id": "r2", "reply_topic": "out/r2", "max_tokens": -5,
                                  "prompt": "x"}).encode())  # fmt: skip
        bridge.accept(json.dumps({"id": "r3", "reply_topic": "out/#", "prompt": "x"}).encode())
        bridge.accept(json.dumps({"id": "r4", "reply_topic": "out/r4"}).encode())
        messages = drain(bridge)
    assert [(t, m["type"], m["id"]) for t, m in messages] == [
        ("exegpt/errors", "error", None),
        ("out/r2", "error", "r2"),
        ("exegpt/errors", "error", "r3"),
        ("out/r4", "error", "r4"),
    ]
