"""`exegpt bench serve` against a served random:llama: every request counted once, bounds.

The command line runs in a worker thread (it owns its event loop) while the session's
gateway serves on this loop; the server's own /metrics counters are the other side of
the accounting.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.bench_serve import LoadConfig, poisson_arrivals, run_load
from engine.cli import main
from engine.workloads import task_queries
from gateway.server import GatewayServer


async def metric(server: GatewayServer, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    argv = ["bench", "serve", *args, "--json", str(out), "--records"]
    assert await asyncio.to_thread(main, argv) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


async def test_every_request_is_accounted_for_once(gateway: GatewayServer, tmp_path: Path) -> None:
    lengths = [(5 + i, 2 + i % 4) for i in range(11)] + [(600, 4)]  # the last is too long
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"arrival_s": 0.02 * i, "prompt_len": p, "output_len": o}) + "\n"
            for i, (p, o) in enumerate(lengths)
        )
    )
    finished = await metric(gateway, 'exegpt_requests_total{outcome="finished"}')
    rejected = await metric(gateway, 'exegpt_requests_total{outcome="rejected"}')

    report = await bench(tmp_path, "--url", gateway.url, "--trace", str(trace), "--slo", "60")

    assert (report["num_sent"], report["num_ok"], report["num_error"]) == (12, 11, 1)
    assert report["num_cancelled"] == 0
    records = report["records"]
    assert sorted(r["index"] for r in records) == list(range(12))
    for record in records[:11]:  # token-exact prompts, forced outputs
        assert record["outcome"] == "ok"
        assert record["num_prompt_tokens"] == record["prompt_len"]
        assert record["num_output_tokens"] == record["output_len"]
        assert 0 < record["ttft_s"] <= record["e2e_s"]
    assert records[11]["outcome"] == "error" and "HTTP 400" in records[11]["error"]
    tokens = sum(o for _, o in lengths[:11])
    assert report["throughput_tok_s"] * report["duration_s"] == pytest.approx(tokens)
    assert report["goodput_req_s"] == report["throughput_req_s"]
    # the server saw the same: 11 finished, 1 rejected
    assert await metric(gateway, 'exegpt_requests_total{outcome="finished"}') == finished + 11
    assert await metric(gateway, 'exegpt_requests_total{outcome="rejected"}') == rejected + 1


async def test_stops_at_the_count_bound(gateway: GatewayServer, tmp_path: Path) -> None:
    report = await bench(
        tmp_path, "--url", gateway.url, "--task", "S", "--scale", "0.05", "--num-requests", "5"
    )

    assert report["num_sent"] == report["num_ok"] == 5


async def test_stops_at_the_time_bound_and_frees_the_server(
    gateway: GatewayServer, tmp_path: Path
) -> None:
    args = ["--rate", "40", "--num-requests", "400", "--task", "C1", "--scale", "0.5"]
    started = time.monotonic()

    report = await bench(tmp_path, "--url", gateway.url, *args, "--duration", "0.5", "--drain", "0")

    arrivals = poisson_arrivals(task_queries("C1", 400, 0, 0.5), 40.0, 0)
    assert report["num_sent"] == sum(1 for a in arrivals if a.at_s < 0.5) < 400
    assert report["num_ok"] + report["num_error"] + report["num_cancelled"] == report["num_sent"]
    assert report["num_error"] == 0 and report["duration_s"] < 1.5
    assert time.monotonic() - started < 30  # the command itself, with its imports
    for _ in range(100):  # cancelled requests leave the engine
        if await metric(gateway, "exegpt_requests_in_flight") == 0:
            break
        await asyncio.sleep(0.1)
    assert await metric(gateway, "exegpt_requests_in_flight") == 0


async def test_concurrency_cap_holds_and_latency_runs_from_sending() -> None:
    """A stand-in SSE server that records how many requests it holds at once."""
    held, peak = 0, 0

    async def complete(request: web.Request) -> web.StreamResponse:
        nonlocal held, peak
        held += 1
        peak = max(peak, held)
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.1)
        for _ in range(body["max_tokens"]):
            await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        held -= 1
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        queries = task_queries("S", 12, 0, 0.05)
        config = LoadConfig(f"http://127.0.0.1:{port}", "m", max_concurrency=3, progress=False)
        records, duration = await run_load(
            config, poisson_arrivals(queries, math.inf), [[7] * q.prompt_len for q in queries]
        )
    finally:
        await runner.cleanup()

    assert peak == 3
    assert [r.outcome for r in records] == ["ok"] * 12
    assert duration >= 4 * 0.1  # four waves of three
    assert max(r.e2e_s or 0 for r in records) < 3 * 0.1  # the last wave's wait is not in it
