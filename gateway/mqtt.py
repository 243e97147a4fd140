"""MQTT ingestion: requests from a topic, tokens to each request's reply topic.

One long-lived task owns the broker connection and reconnects with exponential backoff.
Outgoing messages never go straight to the client: request tasks put them on `outbox`, and
a publisher drains it while connected, keeping the message in hand until the broker acks
it (QoS 1). So when the broker goes away, requests already accepted keep generating, their
tokens wait in the outbox, and they are published after the reconnect (at least once).

A malformed payload is acknowledged (the client library acks QoS 1 on receipt) and answered
with an error, on its reply topic when that much can be read, else on the error topic, so
it is never redelivered forever. The embedded broker (amqtt, MQTT 3.1.1) gets a plain
subscription; external brokers get an MQTT 5 shared subscription so replicas split a topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import msgspec
from aiohttp import web

from engine import protocol as p
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient, EngineUnavailable, Overloaded
from gateway.errors import error_type
from gateway.keys import CONFIG, ENGINE, METRICS
from gateway.metrics import Metrics
from gateway.schemas import (
    ErrorBody,
    MqttDelta,
    MqttError,
    MqttFinished,
    MqttReplyHint,
    MqttRequest,
    Usage,
)

logger = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(MqttRequest).decode
_decode_hint = msgspec.json.Decoder(MqttReplyHint).decode


def is_valid_reply_topic(topic: str | None) -> bool:
    """A topic one can publish to: no wildcards, not a broker ($SYS) topic."""
    if not topic or topic.startswith("$"):
        return False
    return not any(c in topic for c in "+#\0")


class MqttBridge:
    def __init__(self, config: GatewayConfig, engine: EngineClient, metrics: Metrics) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.is_connected = asyncio.Event()
        self._in_hand: tuple[str, bytes] | None = None  # taken from outbox, not yet acked
        self._tasks: set[asyncio.Task[None]] = set()
        self._identifier = f"exegpt-{uuid.uuid4().hex[:12]}"

    @property
    def subscription(self) -> str:
        topic = self.config.mqtt_request_topic
        if self.config.mqtt != "embedded" and self.config.mqtt_share_group:
            return f"$share/{self.config.mqtt_share_group}/{topic}"
        return topic

    async def run(self, min_backoff_s: float = 0.2, max_backoff_s: float = 5.0) -> None:
        target = self.config.mqtt_target()
        protocol = (
            aiomqtt.ProtocolVersion.V311
            if self.config.mqtt == "embedded"
            else aiomqtt.ProtocolVersion.V5
        )
        backoff = min_backoff_s
        while True:
            client = aiomqtt.Client(
                target.host,
                target.port,
                identifier=self._identifier,
                protocol=protocol,
                keepalive=10,
                timeout=5,
            )
            client.pending_calls_threshold = 100_000
            try:
                async with client:
                    await client.subscribe(self.subscription, qos=1)
                    logger.info(
                        "MQTT: connected to %s:%d, subscribed to %s",
                        target.host,
                        target.port,
                        self.subscription,
                    )
                    self.is_connected.set()
                    backoff = min_backoff_s
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._publish_loop(client))
                        group.create_task(self._receive_loop(client))
            except* aiomqtt.MqttError as errors:
                logger.warning(
                    "MQTT: connection to %s:%d lost or refused (%s); retry in %.1f s",
                    target.host,
                    target.port,
                    errors.exceptions[0],
                    backoff,
                )
            self.is_connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            if self._in_hand is None:
                self._in_hand = await self.outbox.get()
            topic, payload = self._in_hand
            await client.publish(topic, payload, qos=1)
            self._in_hand = None

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else str(payload).encode()
            self.accept(raw)

    def accept(self, raw: bytes) -> None:
        """Validate one payload; start serving it, or answer with an error."""
        try:
            if len(raw) > self.config.max_body_bytes:
                raise ValueError(
                    f"payload of {len(raw)} bytes exceeds {self.config.max_body_bytes}"
                )
            request = _decode_request(raw)
            submit = self._to_submit(request)
        except (msgspec.DecodeError, ValueError) as exc:
            self.metrics.requests.labels("rejected").inc()
            self._reply_malformed(raw, str(exc))
            return
        task = asyncio.create_task(self._serve(request, submit), name=f"mqtt {request.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _to_submit(self, request: MqttRequest) -> p.Submit:
        if not is_valid_reply_topic(request.reply_topic):
            raise ValueError(f"invalid reply_topic {request.reply_topic!r}")
        if (request.prompt is None) == (request.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        context = (
            self.engine.ready.max_model_len if self.engine.ready else self.config.max_model_len
        )
        limit = self.config.max_tokens_limit or context
        if request.max_tokens is not None and not 1 <= request.max_tokens <= limit:
            raise ValueError(f"max_tokens must be between 1 and {limit}")
        messages = None
        if request.messages is not None:
            messages = [
                p.ChatMessage(m.role, m.content if isinstance(m.content, str) else "")
                for m in request.messages
            ]
        return p.Submit(
            request_id=f"mqtt-{uuid.uuid4().hex}",
            prompt=request.prompt,
            messages=messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
            ignore_eos=request.ignore_eos,
        )

    def _reply_malformed(self, raw: bytes, message: str) -> None:
        hint = MqttReplyHint()
        with contextlib.suppress(msgspec.DecodeError):
            hint = _decode_hint(raw)
        topic = hint.reply_topic if is_valid_reply_topic(hint.reply_topic) else None
        logger.info("MQTT: malformed request %r: %s", hint.id, message)
        self._publish_error(topic or self.config.mqtt_error_topic, hint.id, 400, message)

    def _publish_error(self, topic: str, request_id: str | None, status: int, message: str) -> None:
        body = ErrorBody(message, error_type(status), None, str(status))
        self.outbox.put_nowait((topic, _encode(MqttError(request_id, body))))

    async def _serve(self, request: MqttRequest, submit: p.Submit) -> None:
        start = time.monotonic()
        try:
            stream = self.engine.submit(submit)
        except Overloaded as exc:
            self.metrics.requests.labels("overloaded").inc()
            self._publish_error(request.reply_topic, request.id, 429, f"server busy: {exc}")
            return
        except EngineUnavailable as exc:
            self._publish_error(request.reply_topic, request.id, 503, str(exc))
            return
        try:
            await self._forward(request, stream.queue, start)
        finally:
            self.engine.abort(submit.request_id)

    async def _forward(
        self,
        request: MqttRequest,
        queue: asyncio.Queue[p.Accepted | p.TokenDelta | p.Finished | p.Error],
        start: float,
    ) -> None:
        parts: list[str] = []
        while True:
            event = await queue.get()
            if isinstance(event, p.TokenDelta):
                if not parts:
                    self.metrics.ttft.observe(time.monotonic() - start)
                self.metrics.on_tokens(len(event.token_ids))
                delta = MqttDelta(request.id, len(parts), event.text, event.token_ids)
                parts.append(event.text)
                self.outbox.put_nowait((request.reply_topic, _encode(delta)))
            elif isinstance(event, p.Finished):
                self.metrics.on_finished(time.monotonic() - start)
                usage = Usage(
                    event.num_prompt_tokens,
                    event.num_output_tokens,
                    event.num_prompt_tokens + event.num_output_tokens,
                )
                final = MqttFinished(request.id, event.finish_reason, "".join(parts), usage)
                self.outbox.put_nowait((request.reply_topic, _encode(final)))
                return
            elif isinstance(event, p.Error):
                self.metrics.requests.labels("rejected" if event.status < 500 else "error").inc()
                self._publish_error(request.reply_topic, request.id, event.status, event.message)
                return

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: let request tasks post their last messages and the outbox empty."""
        deadline = time.monotonic() + timeout_s
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        while (self._in_hand is not None or not self.outbox.empty()) and self.is_connected.is_set():
            if time.monotonic() > deadline:
                logger.warning("MQTT: %d messages unsent at shutdown", self.outbox.qsize())
                break
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    bridge = MqttBridge(app[CONFIG], app[ENGINE], app[METRICS])
    app[BRIDGE] = bridge
    runner = asyncio.create_task(bridge.run(), name="mqtt-bridge")
    yield
    await bridge.drain(timeout_s=3.0)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def embedded_broker_ctx(app: web.Application) -> AsyncIterator[None]:
    from amqtt.broker import Broker

    config = app[CONFIG]
    broker = Broker(
        {
            # amqtt binds every interface unless told: keep it on loopback.
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{config.mqtt_port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    try:
        await broker.start()
    except Exception as exc:  # port taken: HTTP still serves; the bridge keeps retrying
        logger.error(
            "embedded MQTT broker could not start on 127.0.0.1:%d (%s); MQTT "
            "ingestion waits for a broker there",
            config.mqtt_port,
            exc,
        )
        yield
        return
    logger.info("embedded MQTT broker on mqtt://127.0.0.1:%d", config.mqtt_port)
    yield
    await broker.shutdown()


BRIDGE = web.AppKey("mqtt_bridge", MqttBridge)
