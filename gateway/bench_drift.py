"""`exegpt bench drift`: a served model under traffic whose lengths and SLO change mid-run.

Open-loop traffic in phases, each with the paper's task lengths scaled to this machine and
a bound set through PUT /v1/slo at its start (default: S, then G, then G with the bound
tightened, then C2 with it loosened again). A bound is given in seconds, or as a multiple
of the tightest one the server can meet for the phase's lengths ("2x"): the lowest latency
the planner predicts for them from the serving profile the server uses, so that the
default phases ask the same of a fast machine and a slow one, and no phase is impossible
by construction. The same script runs twice on fresh servers:
with online adaptation, and with the schedule solved once at start (`--no-adapt`).
Per phase: throughput, p99 latency as the client sees it (send to last token, queueing
included) and as the engine measures it (encode start to last token, the bound's
definition; its recent window), SLO attainment on both, the time from the phase's change
to the first new schedule, and dropped requests (errors or short outputs). Requests of a
phase are all answered before the next phase starts, so each counts in the phase that
sent it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from engine.reports import write_report
from engine.workloads import Query, make_prompts, task_queries
from gateway.config import GatewayConfig
from gateway.server import GatewayServer

TOKEN = "bench-drift"
PROMPT_VOCAB = 1100  # prompt ids in [100, 1000): valid for any model's vocabulary


@dataclass(frozen=True)
class PhaseSpec:
    task: str
    slo_s: float | None


@dataclass(frozen=True)
class PhaseResult:
    mode: str  # adaptive | fixed
    task: str
    slo_s: float | None
    num_sent: int
    num_dropped: int
    throughput_req_s: float
    p99_latency_s: float | None  # client: send -> last token
    attainment: float | None  # client latencies within the bound
    engine_p99_latency_s: float | None  # engine: encode start -> last token
    engine_attainment: float | None  # since the bound was last set
    change_delay_s: float | None  # phase start -> first schedule change in the phase
    switch_delay_s: float | None  # the engine's trigger -> new schedule running
    schedule: str  # running at the phase's end


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--phases", default="S,G,G,C2", help="paper tasks, one per phase")
    parser.add_argument(
        "--slos",
        default="2x,3x,2x,3x",
        help="bound set at each phase's start: seconds, 'none', or 'Nx' (N times the "
        "tightest bound the server can meet for the phase's lengths); default: G "
        "tightened, then loosened for C2",
    )
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds of traffic a phase")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--scale", type=float, default=0.125, help="multiply task lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="quick", help="full|quick|FILE (see serve)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--modes", default="adaptive,fixed", help="adaptive, fixed or both")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.set_defaults(run=run_drift)


Workload = tuple[list[Query], list[list[int]]]  # a phase's queries and their prompts


Bound = tuple[str, float | None, bool]  # task, seconds or factor (None: none), is a factor


def phase_bounds(args: argparse.Namespace) -> list[Bound]:
    """Each phase's task and bound as given ("Nx": a factor of the tightest), validated."""
    tasks = [t.strip().upper() for t in args.phases.split(",") if t.strip()]
    slos = [s.strip().lower() for s in args.slos.split(",") if s.strip()]
    if not tasks or len(slos) != len(tasks):
        raise ValueError("--phases and --slos need one entry per phase")
    bounds: list[Bound] = []
    for task, slo in zip(tasks, slos, strict=True):
        try:
            value = None if slo == "none" else float(slo.removesuffix("x"))
        except ValueError:
            raise ValueError(f"bound {slo!r}: expected seconds, 'Nx' or 'none'") from None
        if value is not None and not value > 0:
            raise ValueError("bounds must be positive seconds, 'Nx' or 'none'")
        bounds.append((task, value, slo.endswith("x")))
    if args.phase_s <= 0 or args.rate <= 0:
        raise ValueError("--phase-s and --rate must be positive")
    return bounds


def resolve_bounds(phases: list[Bound], config: GatewayConfig, scale: float) -> list[PhaseSpec]:
    """Seconds for every bound; an "Nx" bound from the serving profile, loaded (or
    measured, once, and cached for the server) as the engine does."""
    relative = {task for task, _, is_factor in phases if is_factor}
    tightest: dict[str, float] = {}
    if relative:
        import torch

        from adaptive.distributions import LengthDistribution
        from adaptive.schedule import Policy
        from adaptive.serving import ServingTarget
        from engine.model_loader import load_model
        from engine.profile_cache import serving_profile

        torch.set_num_threads(config.engine_threads)  # the profile's cache key
        profile = serving_profile(load_model(config.model, config.dtype), config.profile)
        target = ServingTarget(profile, config.max_num_seqs, Policy(config.policy))
        for task in sorted(relative):
            dist = LengthDistribution.from_task(task, scale=scale)
            tightest[task] = target.tightest_bound(dist)
    specs = []
    for task, value, is_factor in phases:
        if value is not None and is_factor:
            value = round(value * tightest[task], 2)
        specs.append(PhaseSpec(task, value))
    return specs


def run_drift(args: argparse.Namespace) -> int:
    phases = phase_bounds(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"adaptive", "fixed"}:
        raise ValueError("--modes takes adaptive, fixed or both")
    num = max(1, round(args.rate * args.phase_s))
    workloads: list[Workload] = []
    for i, (task, _, _) in enumerate(phases):
        queries = task_queries(task, num, args.seed + i, args.scale)
        workloads.append((queries, make_prompts(queries, PROMPT_VOCAB, args.seed + i)))
    longest = max(q.prompt_len + q.output_len for queries, _ in workloads for q in queries)
    config = GatewayConfig(
        model=args.model,
        dtype=args.dtype,
        port=0,
        max_num_seqs=args.max_num_seqs,
        max_model_len=longest + 8,
        num_threads=args.num_threads,
        admin_token=TOKEN,
        profile=args.profile,
    )
    specs = resolve_bounds(phases, config, args.scale)
    results: list[PhaseResult] = []
    for mode in modes:
        mode_config = replace(config, slo_s=specs[0].slo_s, adapt=mode == "adaptive")
        results += asyncio.run(run_mode(args, mode_config, specs, workloads, mode))
    print_table(results)
    if args.json is not None:
        report: dict[str, Any] = {
            "args": {k: str(v) for k, v in vars(args).items() if k != "run"},
            "phases": [asdict(r) for r in results],
        }
        write_report(report, args.json)
    return 0


async def run_mode(
    args: argparse.Namespace,
    config: GatewayConfig,
    specs: list[PhaseSpec],
    workloads: list[Workload],
    mode: str,
) -> list[PhaseResult]:
    server = GatewayServer(config)
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            warm = (complete(http, server.url, args.model, [100] * 8, 4) for _ in range(4))
            await asyncio.gather(*warm)
            out = []
            for spec, (queries, prompts) in zip(specs, workloads, strict=True):
                lengths = [q.output_len for q in queries]
                out.append(await run_phase(http, server.url, mode, spec, prompts, lengths, args))
            return out
    finally:
        await server.stop()


async def run_phase(
    http: aiohttp.ClientSession,
    url: str,
    mode: str,
    spec: PhaseSpec,
    prompts: list[list[int]],
    lengths: list[int],
    args: argparse.Namespace,
) -> PhaseResult:
    started_wall, started = time.time(), time.monotonic()
    before = await slo_state(http, url)
    if spec.slo_s != before["latency_s"]:  # else the phase changes only the traffic
        async with http.put(
            f"{url}/v1/slo",
            json={"latency_s": spec.slo_s},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            r.raise_for_status()
    first_change = asyncio.ensure_future(
        watch_change(http, url, before["adaptation"]["last_change_at"])
    )
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, len(prompts))  # Poisson arrivals
    tasks = []
    for prompt, n, at in zip(prompts, lengths, np.cumsum(gaps), strict=True):
        await asyncio.sleep(max(0.0, started + float(at) - time.monotonic()))
        tasks.append(asyncio.ensure_future(complete(http, url, args.model, prompt, n)))
    outcomes = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    first_change.cancel()
    changed = await first_change if first_change.done() and not first_change.cancelled() else None
    after = await slo_state(http, url)
    adaptation = after["adaptation"]
    delay = None if changed is None else changed - started_wall
    latencies = [t for t in outcomes if t is not None]
    bound = spec.slo_s
    engine_p99 = adaptation["measured_p99_latency_s"]
    return PhaseResult(
        mode=mode,
        task=spec.task,
        slo_s=bound,
        num_sent=len(prompts),
        num_dropped=len(prompts) - len(latencies),
        throughput_req_s=len(latencies) / elapsed,
        p99_latency_s=float(np.percentile(latencies, 99)) if latencies else None,
        attainment=_attainment(latencies, bound),
        engine_p99_latency_s=engine_p99,
        engine_attainment=adaptation["slo_attainment"],
        change_delay_s=delay,
        switch_delay_s=adaptation["switch_delay_s"],
        schedule=after["active_schedule"]["description"],
    )


async def watch_change(http: aiohttp.ClientSession, url: str, since: float) -> float:
    """Unix time of the first schedule change after `since` (polled every 50 ms)."""
    while True:
        changed: float = (await slo_state(http, url))["adaptation"]["last_change_at"]
        if changed > since:
            return changed
        await asyncio.sleep(0.05)


async def slo_state(http: aiohttp.ClientSession, url: str, tries: int = 20) -> dict[str, Any]:
    """GET /v1/slo; a busy engine may miss the gateway's 2 s stats deadline (503): retry."""
    for _ in range(tries - 1):
        async with http.get(f"{url}/v1/slo") as r:
            if r.status != 503:
                r.raise_for_status()
                state: dict[str, Any] = await r.json()
                return state
        await asyncio.sleep(0.25)
    async with http.get(f"{url}/v1/slo") as r:
        r.raise_for_status()
        last: dict[str, Any] = await r.json()
        return last


async def complete(
    http: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> float | None:
    """Seconds to the whole answer, or None when the request was dropped or cut short."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    sent = time.monotonic()
    try:
        async with http.post(f"{url}/v1/completions", json=body) as r:
            answer = await r.json()
            if r.status != 200 or answer["usage"]["completion_tokens"] != max_tokens:
                return None
    except (aiohttp.ClientError, KeyError, TimeoutError):
        return None
    return time.monotonic() - sent


def _attainment(latencies: list[float], bound: float | None) -> float | None:
    if not latencies:
        return None
    if bound is None:
        return 1.0
    return sum(t <= bound for t in latencies) / len(latencies)


def print_table(results: list[PhaseResult]) -> None:
    print(
        f"{'mode':<9} {'task':<4} {'SLO':>5} {'sent':>5} {'drop':>4} {'req/s':>6} "
        f"{'p99 s':>6} {'att':>5} {'eng p99':>7} {'eng att':>7} {'change s':>8} "
        f"{'switch s':>8}  schedule"
    )
    for r in results:
        print(
            f"{r.mode:<9} {r.task:<4} {_f(r.slo_s, 1):>5} {r.num_sent:>5} {r.num_dropped:>4} "
            f"{r.throughput_req_s:>6.2f} {_f(r.p99_latency_s):>6} {_f(r.attainment):>5} "
            f"{_f(r.engine_p99_latency_s):>7} {_f(r.engine_attainment):>7} "
            f"{_f(r.change_delay_s):>8} {_f(r.switch_delay_s):>8}  {r.schedule}"
        )


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
