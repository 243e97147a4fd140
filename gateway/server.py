"""Running the app on a socket: shared by `exegpt serve`, the tests and the benchmark.

The listening socket is bound here (port 0 picks a free port), so callers learn the real
URL; handler_cancellation makes aiohttp cancel a handler whose client went away, which is
how a disconnect becomes an abort.
"""

from __future__ import annotations

import logging
import socket

from aiohttp import web

from engine.heap import freeze_startup_heap
from gateway.app import EngineFactory, create_app, spawn_engine
from gateway.config import GatewayConfig

logger = logging.getLogger(__name__)


class GatewayServer:
    def __init__(self, config: GatewayConfig, engine_factory: EngineFactory = spawn_engine) -> None:
        self.config = config
        self.app = create_app(config, engine_factory)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=5.0, access_log=None
        )
        try:
            await self._runner.setup()  # starts the engine: returns once it is ready
            await web.SockSite(self._runner, sock, backlog=1024).start()
        except BaseException:
            await self._runner.cleanup()
            sock.close()
            raise
        freeze_startup_heap()
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
