"""The gateway's handle on the engine process: submit, abort, SLO, stats, over one socket.

The client decodes the engine's frames as they arrive and routes each message to the
asyncio.Queue of its request (one queue per open stream). A consumer that can write a token
delta without waiting (an SSE stream, once its response is prepared) sets the stream's
`on_delta`; deltas are then handed to it as the frame is decoded, with no queue hop or task
switch per token. A stream leaves the table when its terminal message (Finished or Error)
arrives or when its owner aborts it, so the table's size is the number of requests in
flight, which is what admission control bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec

from engine import protocol as p

logger = logging.getLogger(__name__)

StreamEvent = p.Accepted | p.TokenDelta | p.Finished | p.Error


class Overloaded(Exception):
    """Admission control refused a request: too many in flight."""


class EngineUnavailable(Exception):
    """The engine process is not running (failed to start, exited, or shutting down)."""


@dataclass
class RequestStream:
    """Accepted and the terminal event always arrive on `queue`; token deltas arrive on
    `queue` until `on_delta` is set, then through it (it must not raise or await)."""

    request_id: str
    queue: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    on_delta: Callable[[p.TokenDelta], None] | None = None


class EngineClient(asyncio.Protocol):
    """The gateway's end of the engine socket, as an asyncio Protocol: frames are routed in
    `data_received` itself, so a step's deltas reach their streams in the event loop pass
    that reads them (StreamReader's readexactly added a task wake-up per frame, about a
    tenth of a millisecond to every token's delay on this project's 2-core VM)."""

    def __init__(self, max_in_flight: int, process: asyncio.subprocess.Process | None) -> None:
        self._process = process
        self.max_in_flight = max_in_flight
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()  # a frame's bytes until all of it has arrived
        self._streams: dict[str, RequestStream] = {}
        self._ready: asyncio.Future[p.Ready] = asyncio.get_running_loop().create_future()
        self._slo_waiters: dict[int, asyncio.Future[p.SloApplied]] = {}
        self._stats_waiters: list[asyncio.Future[p.Stats]] = []
        self._update_ids = itertools.count(1)
        self.is_alive = True
        self.ready: p.Ready | None = None

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        max_in_flight: int,
        process: asyncio.subprocess.Process | None = None,
    ) -> EngineClient:
        """Talk to the engine on `sock` (a connected stream socket, owned from now on)."""
        _, client = await asyncio.get_running_loop().create_unix_connection(
            lambda: cls(max_in_flight, process), sock=sock
        )
        return client

    @classmethod
    async def spawn(cls, options: p.EngineOptions, max_in_flight: int) -> EngineClient:
        """Start `python -m engine.process` on one end of a socketpair."""
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine.process",
                "--fd",
                str(child.fileno()),
                "--options",
                msgspec.json.encode(options).decode(),
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        return await cls.connect(parent, max_in_flight, process)

    async def start(self, timeout_s: float) -> p.Ready:
        """Wait for the engine's Ready (model loaded)."""
        try:
            self.ready = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except TimeoutError:
            await self.close()
            raise EngineUnavailable(
                f"the engine did not become ready in {timeout_s:.0f} s"
            ) from None
        except EngineUnavailable:
            await self.close()
            raise
        return self.ready

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def is_open(self, request_id: str) -> bool:
        return request_id in self._streams

    def submit(self, message: p.Submit) -> RequestStream:
        if not self.is_alive:
            raise EngineUnavailable("the engine is not running")
        if len(self._streams) >= self.max_in_flight:
            raise Overloaded(
                f"{len(self._streams)} requests in flight (limit {self.max_in_flight})"
            )
        if message.request_id in self._streams:
            raise ValueError(f"duplicate request id {message.request_id!r}")
        stream = RequestStream(message.request_id)
        self._streams[message.request_id] = stream
        self._send(message)
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request that has not ended yet; a no-op for finished ones. Never awaits,
        so it is safe in the `finally` of a cancelled handler."""
        if self._streams.pop(request_id, None) is not None and self.is_alive:
            logger.info("request %s: aborted", request_id)
            self._send(p.Abort(request_id))

    async def set_slo(self, latency_s: float | None, timeout_s: float = 10.0) -> p.SloApplied:
        update_id = next(self._update_ids)
        future: asyncio.Future[p.SloApplied] = asyncio.get_running_loop().create_future()
        self._slo_waiters[update_id] = future
        try:
            self._send(p.SetSlo(update_id, latency_s))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._slo_waiters.pop(update_id, None)

    async def stats(self, timeout_s: float = 5.0) -> p.Stats:
        future: asyncio.Future[p.Stats] = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(future)
        if len(self._stats_waiters) == 1:  # concurrent callers share one request
            self._send(p.StatsRequest())
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)

    def fail_all(self, message: str, status: int = 503) -> None:
        """End every open stream with an error (graceful shutdown: nothing left hanging)."""
        for request_id, stream in list(self._streams.items()):
            stream.queue.put_nowait(p.Error(request_id, message, status, "server_error"))
        self._streams.clear()

    async def close(self, timeout_s: float = 10.0) -> None:
        self.fail_all("server shutting down")
        if self.is_alive:
            self._send(p.Shutdown())
            self.is_alive = False
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout_s)
            except TimeoutError:
                logger.warning("engine process did not stop in %.0f s; killing it", timeout_s)
                self._process.kill()
                await self._process.wait()
        if self._transport is not None:
            self._transport.close()  # after what is buffered (the Shutdown) is sent

    def _send(self, message: p.ToEngine) -> None:
        # The transport buffers; frames are small and the engine drains its socket
        # continuously. Never awaiting keeps abort() usable from cancelled handlers.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(p.encode_frame([message]))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream socket's

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        header_size = p.FRAME_HEADER.size
        try:
            while len(self._buffer) >= header_size:
                end = header_size + p.frame_length(bytes(self._buffer[:header_size]))
                if len(self._buffer) < end:
                    return
                messages = p.decode_from_engine(bytes(self._buffer[header_size:end]))
                del self._buffer[:end]
                for message in messages:
                    self._route(message)
        except (ValueError, msgspec.DecodeError):
            logger.exception("undecodable frame from the engine")
            assert self._transport is not None
            self._transport.abort()  # connection_lost fails what is open

    def connection_lost(self, exc: Exception | None) -> None:
        logger.info("engine connection closed")
        self.is_alive = False
        if not self._ready.done():
            self._ready.set_exception(EngineUnavailable("the engine exited before ready"))
        self.fail_all("the engine process exited")
        for slo_waiter in self._slo_waiters.values():
            if not slo_waiter.done():
                slo_waiter.set_exception(EngineUnavailable("the engine process exited"))
        for stats_waiter in self._stats_waiters:
            if not stats_waiter.done():
                stats_waiter.set_exception(EngineUnavailable("the engine process exited"))

    def _route(self, message: p.FromEngine) -> None:
        if isinstance(message, p.TokenDelta):
            stream = self._streams.get(message.request_id)
            if stream is None:
                pass  # aborted by its owner: the engine drops it at its next step
            elif stream.on_delta is not None:
                stream.on_delta(message)
            else:
                stream.queue.put_nowait(message)
        elif isinstance(message, p.Accepted):
            stream = self._streams.get(message.request_id)
            if stream is not None:
                stream.queue.put_nowait(message)
        elif isinstance(message, p.Finished):
            stream = self._streams.pop(message.request_id, None)
            if stream is not None:
                stream.queue.put_nowait(message)
        elif isinstance(message, p.Error):
            self._route_error(message)
        elif isinstance(message, p.Ready):
            if not self._ready.done():
                self._ready.set_result(message)
        elif isinstance(message, p.SloApplied):
            waiter = self._slo_waiters.get(message.update_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif isinstance(message, p.Stats):
            waiters, self._stats_waiters = self._stats_waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(message)

    def _route_error(self, error: p.Error) -> None:
        if error.request_id is not None:
            stream = self._streams.pop(error.request_id, None)
            if stream is not None:
                stream.queue.put_nowait(error)
            return
        logger.error("engine: %s", error.message)
        if not self._ready.done():
            self._ready.set_exception(EngineUnavailable(error.message))
        for waiter in self._slo_waiters.values():
            if not waiter.done():
                waiter.set_exception(ValueError(error.message))
