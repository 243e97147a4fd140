"""The HTTP API against a fake engine: shapes, errors, admission, auth, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from gateway_fakes import FakeEngine, fake_gateway

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


def sse_payloads(text: str) -> list[str]:
    return [e.strip().removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


async def test_completion_body_and_usage(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine(num_tokens=3)) as server:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 3}
        async with http.post(f"{server.url}/v1/completions", json=body) as r:
            assert r.status == 200
            data = await r.json()
    assert data["choices"][0] == {"index": 0, "text": "t0 t1 t2 ", "finish_reason": "length",
                                  "logprobs": None}  # fmt: skip
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_chat_stream_is_sse_with_role_usage_and_done(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine(num_tokens=2)) as server:
        content = [{"type": "text", "text": "hi"}]
        body = {
            "model": "fake",
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            payloads = sse_payloads(await r.text())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(x) for x in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == ["t0 ", "t1 "]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


TRICKY_TEXTS = ['"quoted"', "back\\slash", "new\nline\t", "é🙂", "", "\x00exegpt-text\x00", "</s>"]


@pytest.mark.parametrize("pace_s", [None, 0.002], ids=["one-frame", "frame-per-delta"])
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
async def test_streamed_text_arrives_exactly_in_order(
    http: aiohttp.ClientSession, route: str, pace_s: float | None
) -> None:
    # One frame: every delta is queued before the response is ready. A frame per delta:
    # the deltas after the first are written as the engine's frames are read.
    async with fake_gateway(FakeEngine(texts=TRICKY_TEXTS, pace_s=pace_s)) as server:
        body: dict[str, object] = {"model": "fake", "stream": True}
        if route == "completions":
            body["prompt"] = "hi"
        else:
            body["messages"] = [{"role": "user", "content": "hi"}]
        async with http.post(f"{server.url}/v1/{route}", json=body) as r:
            payloads = sse_payloads(await r.text())
    chunks = [json.loads(x) for x in payloads[:-1]]
    if route == "chat/completions":
        chunks = chunks[1:]  # the role chunk
        texts = [c["choices"][0]["delta"]["content"] for c in chunks[:-1]]
    else:
        texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert texts == TRICKY_TEXTS
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"fake"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * len(texts) + ["length"]


async def test_http_1_0_client_gets_the_events_unchunked_until_close() -> None:
    async with fake_gateway(FakeEngine(texts=["a", "b\n", "c"], pace_s=0.002)) as server:
        body = json.dumps({"model": "fake", "prompt": "hi", "stream": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        raw = await asyncio.wait_for(reader.read(), 10)  # the server closes when done
        writer.close()
    head, _, rest = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and "chunked" not in head.lower()
    payloads = sse_payloads(rest)
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(x)["choices"][0]["text"] for x in payloads[:-1]]
    assert texts == ["a", "b\n", "c", ""]


async def test_engine_rejection_is_400_before_streaming(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine(max_model_len=64)) as server:
        body = {"model": "fake", "prompt": "x" * 100, "max_tokens": 4, "stream": True}
        async with http.post(f"{server.url}/v1/completions", json=body) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_admission_bound_gives_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    engine = FakeEngine(hold=True)
    async with fake_gateway(engine, max_queued_requests=2, retry_after_s=3) as server:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 4, "stream": True}
        held = [await http.post(f"{server.url}/v1/completions", json=body) for _ in range(2)]
        async with http.post(f"{server.url}/v1/completions", json=body) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3"
            assert (await r.json())["error"]["type"] == "rate_limit_error"
        held[0].close()  # a client leaves: its request is aborted and its place freed
        for _ in range(50):
            await asyncio.sleep(0.05)
            if engine.aborted:
                break
        async with http.post(f"{server.url}/v1/completions", json=body) as r:
            assert r.status == 200
        held[1].close()


async def test_shutdown_ends_open_streams_with_an_error(http: aiohttp.ClientSession) -> None:
    engine = FakeEngine(hold=True)
    async with fake_gateway(engine) as server:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 4, "stream": True}
        response = await http.post(f"{server.url}/v1/completions", json=body)
        assert response.status == 200
        await response.content.readline()
        stopping = asyncio.create_task(server.stop())
        rest = (await asyncio.wait_for(response.read(), 5)).decode()
        await asyncio.wait_for(stopping, 10)
    payloads = sse_payloads(rest)
    assert payloads[-1] == "[DONE]"
    assert "shutting down" in json.loads(payloads[-2])["error"]["message"]


async def test_api_key_guards_v1_but_not_health(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine(), api_key="k1") as server:
        async with http.get(f"{server.url}/v1/models") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with http.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer k1"}) as r:
            assert r.status == 200
            assert (await r.json())["data"][0]["id"] == "fake"
        async with http.get(f"{server.url}/health") as r:
            assert r.status == 200


async def test_slo_put_auth_validation_and_visibility(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine()) as server:
        url = f"{server.url}/v1/slo"
        async with http.put(url, json={"latency_s": 3}) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        auth = {"Authorization": "Bearer secret"}
        async with http.put(url, data=b"{", headers=auth) as r:
            assert r.status == 400
        async with http.put(url, json={"latency_s": 1e9}, headers=auth) as r:
            assert r.status == 400
        async with http.put(url, json={"latency_s": 3}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["latency_s"] == 3
        async with http.get(f"{server.url}/metrics") as r:
            text = await r.text()
        assert "exegpt_slo_seconds 3.0" in text and 'description="rra(B_E=4, N_D=2)"' in text
    async with (
        fake_gateway(FakeEngine(), admin_token=None) as server,
        http.put(f"{server.url}/v1/slo", json={"latency_s": 3}) as r,
    ):
        assert r.status == 403


async def test_unknown_route_and_method_are_openai_shaped(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine()) as server:
        async with http.get(f"{server.url}/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with http.get(f"{server.url}/v1/completions") as r:
            assert r.status == 405 and "error" in await r.json()


async def test_metrics_count_outcomes(http: aiohttp.ClientSession) -> None:
    async with fake_gateway(FakeEngine(num_tokens=2)) as server:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2}
        async with http.post(f"{server.url}/v1/completions", json=body):
            pass
        async with http.post(f"{server.url}/v1/completions", json={**body, "model": "x"}):
            pass
        async with http.post(f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
            await r.read()
        async with http.get(f"{server.url}/metrics") as r:
            text = await r.text()
    assert 'exegpt_requests_total{outcome="finished"} 2.0' in text
    assert "exegpt_e2e_latency_seconds_count 2.0" in text
    assert "exegpt_time_to_first_token_seconds_count 2.0" in text
    assert "exegpt_generated_tokens_total 4.0" in text
    # the gateway's added delay is measured per streamed token, into cumulative buckets
    assert "exegpt_token_delay_seconds_count 2.0" in text
    assert 'exegpt_token_delay_seconds_bucket{le="+Inf"} 2.0' in text
    buckets = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("exegpt_token_delay_seconds_bucket")]  # fmt: skip
    assert len(buckets) == 11 and buckets == sorted(buckets)
