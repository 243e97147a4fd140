"""The overhead benchmark's load generator counts every streamed token, however it is read."""

from __future__ import annotations

import argparse
import asyncio

import msgspec
import pytest
from gateway_fakes import FakeEngine, fake_gateway

from gateway.bench_overhead import LAST, StreamCounter


def completion_request(port: int, body: dict[str, object]) -> bytes:
    data = msgspec.json.encode(body)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    return f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data


class Sink(asyncio.Transport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


async def post_once(port: int, body: dict[str, object]) -> int:
    transport, counter = await asyncio.get_running_loop().create_connection(
        StreamCounter, "127.0.0.1", port
    )
    try:
        return await counter.post(completion_request(port, body))
    finally:
        transport.close()


async def test_counts_tokens_on_one_keep_alive_connection() -> None:
    async with fake_gateway(FakeEngine(num_tokens=5)) as server:
        request = completion_request(server.port, {"model": "fake", "prompt": "hi", "stream": True})
        transport, counter = await asyncio.get_running_loop().create_connection(
            StreamCounter, "127.0.0.1", server.port
        )
        try:
            assert [await counter.post(request), await counter.post(request)] == [5, 5]
        finally:
            transport.close()


async def test_a_failed_request_is_an_error_not_a_hang() -> None:
    async with fake_gateway(FakeEngine()) as server:
        with pytest.raises(RuntimeError, match="unexpected response"):
            await post_once(server.port, {"model": "x", "prompt": "hi", "stream": True})


async def test_counts_events_split_across_reads_anywhere() -> None:
    async with fake_gateway(FakeEngine(num_tokens=7)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = {"model": "fake", "prompt": "hi", "stream": True}
        writer.write(completion_request(server.port, body))
        raw = await reader.readuntil(LAST)
        writer.close()
        await writer.wait_closed()
    counter = StreamCounter()
    counter.connection_made(Sink())
    counted = asyncio.ensure_future(counter.post(b""))
    await asyncio.sleep(0)  # the request is sent; now the response arrives a byte at a time
    for i in range(len(raw)):
        counter.data_received(raw[i : i + 1])
    assert await counted == 7


async def test_round_order_alternates_between_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that speeds up or slows down over the run must not favour one side."""
    from gateway import bench_overhead

    order: list[str] = []

    class Server:
        def __init__(self, config: object) -> None:
            pass

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    async def engine_round(args: object) -> dict[str, float]:
        order.append("engine")
        return {"tokens_per_s": 100.0}

    async def gateway_round(args: object, server: object) -> dict[str, float]:
        order.append("gateway")
        return {"tokens_per_s": 90.0, "delay_p99_ms": 1.0}

    monkeypatch.setattr(bench_overhead, "GatewayServer", Server)
    monkeypatch.setattr(bench_overhead, "engine_round", engine_round)
    monkeypatch.setattr(bench_overhead, "gateway_round", gateway_round)
    args = argparse.Namespace(
        model="fake",
        dtype="bfloat16",
        policy="continuous",
        clients=4,
        num_threads=None,
        prompt_tokens=8,
        max_tokens=8,
        repeat=3,
    )
    rounds = await bench_overhead.measure(args)
    assert order == ["engine", "gateway", "gateway", "engine", "engine", "gateway"]
    assert [r["overhead"] for r in rounds] == [pytest.approx(0.1)] * 3
