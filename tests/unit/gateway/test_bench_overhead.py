"""The overhead benchmark's load generator counts every streamed token, however it is read."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

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


def test_the_summary_reports_the_spread_of_the_round_pairs() -> None:
    """One pair can read far off on a shared machine: the summary shows how far."""
    from gateway.bench_overhead import summarise

    def pair(engine: float, gateway: float, p99: float) -> dict[str, Any]:
        return {
            "engine_only": {"tokens_per_s": engine},
            "gateway": {
                "tokens_per_s": gateway,
                "delay_p50_ms": 0.5,
                "delay_p90_ms": 1.0,
                "delay_p99_ms": p99,
                "gateway_cpu_us_per_token": 15.0,
                "client_cpu_us_per_token": 8.0,
            },
            "overhead": 1 - gateway / engine,
        }

    summary = summarise([pair(100, 98, 1.2), pair(100, 110, 1.9), pair(100, 96, 1.4)])
    assert summary["throughput_overhead"] == pytest.approx(0.02)
    assert summary["throughput_overhead_mean"] == pytest.approx(-0.04 / 3)
    # overheads 0.02, -0.10, 0.04: sample standard deviation 0.0757, over sqrt(3)
    assert summary["throughput_overhead_stderr"] == pytest.approx(0.0437, abs=1e-4)
    assert (summary["throughput_overhead_min"], summary["throughput_overhead_max"]) == (
        pytest.approx(-0.10),
        pytest.approx(0.04),
    )
    assert summary["delay_p99_ms"] == 1.4
    assert summary["delay_p99_worst_round_ms"] == 1.9
    assert summarise([pair(100, 98, 1.2)])["throughput_overhead_stderr"] == 0.0
