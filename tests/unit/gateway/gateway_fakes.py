"""A fake engine process side, built from the protocol messages, for gateway unit tests.

The fake runs as an asyncio task on one end of a socketpair and answers like the engine
process: Ready at start, Accepted (or Error) per Submit, `num_tokens` TokenDeltas (texts
"t0 ", "t1 ", ... or the given `texts`, stamped like the engine's), then Finished. By default
all of them go in one frame; with `pace_s` each delta goes in a frame of its own, that long
after the last, as an engine's steps do. With `hold=True` requests stay open until aborted,
to test admission and shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine import protocol as p
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient
from gateway.server import GatewayServer

SCHEDULE = p.ScheduleInfo("rra", 4, 2, 8, "rra(B_E=4, N_D=2)", 3.0, 1.6)


@dataclass
class FakeEngine:
    num_tokens: int = 4
    texts: list[str] | None = None  # the deltas' texts; None: "t0 ", "t1 ", ...
    hold: bool = False
    pace_s: float | None = None  # None: a request's whole output in its Accepted frame
    max_model_len: int = 64
    submitted: list[p.Submit] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    open_ids: set[str] = field(default_factory=set)
    slo_s: float | None = None

    async def serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(p.encode_frame([p.Ready("fake", self.max_model_len, 8, None, SCHEDULE)]))
        paced: list[asyncio.Task[None]] = []
        try:
            while True:
                header = await reader.readexactly(p.FRAME_HEADER.size)
                body = await reader.readexactly(p.frame_length(header))
                for message in p.decode_to_engine(body):
                    out = self.handle(message)
                    if isinstance(message, p.Shutdown):
                        writer.write(p.encode_frame(out))
                        writer.close()
                        return
                    if self.pace_s is None or not isinstance(message, p.Submit):
                        writer.write(p.encode_frame(out))
                    else:
                        paced.append(asyncio.create_task(self._paced(writer, out)))
                    await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()
        finally:
            for task in paced:
                task.cancel()

    async def _paced(self, writer: asyncio.StreamWriter, out: list[p.FromEngine]) -> None:
        assert self.pace_s is not None
        writer.write(p.encode_frame(out[:1]))  # Accepted (or Error)
        for message in out[1:]:
            await asyncio.sleep(self.pace_s)
            if isinstance(message, p.TokenDelta):  # stamped when its "step" ends
                message = msgspec.structs.replace(message, emitted_at=time.monotonic())
            writer.write(p.encode_frame([message]))

    def handle(self, message: p.ToEngine) -> list[p.FromEngine]:
        if isinstance(message, p.Submit):
            self.submitted.append(message)
            prompt = message.prompt or ""
            if len(prompt) + (message.max_tokens or 0) > self.max_model_len:
                return [p.Error(message.request_id, "exceeds the context length", 400)]
            accepted = p.Accepted(message.request_id, len(prompt), message.max_tokens or 1)
            if self.hold:
                self.open_ids.add(message.request_id)
                return [accepted, p.TokenDelta(message.request_id, [1], "a")]
            texts = self.texts or [f"t{i} " for i in range(self.num_tokens)]
            now = time.monotonic()
            deltas: list[p.FromEngine] = [
                p.TokenDelta(message.request_id, [i], text, now) for i, text in enumerate(texts)
            ]
            done = p.Finished(message.request_id, "length", len(prompt), len(texts))
            return [accepted, *deltas, done]
        if isinstance(message, p.Abort):
            self.aborted.append(message.request_id)
            if message.request_id in self.open_ids:
                self.open_ids.discard(message.request_id)
                return [p.Finished(message.request_id, "abort", 1, 1)]
        if isinstance(message, p.SetSlo):
            self.slo_s = message.latency_s
            return [p.SloApplied(message.update_id, message.latency_s, SCHEDULE, True, "fake")]
        if isinstance(message, p.StatsRequest):
            running = len(self.open_ids)
            return [p.Stats(0, running, 8 - running, self.slo_s, SCHEDULE, SCHEDULE)]
        if isinstance(message, p.Shutdown):
            return [
                p.Error(rid, "server shutting down", 503, "server_error") for rid in self.open_ids
            ]
        return []


@asynccontextmanager
async def fake_gateway(engine: FakeEngine, **overrides: Any) -> AsyncIterator[GatewayServer]:
    tasks: list[asyncio.Task[None]] = []

    async def factory(config: GatewayConfig) -> EngineClient:
        parent, child = socket.socketpair()
        tasks.append(asyncio.create_task(engine.serve(child)))
        return await EngineClient.connect(parent, config.max_queued_requests)

    settings: dict[str, Any] = {"model": "fake", "port": 0, "admin_token": "secret"}
    settings.update(overrides)
    server = GatewayServer(GatewayConfig(**settings), engine_factory=factory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
