"""`exegpt serve`: flags, and a main that runs until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from gateway.config import POLICIES, GatewayConfig, is_loopback
from gateway.engine_client import EngineUnavailable
from gateway.server import GatewayServer

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    parser.add_argument(
        "--model", default=d.model, help="'smollm2', 'random:<arch>' or a Hugging Face model folder"
    )
    parser.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float32", "float16"))
    from engine.cli import add_device_argument  # which imports this module

    add_device_argument(parser)
    parser.add_argument("--host", default=d.host, help="listen address (default %(default)s)")
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument(
        "--slo",
        type=float,
        default=None,
        metavar="SECONDS",
        help="latency bound; changeable live with PUT /v1/slo (default: none)",
    )
    parser.add_argument("--policy", default=d.policy, choices=POLICIES)
    parser.add_argument(
        "--profile",
        default=d.profile,
        metavar="full|quick|FILE",
        help="layer-time profile the planner uses: measured once per model and device and "
        "cached under $EXEGPT_CACHE/profiles (full ~95 s for smollm2), or an `exegpt "
        "profile` file (default %(default)s)",
    )
    parser.add_argument(
        "--no-adapt",
        dest="adapt",
        action="store_false",
        help="solve the schedule once at start; no re-solving on drift, latency or SLO",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=d.max_num_seqs, help="KV slots = largest running batch"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="context limit (prompt + max_tokens), capped by the model's",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="requests in flight before 429 + Retry-After",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens accepted (default: the context length)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="engine torch threads, shared by the workers (default: all cores; all but one "
        "from 4 cores up)",
    )
    add_worker_arguments(parser)
    parser.add_argument(
        "--rendezvous",
        metavar="HOST:PORT",
        help="where workers on other machines join the group (`exegpt worker --rendezvous "
        "HOST:PORT --rank R`); the engine's process listens there",
    )
    parser.add_argument(
        "--local-workers",
        type=int,
        help="workers this machine starts, the engine's process included (default: all "
        "--workers; the others join at --rendezvous)",
    )
    parser.add_argument(
        "--mqtt",
        default="embedded",
        metavar="embedded|off|mqtt://HOST:PORT",
        help="MQTT ingestion: in-process broker, none, or an external broker",
    )
    parser.add_argument(
        "--mqtt-port", type=int, default=d.mqtt_port, help="port of the embedded broker"
    )
    parser.add_argument("--mqtt-topic", default=d.mqtt_request_topic)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EXEGPT_API_KEY"),
        help="bearer key required on /v1 (env EXEGPT_API_KEY)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("EXEGPT_ADMIN_TOKEN"),
        help="bearer token required by PUT /v1/slo (env EXEGPT_ADMIN_TOKEN)",
    )


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers and --tp: shared by `exegpt serve` and `exegpt bench offline`."""
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="model worker processes in one torch.distributed group; each runs "
        "a pipeline stage or a tensor slice of one (default 1: no extra process)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree within a stage; pipeline stages = workers / tp",
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        host=args.host,
        port=args.port,
        slo_s=args.slo,
        policy=args.policy,
        profile=args.profile,
        adapt=args.adapt,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_queued_requests=args.max_queued_requests,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        num_threads=args.num_threads,
        num_workers=args.workers,
        tp_degree=args.tp,
        rendezvous=args.rendezvous,
        local_workers=args.local_workers,
        mqtt=args.mqtt,
        mqtt_port=args.mqtt_port,
        mqtt_request_topic=args.mqtt_topic,
        api_key=args.api_key or None,
        admin_token=args.admin_token or None,
    )


async def serve_until_stopped(config: GatewayConfig) -> None:
    server = GatewayServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(
        f"exegpt serving {config.model} at {server.url}  (OpenAI API under {server.url}/v1)",
        flush=True,
    )
    if config.is_mqtt_enabled:
        target = config.mqtt_target()
        print(
            f"MQTT requests on mqtt://{target.host}:{target.port} topic "
            f"{config.mqtt_request_topic}",
            flush=True,
        )
    try:
        await stop.wait()
    finally:
        print("shutting down", flush=True)
        await server.stop()


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"exegpt serve: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and config.api_key is None:
        logger.warning(
            "listening on %s without --api-key: anyone who can reach it may use it", config.host
        )
    try:
        asyncio.run(serve_until_stopped(config))
    except (EngineUnavailable, OSError) as exc:
        print(f"exegpt serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exegpt serve", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
