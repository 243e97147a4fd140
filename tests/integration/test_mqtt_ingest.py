"""MQTT ingestion against a real mosquitto broker started by the test session."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiomqtt

from gateway.mqtt import BRIDGE
from gateway.server import GatewayServer

REQUEST_TOPIC = "exegpt/requests"
ERROR_TOPIC = "exegpt/errors"


async def connected(gateway: GatewayServer) -> None:
    await asyncio.wait_for(gateway.app[BRIDGE].is_connected.wait(), 15)


def request(reply_topic: str, **fields: Any) -> dict[str, Any]:
    body = {"id": uuid.uuid4().hex, "prompt": "Once upon a time", "max_tokens": 8,
            "ignore_eos": True, "reply_topic": reply_topic}  # fmt: skip
    body.update(fields)
    return body


async def replies_until_terminal(
    client: aiomqtt.Client, timeout_s: float = 30
) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            replies.append(json.loads(message.payload))
            if replies[-1]["type"] in ("finished", "error"):
                return replies
    raise AssertionError("subscription ended")


async def test_request_streams_tokens_to_its_reply_topic(
    gateway: GatewayServer, mosquitto: Any
) -> None:
    await connected(gateway)
    reply = f"test/replies/{uuid.uuid4().hex}"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(reply, qos=1)
        body = request(reply)
        await client.publish(REQUEST_TOPIC, json.dumps(body), qos=1)
        replies = await replies_until_terminal(client)
    deltas, final = replies[:-1], replies[-1]
    assert final["type"] == "finished" and final["id"] == body["id"]
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 8
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    assert sum(len(d["token_ids"]) for d in deltas) == 8
    assert "".join(d["text"] for d in deltas) == final["text"]


async def test_malformed_payloads_get_error_replies(gateway: GatewayServer, mosquitto: Any) -> None:
    await connected(gateway)
    reply = f"test/replies/{uuid.uuid4().hex}"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(reply, qos=1)
        await client.subscribe(ERROR_TOPIC, qos=1)
        await client.publish(REQUEST_TOPIC, b"\xff not json at all", qos=1)
        [error] = await replies_until_terminal(client)
        assert error["type"] == "error" and error["id"] is None
        bad_types = request(reply, max_tokens="lots")
        await client.publish(REQUEST_TOPIC, json.dumps(bad_types), qos=1)
        [error] = await replies_until_terminal(client)
        assert error["id"] == bad_types["id"] and "max_tokens" in error["error"]["message"]
        too_long = request(reply, prompt="word " * 3000)
        await client.publish(REQUEST_TOPIC, json.dumps(too_long), qos=1)
        [error] = await replies_until_terminal(client)
        assert error["id"] == too_long["id"] and "context length" in error["error"]["message"]
        # The server keeps serving.
        good = request(reply)
        await client.publish(REQUEST_TOPIC, json.dumps(good), qos=1)
        replies = await replies_until_terminal(client)
        assert replies[-1]["type"] == "finished" and replies[-1]["id"] == good["id"]


async def test_broker_restart_mid_request_is_survived(
    gateway: GatewayServer, mosquitto: Any
) -> None:
    await connected(gateway)
    reply = f"test/replies/{uuid.uuid4().hex}"
    long_request = request(reply, max_tokens=300)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(reply, qos=1)
        await client.publish(REQUEST_TOPIC, json.dumps(long_request), qos=1)
        async with asyncio.timeout(30):
            async for _ in client.messages:
                break  # generation has started
        # Blocking restart: the gateway (same event loop) cannot reconnect before the
        # test's subscriber is back, so no reply is published to an empty topic.
        mosquitto.restart(down_s=0.5)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(reply, qos=1)
        replies = await replies_until_terminal(client, timeout_s=60)
        assert replies[-1]["type"] == "finished", replies[-1]
        assert replies[-1]["usage"]["completion_tokens"] == 300
        await connected(gateway)
        after = request(reply)
        await client.publish(REQUEST_TOPIC, json.dumps(after), qos=1)
        replies = await replies_until_terminal(client)
        assert replies[-1]["type"] == "finished" and replies[-1]["id"] == after["id"]
