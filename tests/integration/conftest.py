"""Fixtures for integration tests: a served random:llama gateway and a real mosquitto broker.

Factories (`start_mosquitto`, `start_gateway`) are reusable by other test modules; the
session fixtures share one broker and one served model, because starting the engine
process (torch import, model load) costs seconds on this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adaptive.schedule import Policy, Schedule
from engine.llm_engine import EngineConfig
from gateway.config import GatewayConfig
from gateway.server import GatewayServer

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ADMIN_TOKEN = "test-admin-token"
MODEL = "random:llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mosquitto:
    """A mosquitto broker on a loopback port; `restart()` keeps the port."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
        )
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="session")
def start_mosquitto() -> Iterator[Any]:
    """Factory: start_mosquitto() -> Mosquitto (stopped at the end of the session)."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    brokers: list[Mosquitto] = []

    def start() -> Mosquitto:
        broker = Mosquitto(free_port(), Path(tempfile.mkdtemp(prefix="mosquitto-")))
        broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto(start_mosquitto: Any) -> Mosquitto:
    broker: Mosquitto = start_mosquitto()
    return broker


@asynccontextmanager
async def start_gateway(**overrides: Any) -> AsyncIterator[GatewayServer]:
    """A gateway with a real engine process serving random:llama on a free loopback port."""
    settings: dict[str, Any] = {
        "model": MODEL,
        "dtype": "float32",  # batch-invariant enough that greedy text is reproducible
        "port": 0,
        "admin_token": ADMIN_TOKEN,
        "max_num_seqs": 64,
        "max_model_len": 512,
        # a 2-layer model is dominated by per-op overhead: one thread is faster, and leaves
        # the other core to the gateway and the test's clients
        "num_threads": 1,
        "profile": "quick",  # measured in ~3 s on first use, then cached
        "engine_start_timeout_s": 240,
    }
    settings.update(overrides)
    server = GatewayServer(GatewayConfig(**settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def make_gateway() -> Any:
    """Factory: `async with make_gateway(**overrides) as server` (start_gateway)."""
    return start_gateway


@pytest.fixture(scope="session")
async def gateway(mosquitto: Mosquitto) -> AsyncIterator[GatewayServer]:
    """One served model for the session, consuming MQTT from the session broker."""
    async with start_gateway(mqtt=f"mqtt://127.0.0.1:{mosquitto.port}") as server:
        await asyncio.sleep(0)
        yield server


SMALL_RRA = Schedule(Policy.RRA, encode_batch=3, decode_iters=2, max_batch=5)


def small_engine_config(model: str, dtype: str = "float32", **overrides: Any) -> EngineConfig:
    """A small engine's config (5 rows, 96 tokens, RRA, 2 threads) with `overrides`."""
    settings: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "max_num_seqs": 5,
        "max_model_len": 96,
        "schedule": SMALL_RRA,
        "num_threads": 2,
    }
    return EngineConfig(**(settings | overrides))


@pytest.fixture
def engine_config() -> Any:
    """Factory: `engine_config(model, dtype="float32", **overrides)` (small_engine_config)."""
    return small_engine_config


@pytest.fixture
def kill_a_worker() -> Any:
    """Factory: kill_a_worker(engine) SIGKILLs the engine's worker rank 1 and steps until
    the step that needs it fails, checking it is seen at once (well before the timeout)
    and the group torn down."""
    from engine.workers import WorkerFailure

    def kill(engine: Any) -> None:
        assert engine.workers is not None
        os.kill(engine.workers.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="model worker"):
            while engine.has_unfinished():
                engine.step()
        assert time.monotonic() - start < 20
        assert engine.workers.pids == []

    return kill
