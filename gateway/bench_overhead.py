"""What the gateway costs: engine-only throughput vs. the same workload through HTTP/SSE.

    python -m gateway.bench_overhead --model random:llama --clients 64 --max-tokens 128

1. Engine alone: `python -m engine.process --baseline` adds the N requests to an LLMEngine
   in-process and steps to completion (no IPC, no HTTP): tokens/s.
2. Through the gateway: a served engine process, and a separate client process opening N
   concurrent streaming /v1/completions requests (same prompt ids, greedy, ignore_eos).
   Throughput is tokens received / wall time; the added per-token delay is the gateway's
   own measure (engine emits a token -> its SSE chunk is written to the socket), taken from
   the engine's monotonic stamp on each delta.
Prints a table and writes JSON. A tiny random model makes the gateway's share look as
large as it can; on a real model the engine dominates even more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from engine import protocol as p
from gateway.config import GatewayConfig
from gateway.keys import ENGINE, METRICS
from gateway.server import GatewayServer


def prompt_ids(num_tokens: int) -> list[int]:
    return [1000 + (i * 7) % 500 for i in range(num_tokens)]


def engine_baseline(args: argparse.Namespace) -> dict[str, float]:
    options = p.EngineOptions(
        num_threads=args.num_threads,
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.clients,
        max_model_len=args.prompt_tokens + args.max_tokens + 8,
        adapt=False,  # both sides run the schedule solved at start
    )
    workload = {
        "num_requests": args.clients,
        "prompt_ids": prompt_ids(args.prompt_tokens),
        "max_tokens": args.max_tokens,
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.process",
            "--options",
            msgspec.json.encode(options).decode(),
            "--baseline",
            json.dumps(workload),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def run_clients(
    url: str, model: str, clients: int, prompt: list[int], max_tokens: int
) -> dict[str, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    connector = aiohttp.TCPConnector(limit=clients * 2)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> int:
            num_chunks = 0
            async with session.post(f"{url}/v1/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        num_chunks += 1
            return num_chunks - 1  # the finish_reason chunk carries no token

        await one()  # warm-up
        start = time.monotonic()
        counts = await asyncio.gather(*(one() for _ in range(clients)))
        seconds = time.monotonic() - start
    return {"tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds}


def client_process(args: argparse.Namespace, url: str, model: str) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.bench_overhead",
            "--client-of",
            url,
            "--model",
            model,
            "--clients",
            str(args.clients),
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--max-tokens",
            str(args.max_tokens),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def through_gateway(args: argparse.Namespace) -> dict[str, Any]:
    config = GatewayConfig(
        num_threads=args.num_threads,
        model=args.model,
        dtype=args.dtype,
        port=0,
        max_num_seqs=args.clients,
        max_model_len=args.prompt_tokens + args.max_tokens + 8,
        adapt=False,  # the schedule the engine-alone baseline runs
    )
    server = GatewayServer(config)
    await server.start()
    try:
        served = server.app[METRICS]
        ready = server.app[ENGINE].ready
        model = ready.model if ready else args.model
        result: dict[str, Any] = await asyncio.to_thread(client_process, args, server.url, model)
        delays = sorted(served.token_delays)
    finally:
        await server.stop()
    result["delay_p50_ms"] = 1000 * statistics.median(delays)
    result["delay_p99_ms"] = 1000 * delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    result["delay_samples"] = len(delays)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=None, help="engine torch threads")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("bench_gateway_overhead.json"))
    parser.add_argument("--client-of", help=argparse.SUPPRESS)  # internal: the client process
    args = parser.parse_args(argv)
    if args.client_of:
        result = asyncio.run(
            run_clients(
                args.client_of,
                args.model,
                args.clients,
                prompt_ids(args.prompt_tokens),
                args.max_tokens,
            )
        )
        print(json.dumps(result))
        return 0
    baseline = engine_baseline(args)
    gateway = asyncio.run(through_gateway(args))
    overhead = 1 - gateway["tokens_per_s"] / baseline["tokens_per_s"]
    report = {
        "model": args.model,
        "clients": args.clients,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "engine_only": baseline,
        "gateway": gateway,
        "throughput_overhead": overhead,
    }
    print(f"{'path':<14}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    for name, row in (("engine only", baseline), ("gateway+SSE", gateway)):
        print(f"{name:<14}{row['tokens']:>8.0f}{row['seconds']:>9.2f}{row['tokens_per_s']:>10.1f}")
    print(
        f"throughput overhead: {100 * overhead:.1f}%   added per-token delay p50 "
        f"{gateway['delay_p50_ms']:.2f} ms, p99 {gateway['delay_p99_ms']:.2f} ms "
        f"({gateway['delay_samples']} tokens)"
    )
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
