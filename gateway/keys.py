"""Typed application keys shared by the gateway's modules."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from engine import protocol as p
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient
from gateway.metrics import Metrics


@dataclass
class SloRecord:
    """The last SLO update the engine applied (None until the first PUT)."""

    applied: p.SloApplied | None = None


CONFIG = web.AppKey("config", GatewayConfig)
ENGINE = web.AppKey("engine", EngineClient)
METRICS = web.AppKey("metrics", Metrics)
SLO = web.AppKey("slo", SloRecord)
