"""Operational endpoints: /health, /v1/models, /metrics and the live SLO (/v1/slo)."""

from __future__ import annotations

import hmac
import logging
import math

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import protocol as p
from gateway.engine_client import EngineUnavailable
from gateway.errors import ApiError
from gateway.keys import CONFIG, ENGINE, METRICS, SLO
from gateway.openai_api import decode_body
from gateway.schemas import ModelCard, ModelList, ScheduleOut, SloState, SloUpdate

logger = logging.getLogger(__name__)

MAX_SLO_S = 3600.0


def json_response(payload: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(payload), status=status, content_type="application/json"
    )


def bearer_matches(request: web.Request, secret: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), secret.encode()
    )


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not engine.is_alive:
        return web.json_response({"status": "engine down"}, status=503)
    return web.json_response({"status": "ok", "in_flight": engine.num_in_flight})


async def models(request: web.Request) -> web.Response:
    ready = request.app[ENGINE].ready
    assert ready is not None  # the app starts serving only after the engine is ready
    return json_response(ModelList([ModelCard(ready.model, 0, ready.max_model_len)]))


async def refresh_stats(request: web.Request) -> p.Stats | None:
    engine, metrics = request.app[ENGINE], request.app[METRICS]
    try:
        stats = await engine.stats(timeout_s=2.0)
    except (TimeoutError, EngineUnavailable):
        return None
    metrics.update_from(stats, engine.num_in_flight)
    return stats


async def metrics_handler(request: web.Request) -> web.Response:
    await refresh_stats(request)
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def schedule_out(info: p.ScheduleInfo) -> ScheduleOut:
    return ScheduleOut(
        info.policy,
        info.encode_batch,
        info.decode_iters,
        info.max_batch,
        info.description,
        info.predicted_latency_s,
        info.predicted_throughput_req_s,
    )


async def get_slo(request: web.Request) -> web.Response:
    stats = await refresh_stats(request)
    if stats is None:
        raise ApiError(503, "the engine did not report its state")
    metrics, applied = request.app[METRICS], request.app[SLO].applied
    return json_response(
        SloState(
            latency_s=stats.slo_s,
            measured_p50_s=metrics.latency_percentile(0.50),
            measured_p99_s=metrics.latency_percentile(0.99),
            num_measured=len(metrics.latencies),
            schedule=schedule_out(stats.schedule),
            active_schedule=schedule_out(stats.active_schedule),
            is_feasible=applied.is_feasible if applied else True,
            schedule_source=applied.source if applied else "startup (--slo, --policy)",
            adaptation=stats.adaptation,
        )
    )


async def put_slo(request: web.Request) -> web.Response:
    token = request.app[CONFIG].admin_token
    if token is None:
        raise ApiError(403, "SLO changes are disabled: start the server with --admin-token")
    if not bearer_matches(request, token):
        raise ApiError(
            401,
            "a valid admin bearer token is required to change the SLO",
            headers={"WWW-Authenticate": "Bearer"},
        )
    update = decode_body(await request.read(), SloUpdate)
    bound = update.latency_s
    if bound is not None and not (math.isfinite(bound) and 0 < bound <= MAX_SLO_S):
        raise ApiError(
            400, f"latency_s must be in (0, {MAX_SLO_S:.0f}] seconds or null", param="latency_s"
        )
    try:
        applied = await request.app[ENGINE].set_slo(bound)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except (TimeoutError, EngineUnavailable):
        raise ApiError(503, "the engine did not apply the SLO") from None
    request.app[SLO].applied = applied
    request.app[METRICS].set_slo(applied.latency_s, applied.schedule)
    logger.info(
        "SLO set to %s s: %s (feasible=%s)",
        bound,
        applied.schedule.description,
        applied.is_feasible,
    )
    return await get_slo(request)
