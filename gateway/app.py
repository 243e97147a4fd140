"""The aiohttp application: `create_app()` wires routes, middlewares and background parts.

Lifecycle (cleanup_ctx, started in order, stopped in reverse):
  engine  -> start the engine process, wait for Ready; at exit stop it (Shutdown, then kill)
  broker  -> (mqtt=embedded) amqtt on 127.0.0.1
  mqtt    -> the MQTT bridge; at exit let it post final messages
on_shutdown (before aiohttp waits for running handlers) ends every open stream with an
error event, so graceful shutdown never waits on a long generation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from engine import protocol as p
from gateway import admin, mqtt, openai_api
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient
from gateway.errors import ApiError, error_middleware
from gateway.keys import CONFIG, ENGINE, METRICS, SLO, SloRecord
from gateway.metrics import Metrics

logger = logging.getLogger(__name__)

EngineFactory = Callable[[GatewayConfig], Awaitable[EngineClient]]


def engine_options(config: GatewayConfig) -> p.EngineOptions:
    return p.EngineOptions(
        model=config.model,
        dtype=config.dtype,
        device=config.device,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        policy=config.policy,
        slo_s=config.slo_s,
        num_threads=config.engine_threads,
        profile=config.profile,
        adapt=config.adapt,
        num_workers=config.num_workers,
        tp_degree=config.tp_degree,
        rendezvous=config.rendezvous,
        local_workers=config.local_workers,
    )


async def spawn_engine(config: GatewayConfig) -> EngineClient:
    return await EngineClient.spawn(engine_options(config), config.max_queued_requests)


def engine_ctx(factory: EngineFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        engine = await factory(config)
        ready = await engine.start(config.engine_start_timeout_s)
        app[ENGINE] = engine
        app[METRICS].set_slo(ready.slo_s, ready.schedule)
        logger.info(
            "engine ready: %s (context %d, %s)",
            ready.model,
            ready.max_model_len,
            ready.schedule.description,
        )
        yield
        await engine.close()

    return ctx


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[CONFIG].api_key
    # /v1/slo has its own rule (admin token for PUT); the rest of /v1 needs the API key.
    is_guarded = key and request.path.startswith("/v1/") and request.path != "/v1/slo"
    if is_guarded and key and not admin.bearer_matches(request, key):
        raise ApiError(
            401,
            "invalid or missing API key",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    response: web.StreamResponse = await handler(request)
    return response


async def fail_open_streams(app: web.Application) -> None:
    if ENGINE in app:
        app[ENGINE].fail_all("server shutting down")


def create_app(
    config: GatewayConfig, engine_factory: EngineFactory = spawn_engine
) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[error_middleware, api_key_middleware],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[SLO] = SloRecord()
    app.cleanup_ctx.append(engine_ctx(engine_factory))
    if config.mqtt == "embedded":
        app.cleanup_ctx.append(mqtt.embedded_broker_ctx)
    if config.is_mqtt_enabled:
        app.cleanup_ctx.append(mqtt.mqtt_ctx)
    app.on_shutdown.append(fail_open_streams)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", admin.models)
    app.router.add_get("/v1/slo", admin.get_slo)
    app.router.add_put("/v1/slo", admin.put_slo)
    app.router.add_get("/health", admin.health)
    app.router.add_get("/metrics", admin.metrics_handler)
    return app
