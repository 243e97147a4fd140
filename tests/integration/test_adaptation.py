"""Online adaptation through a served random:llama: the planner answers SLO changes, the
controller re-solves from live lengths, and switching under load changes no stream.

The server starts on the quick profile (measured once per machine in seconds, then cached)
and the paper's C1 task (shrunk to the context) as its prior; these requests are far
shorter, so the live histograms drift from the prior as soon as enough requests finish.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from gateway.server import GatewayServer

MODEL = "random:llama"
ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]
QUERIES = [(" ".join(WORDS[i % 7 : i % 7 + 2 + i % 5]), 6 + (5 * i) % 13) for i in range(16)]


@pytest.fixture(scope="module")
async def server(make_gateway: Any) -> AsyncIterator[GatewayServer]:
    async with make_gateway(max_num_seqs=8) as gateway:
        yield gateway


async def stream_all(server: GatewayServer) -> list[tuple[str, str | None]]:
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        timeout=60,
        max_retries=0,
        http_client=httpx2.AsyncClient(limits=httpx2.Limits(max_connections=32), timeout=60),
    )

    async def one(prompt: str, max_tokens: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    return list(await asyncio.gather(*(one(p, n) for p, n in QUERIES)))


async def put_slo(http: aiohttp.ClientSession, server: GatewayServer, bound: float | None) -> dict:  # type: ignore[type-arg]
    async with http.put(f"{server.url}/v1/slo", json={"latency_s": bound}, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        state: dict = await r.json()  # type: ignore[type-arg]
        return state


async def test_drift_re_solves_then_an_slo_change_meets_the_bound(server: GatewayServer) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        # a fresh server: short traffic against the C1 prior, twice, so that the decayed
        # histograms hold more than the controller's 16 requests of evidence
        await stream_all(server)
        await stream_all(server)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with http.get(f"{server.url}/v1/slo") as r:
                adaptation = (await r.json())["adaptation"]
            if adaptation["reason"] in ("drift", "refit") or (
                asyncio.get_running_loop().time() > deadline
            ):
                break
            await asyncio.sleep(0.1)
        assert adaptation["reason"] in ("drift", "refit"), adaptation
        lengths = adaptation["lengths"]
        mean_out = sum(n for _, n in QUERIES) / len(QUERIES)
        assert lengths["mean_output"] == pytest.approx(mean_out, rel=0.3)
        assert lengths["mean_input"] < 20 and lengths["p99_output"] <= max(n for _, n in QUERIES)
        async with http.get(f"{server.url}/metrics") as r:
            text = await r.text()
        loose = await put_slo(http, server, None)
        unbounded = loose["schedule"]["predicted_latency_s"]
        tight = await put_slo(http, server, unbounded / 2)
        if tight["is_feasible"]:
            assert tight["schedule"]["predicted_latency_s"] <= unbounded / 2
        else:  # nothing meets it: the lowest-latency schedule, said so
            assert tight["schedule"]["predicted_latency_s"] > unbounded / 2
        assert tight["schedule"]["predicted_latency_s"] <= unbounded
        await put_slo(http, server, None)
    found = re.search(r'^exegpt_length_mean_tokens\{kind="output"\} (\S+)$', text, re.MULTILINE)
    assert found and float(found.group(1)) == pytest.approx(lengths["mean_output"], rel=0.3)
    for name in (
        "exegpt_predicted_latency_seconds",
        "exegpt_schedule_solves",
        "exegpt_slo_attainment",
    ):
        assert re.search(rf"^{name} ", text, re.MULTILINE), name
    margin = re.search(r'^exegpt_planner_bound_factor\{kind="margin"\} (\S+)$', text, re.MULTILINE)
    assert margin and float(margin.group(1)) == adaptation["bound_margin"]
    assert "latency_calibration" in adaptation


async def test_switching_under_load_drops_nothing_and_keeps_tokens(
    server: GatewayServer,
) -> None:
    reference = await stream_all(server)
    assert all(reason == "length" for _, reason in reference)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        streams = asyncio.ensure_future(stream_all(server))
        applied = []
        for bound in (0.02, None, 0.05, None):  # tight, loose, tight, loose while they run
            applied.append(await put_slo(http, server, bound))
            await asyncio.sleep(0.05)
        switched = await streams
        async with http.get(f"{server.url}/v1/slo") as r:
            state = await r.json()
    assert switched == reference
    for bound, answer in zip((0.02, None, 0.05, None), applied, strict=True):
        assert answer["latency_s"] == bound
        assert answer["schedule_source"].startswith("planner (slo")
    assert len({a["schedule"]["description"] for a in applied}) >= 2  # it did switch
    adaptation = state["adaptation"]
    assert adaptation["num_finished"] >= 2 * len(QUERIES)
    assert adaptation["num_solves"] >= 1 + len(applied)
    assert adaptation["switch_delay_s"] is not None and adaptation["switch_delay_s"] < 1.0
