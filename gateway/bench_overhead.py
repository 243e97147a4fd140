"""What the gateway costs: engine-only throughput vs. the same workload through HTTP/SSE.

    python -m gateway.bench_overhead --model random:llama --clients 64 --max-tokens 128

Each repeat runs two rounds of the same workload (N requests, same prompt ids, greedy,
ignore_eos, same schedule and engine threads), one after the other, so both see the same
load on a shared machine; the order alternates between repeats (engine first, then
gateway first), so a machine that slows down or speeds up over the run biases neither:

1. Engine alone: `python -m engine.process --baseline` adds the N requests to an LLMEngine
   in-process and steps to completion (no IPC, no HTTP): tokens/s.
2. Through the gateway: a separate client process opens N concurrent streaming
   /v1/completions requests against the served engine: tokens received / wall time. The
   added per-token delay is the gateway's own measure: from the engine's monotonic stamp
   on a delta (the step that made the token ended) to its SSE chunk being written to the
   client's socket, so it covers the IPC, the gateway's routing and the SSE write.

Both rounds first run the whole workload once untimed (new batch shapes, HTTP
connections), and delays are only taken from the timed round. The engine gets the threads
`exegpt serve` gives it (all cores, all but one from 4 cores up, or --num-threads). The
client process stands for remote clients: it parses nothing but event openings and runs at a low
priority, so the CPU it needs on this machine stays out of the way of what is measured;
its CPU per token is reported beside the gateway's. The schedule defaults to
continuous batching: HTTP requests reach the engine a few milliseconds apart, and under
RRA a lone first arrival runs its N_D decoding iterations before the rest are encoded,
an engine scheduling effect this benchmark is not about (`--policy rra` shows it).
Prints a table with the medians over repeats and writes JSON. A tiny random model makes
the gateway's share look as large as it can; on a real model the engine dominates more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway.app import engine_options
from gateway.config import GatewayConfig
from gateway.keys import ENGINE, METRICS
from gateway.server import GatewayServer

OK = b"HTTP/1.1 200"
EVENT = b"data: {"
LAST = b"data: [DONE]\n\n\r\n0\r\n\r\n"  # the last SSE event, then the end chunk


def prompt_ids(num_tokens: int) -> list[int]:
    return [1000 + (i * 7) % 500 for i in range(num_tokens)]


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model=args.model,
        dtype=args.dtype,
        port=0,
        policy=args.policy,
        max_num_seqs=args.clients,
        max_model_len=args.prompt_tokens + args.max_tokens + 8,
        num_threads=args.num_threads,
        adapt=False,  # both sides run the schedule solved at start
    )


async def engine_round(args: argparse.Namespace) -> dict[str, float]:
    """The same engine options as the served engine's (threads included), no gateway."""
    workload = {
        "num_requests": args.clients,
        "prompt_ids": prompt_ids(args.prompt_tokens),
        "max_tokens": args.max_tokens,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.process",
        "--options",
        msgspec.json.encode(engine_options(gateway_config(args))).decode(),
        "--baseline",
        json.dumps(workload),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the engine-only round failed (exit {process.returncode})")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


class StreamCounter(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that posts a streaming completion and counts its
    SSE token chunks in the raw bytes. The load generator shares the machine with the
    gateway it measures, so it must cost little: an HTTP client library's parsing took
    more CPU per token than the gateway itself. Each write of the gateway is one HTTP
    chunk holding whole events, so an event never straddles a chunk header; it may
    straddle two reads, hence the carried tail."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.num_events, self.tail, self.end, self.is_ok = 0, b"", b"", False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    async def post(self, request: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.num_events, self.tail, self.end, self.is_ok = 0, b"", b"", False
        self.transport.write(request)
        return await self.done

    def data_received(self, data: bytes) -> None:
        window = self.tail + data
        if not self.is_ok:
            if len(window) < len(OK):
                self.tail = window  # nothing counted yet: all of it is carried
                return
            if not window.startswith(OK):
                self._finish(RuntimeError(f"unexpected response: {window[:200]!r}"))
                return
            self.is_ok = True
        self.num_events += window.count(EVENT)
        self.tail = window[1 - len(EVENT) :]  # too short to hold a whole event opening
        self.end = (self.end + data)[-len(LAST) :]
        if self.end == LAST:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the gateway closed the connection"))

    def _finish(self, error: BaseException | None) -> None:
        if self.done is None or self.done.done():
            return
        if error is not None:
            self.done.set_exception(error)
        else:
            self.done.set_result(self.num_events - 1)  # the finish_reason chunk: no token


async def run_clients(url: str, args: argparse.Namespace) -> None:
    """The client process: one untimed round, then, when the parent says go, the timed one.

    It stands for clients on other machines, so it runs at a low priority: on a small
    machine it would otherwise take the core the gateway streams on at every token."""
    os.nice(10)
    body = msgspec.json.encode(
        {
            "model": args.model,
            "prompt": prompt_ids(args.prompt_tokens),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    streams = []
    for _ in range(args.clients):
        _, stream = await loop.create_connection(StreamCounter, host.strip("[]"), int(port))
        streams.append(stream)
    await asyncio.gather(*(s.post(request) for s in streams))
    print("warm", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start, cpu_start = time.monotonic(), time.process_time()
    counts = await asyncio.gather(*(s.post(request) for s in streams))
    seconds, cpu_s = time.monotonic() - start, time.process_time() - cpu_start
    for stream in streams:
        assert stream.transport is not None
        stream.transport.close()
    expected = args.clients * args.max_tokens
    if sum(counts) != expected:
        raise RuntimeError(f"received {sum(counts)} tokens, expected {expected}")
    result = {
        "tokens": expected,
        "seconds": seconds,
        "tokens_per_s": expected / seconds,
        "client_cpu_us_per_token": 1e6 * cpu_s / expected,
    }
    print(json.dumps(result))


async def gateway_round(args: argparse.Namespace, server: GatewayServer) -> dict[str, float]:
    served = server.app[METRICS]
    ready = server.app[ENGINE].ready
    client_args = ["--model", ready.model if ready else args.model]
    for flag in ("clients", "prompt_tokens", "max_tokens"):
        client_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench_overhead",
        "--client-of",
        server.url,
        *client_args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    if await client.stdout.readline() != b"warm\n":
        raise RuntimeError("the client process failed its untimed round")
    served.token_delays.clear()
    cpu_start = time.process_time()
    client.stdin.write(b"go\n")
    out = await client.stdout.read()
    gateway_cpu_s = time.process_time() - cpu_start
    if await client.wait() != 0:
        raise RuntimeError(f"the client process failed (exit {client.returncode})")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    delays = sorted(served.token_delays)
    for q in (50, 90, 99):
        result[f"delay_p{q}_ms"] = 1000 * delays[min(len(delays) - 1, len(delays) * q // 100)]
    result["delay_max_ms"] = 1000 * delays[-1]
    result["gateway_cpu_us_per_token"] = 1e6 * gateway_cpu_s / result["tokens"]
    return result


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = GatewayServer(gateway_config(args))
    await server.start()
    rounds: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeat):
            if repeat % 2 == 0:
                engine_only = await engine_round(args)
                gateway = await gateway_round(args, server)
            else:
                gateway = await gateway_round(args, server)
                engine_only = await engine_round(args)
            overhead = 1 - gateway["tokens_per_s"] / engine_only["tokens_per_s"]
            rounds.append({"engine_only": engine_only, "gateway": gateway, "overhead": overhead})
            print(
                f"  engine only {engine_only['tokens_per_s']:8.1f} tok/s   gateway "
                f"{gateway['tokens_per_s']:8.1f} tok/s   overhead {100 * overhead:5.1f}%   "
                f"delay p99 {gateway['delay_p99_ms']:.2f} ms",
                flush=True,
            )
    finally:
        await server.stop()
    return rounds


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the round pairs, and the spread of the pairs' overheads: the machine's
    speed moves between two rounds a few seconds apart, so one pair can read anywhere
    within +-15%; the mean's standard error says how far the runs' figure can be trusted."""

    def median(path: str, key: str) -> float:
        return float(statistics.median(r[path][key] for r in rounds))

    overheads = [r["overhead"] for r in rounds]
    stderr = statistics.stdev(overheads) / len(overheads) ** 0.5 if len(overheads) > 1 else 0.0
    return {
        "engine_only_tokens_per_s": median("engine_only", "tokens_per_s"),
        "gateway_tokens_per_s": median("gateway", "tokens_per_s"),
        "throughput_overhead": statistics.median(overheads),
        "throughput_overhead_mean": statistics.mean(overheads),
        "throughput_overhead_stderr": stderr,
        "throughput_overhead_min": min(overheads),
        "throughput_overhead_max": max(overheads),
        "delay_p50_ms": median("gateway", "delay_p50_ms"),
        "delay_p90_ms": median("gateway", "delay_p90_ms"),
        "delay_p99_ms": median("gateway", "delay_p99_ms"),
        "delay_p99_worst_round_ms": max(r["gateway"]["delay_p99_ms"] for r in rounds),
        "gateway_cpu_us_per_token": median("gateway", "gateway_cpu_us_per_token"),
        "client_cpu_us_per_token": median("gateway", "client_cpu_us_per_token"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--num-threads", type=int, default=None, help="engine torch threads (as `exegpt serve`)"
    )
    parser.add_argument("--policy", default="continuous", choices=("continuous", "rra", "static"))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--repeat", type=int, default=4, help="engine/gateway round pairs, order alternating"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_gateway_overhead.json"))
    parser.add_argument("--client-of", help=argparse.SUPPRESS)  # internal: the client process
    args = parser.parse_args(argv)
    if args.client_of:
        asyncio.run(run_clients(args.client_of, args))
        return 0
    rounds = asyncio.run(measure(args))
    summary = summarise(rounds)
    report = {
        "model": args.model,
        "policy": args.policy,
        "clients": args.clients,
        "num_threads": gateway_config(args).engine_threads,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "summary": summary,
        "rounds": rounds,
    }
    print(f"medians of {len(rounds)} round pairs ({args.clients} streams, {args.policy}):")
    print(
        f"  engine only {summary['engine_only_tokens_per_s']:.1f} tok/s, through the gateway "
        f"{summary['gateway_tokens_per_s']:.1f} tok/s: throughput overhead "
        f"{100 * summary['throughput_overhead']:.1f}% (mean "
        f"{100 * summary['throughput_overhead_mean']:.1f} +- "
        f"{100 * summary['throughput_overhead_stderr']:.1f}%, pairs from "
        f"{100 * summary['throughput_overhead_min']:.1f} to "
        f"{100 * summary['throughput_overhead_max']:.1f}%)"
    )
    print(
        f"  added per-token delay p50 {summary['delay_p50_ms']:.2f} ms, p90 "
        f"{summary['delay_p90_ms']:.2f} ms, p99 "
        f"{summary['delay_p99_ms']:.2f} ms (worst round "
        f"{summary['delay_p99_worst_round_ms']:.2f}); gateway CPU "
        f"{summary['gateway_cpu_us_per_token']:.1f} us/token (client "
        f"{summary['client_cpu_us_per_token']:.1f})"
    )
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
