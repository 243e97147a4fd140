"""`exegpt bench serve`: an open-loop load generator for any OpenAI-compatible endpoint.

Open loop: every request's send time is fixed before the run (Poisson gaps at `--rate`, or
a trace's times), so a slow server meets the same offered load as a fast one and its
queueing shows in the latencies instead of throttling the client. `--max-concurrency N`
closes the loop instead: at most N requests in flight, each timed from its sending (how
`bench compare` measures a server whose batch holds N, engine/bench_peers.py). Requests stream
`/v1/completions` over SSE; each one ends in exactly one outcome:

    ok        the stream ended with [DONE]
    error     an HTTP error status, an error event in the stream, or a broken connection
    cancelled still running (or still waiting for a place) at the hard end, then cancelled

Prompts are lists of token ids (`engine.workloads.make_prompts`), which a server that
accepts token-id prompts (exegpt, vLLM) takes verbatim, so prompt lengths are exact; the
usage a server returns (`stream_options.include_usage`) is checked against them. Output
lengths are forced with `ignore_eos` (exegpt, vLLM) and `min_tokens` (vLLM) beside
`max_tokens`; a server that honours neither may stop early, which the token counts show.

Figures: throughput over the run's duration (first send to last end); goodput counts only
requests whose end-to-end latency meets `--slo`; TTFT is send to the first chunk with a
choice; TPOT is (end-to-end - TTFT) / (output tokens - 1) per request. This module is
torch-free: the client must not compete with a server on the same cores more than needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from tqdm import tqdm

from engine.reports import write_report
from engine.workloads import Query, make_prompts, read_lengths, task_queries
from gateway.config import is_loopback

SMOLLM2_VOCAB = 49152  # SmolLM2's tokenizer, shared by the random test models
OUTCOMES = ("ok", "error", "cancelled")


@dataclass(frozen=True)
class Arrival:
    at_s: float  # send time, seconds after the run starts
    query: Query


@dataclass
class RequestRecord:
    """What the client saw of one request; `outcome` is one of OUTCOMES."""

    index: int
    prompt_len: int
    output_len: int  # requested (forced) output length
    outcome: str = "cancelled"
    ttft_s: float | None = None
    e2e_s: float | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None  # from the server's usage, when it sends one
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class LoadConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str
    duration_s: float | None = None  # no request is sent at or after this time
    drain_s: float = 30.0  # after the last send (or the time bound): then cancel the rest
    # None: open loop. N: at most N requests in flight; a request waits for a free place
    # and its times start when it is sent (the paper's method for a server whose batch
    # holds N: a query's latency runs from its first scheduling)
    max_concurrency: int | None = None
    api_key: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"the time bound must be positive, got {self.duration_s}")
        if self.drain_s < 0:
            raise ValueError(f"the drain time must be >= 0, got {self.drain_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


def check_loopback(url: str) -> None:
    """Refuse anything but a loopback http(s) URL: a load generator must not hit others."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http://HOST:PORT URL, got {url!r}")
    if not is_loopback(parts.hostname):
        raise ValueError(
            f"refusing to send load to {parts.hostname!r}: bench serve targets loopback "
            "addresses only (127.0.0.0/8, ::1, localhost)"
        )


# -- arrivals ----------------------------------------------------------------------------
def poisson_arrivals(queries: Sequence[Query], rate: float, seed: int = 0) -> list[Arrival]:
    """Exponential gaps at `rate` requests/s, the first at 0; rate inf sends all at once."""
    if not rate > 0:
        raise ValueError(f"the request rate must be positive, got {rate}")
    if math.isinf(rate):
        return [Arrival(0.0, q) for q in queries]
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(queries))
    times = np.concatenate(([0.0], np.cumsum(gaps[1:])))
    return [Arrival(float(t), q) for t, q in zip(times, queries, strict=True)]


def read_trace(path: str | Path, scale: float = 1.0) -> list[Arrival]:
    """A JSONL trace of {"arrival_s", "prompt_len", "output_len"}, sorted by time."""
    queries = read_lengths(path, scale)  # validates the lengths and their line numbers
    times = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                times.append(float(json.loads(line)["arrival_s"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f'{path}:{number}: expected an "arrival_s" number') from None
    if any(t < 0 for t in times):
        raise ValueError(f"{path}: arrival times must be >= 0")
    return sorted((Arrival(t, q) for t, q in zip(times, queries, strict=True)), key=_time)


def _time(arrival: Arrival) -> float:
    return arrival.at_s


# -- one request -------------------------------------------------------------------------
async def _stream_one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], record: RequestRecord
) -> None:
    """Send one streaming completion and fill `record` (the caller handles cancellation)."""
    start = time.monotonic()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                record.outcome = "error"
                record.error = f"HTTP {response.status}: {_error_message(await response.read())}"
                return
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    record.e2e_s = time.monotonic() - start
                    record.outcome = "ok" if record.error is None else "error"
                    return
                _on_chunk(json.loads(data), record, time.monotonic() - start)
        record.outcome, record.error = "error", "stream ended without [DONE]"
    except (aiohttp.ClientError, json.JSONDecodeError, TimeoutError) as exc:
        record.outcome, record.error = "error", f"{type(exc).__name__}: {exc}"


def _on_chunk(chunk: dict[str, Any], record: RequestRecord, elapsed_s: float) -> None:
    if "error" in chunk:
        record.error = str(chunk["error"].get("message", chunk["error"]))
        return
    if chunk.get("choices"):
        if record.ttft_s is None:
            record.ttft_s = elapsed_s
        if chunk["choices"][0].get("text") and not chunk.get("usage"):
            record.num_output_tokens += 1  # replaced by the usage count when one comes
    usage = chunk.get("usage")
    if usage:
        record.num_output_tokens = int(usage["completion_tokens"])
        record.num_prompt_tokens = int(usage["prompt_tokens"])


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def request_body(model: str, prompt: list[int], output_len: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "min_tokens": output_len,  # vLLM's; exegpt ignores unknown fields, as OpenAI does
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- the run -----------------------------------------------------------------------------
async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    places: asyncio.Semaphore,
) -> None:
    async with places:
        await _stream_one(session, url, body, record)


async def run_load(
    config: LoadConfig, arrivals: Sequence[Arrival], prompts: Sequence[list[int]]
) -> tuple[list[RequestRecord], float]:
    """Send every arrival before the time bound at its time; (records, duration in s).

    One record per request sent, in send order. The hard end is the last send (or the
    time bound) plus `drain_s`: requests still open then are cancelled.
    """
    due = [
        (a, p)
        for a, p in zip(arrivals, prompts, strict=True)
        if config.duration_s is None or a.at_s < config.duration_s
    ]
    last_send = due[-1][0].at_s if due else 0.0
    horizon = (config.duration_s if config.duration_s is not None else last_send) + config.drain_s
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: only `places` may limit
    bar = tqdm(total=len(due), desc="bench serve", unit="req", disable=not config.progress)
    places = asyncio.Semaphore(config.max_concurrency or len(due) or 1)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        start = time.monotonic()
        for index, (arrival, prompt) in enumerate(due):
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.monotonic()))
            record = RequestRecord(index, arrival.query.prompt_len, arrival.query.output_len)
            body = request_body(config.model, prompt, arrival.query.output_len)
            task = asyncio.create_task(_send(session, config.url, body, record, places))
            task.add_done_callback(lambda _: bar.update())
            records.append(record)
            tasks.append(task)
        remaining = start + horizon - time.monotonic()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.monotonic() - start
    bar.close()
    for record in records:
        if record.outcome == "cancelled":
            record.error = "still running at the hard end (time bound + drain)"
    return records, duration


# -- figures -----------------------------------------------------------------------------
def latency_stats(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, p50 and p99 (numpy's linear interpolation), or None without samples."""
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
    }


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo_s: float | None
) -> dict[str, Any]:
    """The report's figures; rates are over the run's duration, latencies over ok requests."""
    counts = Counter(r.outcome for r in records)
    ok = [r for r in records if r.outcome == "ok"]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    good = sum(1 for latency in e2e if slo_s is None or latency <= slo_s)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    errors = Counter(r.error for r in records if r.outcome == "error")
    return {
        "num_sent": len(records),
        **{f"num_{outcome}": counts.get(outcome, 0) for outcome in OUTCOMES},
        "duration_s": duration_s,
        "throughput_req_s": len(ok) * per_s,
        "throughput_tok_s": sum(r.num_output_tokens for r in ok) * per_s,
        "slo_s": slo_s,
        "goodput_req_s": good * per_s if slo_s is not None else None,
        "ttft_s": latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_s": latency_stats(e2e),
        "num_short_outputs": sum(1 for r in ok if r.num_output_tokens < r.output_len),
        "num_prompt_len_mismatches": sum(
            1 for r in ok if r.num_prompt_tokens not in (None, r.prompt_len)
        ),
        "errors": dict(errors.most_common(5)),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{report['num_sent']} sent: {report['num_ok']} ok, {report['num_error']} errors, "
        f"{report['num_cancelled']} cancelled in {report['duration_s']:.2f} s"
    )
    print(
        f"throughput {report['throughput_req_s']:.3f} req/s, "
        f"{report['throughput_tok_s']:.1f} output tok/s"
    )
    if report["goodput_req_s"] is not None:
        print(f"goodput    {report['goodput_req_s']:.3f} req/s (e2e <= {report['slo_s']:g} s)")
    print(f"{'':<8}{'mean':>10}{'p50':>10}{'p99':>10}")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "e2e")):
        stats = report[key] or {}
        cells = "".join(f"{stats.get(s, math.nan):>10.4f}" for s in ("mean", "p50", "p99"))
        print(f"{label + ' (s)':<8}{cells}")
    for message, count in report["errors"].items():
        print(f"  error x{count}: {message}")
    if report["num_short_outputs"] or report["num_prompt_len_mismatches"]:
        print(
            f"  warning: {report['num_short_outputs']} outputs shorter than forced, "
            f"{report['num_prompt_len_mismatches']} prompt lengths differ from the server's"
        )


# -- command line ------------------------------------------------------------------------
def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server root (loopback)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="bearer key, if the server needs one")
    parser.add_argument("--task", default="S", help="paper task for the lengths (S,T,G,C1,C2)")
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="JSONL of {arrival_s, prompt_len, output_len} instead of --task and --rate",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals, requests/s (default inf: all at once)",
    )
    parser.add_argument("--num-requests", type=int, default=96, help="count bound")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (default: open loop)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="time bound: no request is sent after this many seconds",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="seconds after the last send before open requests are cancelled",
    )
    parser.add_argument(
        "--slo", type=float, default=None, help="end-to-end latency bound for goodput, seconds"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=SMOLLM2_VOCAB,
        help="prompt token ids are drawn below this (default: SmolLM2's)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--records", action="store_true", help="with --json: also every request's record"
    )
    parser.set_defaults(run=run_serve_bench)  # fmt: skip


def arrivals_from_args(args: argparse.Namespace) -> list[Arrival]:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.trace is not None:
        return read_trace(args.trace, args.scale)[: args.num_requests]
    queries = task_queries(args.task, args.num_requests, args.seed, args.scale)
    return poisson_arrivals(queries, args.rate, args.seed)


async def served_model(url: str, api_key: str | None) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(headers=headers, timeout=timeout) as session,
        session.get(f"{url}/v1/models") as response,
    ):
        response.raise_for_status()
        return str((await response.json())["data"][0]["id"])


async def bench_serve(args: argparse.Namespace, arrivals: Sequence[Arrival]) -> dict[str, Any]:
    """One run as the command line describes it; the report as JSON-ready dict."""
    model = args.model or await served_model(args.url, args.api_key)
    config = LoadConfig(
        args.url,
        model,
        duration_s=args.duration,
        drain_s=args.drain,
        max_concurrency=args.max_concurrency,
        api_key=args.api_key,
    )
    prompts = make_prompts([a.query for a in arrivals], args.vocab_size, args.seed)
    records, duration = await run_load(config, arrivals, prompts)
    report = {
        "url": args.url,
        "model": model,
        "workload": str(args.trace) if args.trace else args.task,
        "rate_req_s": None if args.trace or math.isinf(args.rate) else args.rate,
        "num_requests": len(arrivals),
        "duration_bound_s": args.duration,
        "seed": args.seed,
        "scale": args.scale,
        **summarize(records, duration, args.slo),
    }
    if args.records:
        report["records"] = [asdict(r) for r in records]
    return report


def run_serve_bench(args: argparse.Namespace) -> int:
    check_loopback(args.url)  # before any other work
    arrivals = arrivals_from_args(args)
    try:
        report = asyncio.run(bench_serve(args, arrivals))
    except aiohttp.ClientError as exc:
        raise ValueError(f"cannot reach {args.url}: {exc}") from None
    print_report(report)
    if args.json is not None:
        write_report(report, args.json)
    return 0
