"""Bad input gets a clear 4xx (and the server keeps serving); disconnects free slots; SLO."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.server import GatewayServer

MODEL = "random:llama"
ADMIN_TOKEN = "test-admin-token"
TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def metric(http: aiohttp.ClientSession, server: GatewayServer, name: str) -> float:
    async with http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def assert_still_serving(http: aiohttp.ClientSession, server: GatewayServer) -> None:
    body = {"model": MODEL, "prompt": "still there?", "max_tokens": 3}
    async with http.post(f"{server.url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()


BAD_BODIES = [
    (b"{not json", 400, "malformed JSON"),
    (b'{"model": "random:llama", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "random:llama", "prompt": 5}', 400, "prompt"),
    (b'{"model": "random:llama", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "random:llama", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "random:llama", "prompt": "x", "max_tokens": 10000000}', 400, "max_tokens"),
    (b'{"model": "random:llama", "prompt": "x", "temperature": -2}', 400, "temperature"),
    (b'{"model": "random:llama", "prompt": ""}', 400, "empty"),
    (b'{"model": "no-such-model", "prompt": "x"}', 404, "does not exist"),
    (b'{"prompt": "x"}', 400, "model"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD_BODIES)
async def test_bad_completion_requests_are_4xx(
    gateway: GatewayServer, http: aiohttp.ClientSession, body: bytes, status: int, words: str
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{gateway.url}/v1/completions", data=body, headers=headers) as r:
        assert r.status == status
        error = (await r.json())["error"]
    assert words in error["message"] and error["type"]
    await assert_still_serving(http, gateway)


async def test_prompt_longer_than_the_context_is_400(
    gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 4, "stream": True}
    async with http.post(f"{gateway.url}/v1/completions", json=body) as r:
        assert r.status == 400
        assert "context length" in (await r.json())["error"]["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 2000}]}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat) as r:
        assert r.status == 400
    await assert_still_serving(http, gateway)


async def test_oversize_body_is_413(gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "x" * (2 * 1024 * 1024)}
    async with http.post(f"{gateway.url}/v1/completions", json=body) as r:
        assert r.status == 413
        assert "too large" in (await r.json())["error"]["message"]
    await assert_still_serving(http, gateway)


async def test_client_disconnect_frees_the_slot(
    gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    aborted_before = await metric(http, gateway, 'exegpt_requests_total{outcome="aborted"}')
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 500, "ignore_eos": True,
            "stream": True, "temperature": 0}  # fmt: skip
    response = await http.post(f"{gateway.url}/v1/completions", json=body)
    assert response.status == 200
    for _ in range(3):
        await response.content.readline()
    assert await metric(http, gateway, "exegpt_running_batch") == 1
    response.close()  # the client goes away mid-stream
    for _ in range(100):
        await asyncio.sleep(0.05)
        running = await metric(http, gateway, "exegpt_running_batch")
        in_flight = await metric(http, gateway, "exegpt_requests_in_flight")
        if running == 0 and in_flight == 0:
            break
    assert running == 0 and in_flight == 0
    assert await metric(http, gateway, 'exegpt_requests_total{outcome="aborted"}') == (
        aborted_before + 1
    )


async def test_slo_put_needs_the_admin_token(
    gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    url = f"{gateway.url}/v1/slo"
    async with http.put(url, json={"latency_s": 4.5}) as r:
        assert r.status == 401
    async with http.put(url, json={"latency_s": 4.5}, headers={"Authorization": "Bearer no"}) as r:
        assert r.status == 401
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for bad in ({"latency_s": -1}, {"latency_s": "fast"}, {"bound": 3}):
        async with http.put(url, json=bad, headers=auth) as r:
            assert r.status == 400, bad
    async with http.put(url, json={"latency_s": 4.5}, headers=auth) as r:
        assert r.status == 200
        state = await r.json()
    assert state["latency_s"] == 4.5
    assert state["schedule"]["predicted_latency_s"] <= 4.5 and state["is_feasible"]
    async with http.get(url) as r:
        state = await r.json()
    assert state["latency_s"] == 4.5 and "measured_p99_s" in state
    assert await metric(http, gateway, "exegpt_slo_seconds") == 4.5
    description = state["schedule"]["description"]
    async with http.get(f"{gateway.url}/metrics") as r:
        assert f'description="{description}"' in await r.text()
    await assert_still_serving(http, gateway)
