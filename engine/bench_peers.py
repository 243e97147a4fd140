"""Peer engines behind their own OpenAI-compatible servers, measured by `bench serve`.

A peer runs as a subprocess on a free loopback port, started once for a whole comparison
(a CPU vLLM start takes minutes here) with room for the largest batch of the knob grid.
Every query of the workload is due at time zero and the client keeps at most B requests
in flight: the server's running batch never exceeds B, a query is sent when a row frees,
so its latency from sending runs from its first scheduling, as the in-process engines
measure it (engine/bench_offline.py). B is the knob swept, as a server's max batch would be.

- `vllm`: vLLM's CPU build in its own virtual environment (`--vllm-python`), started with
  its best setting on this kind of machine (ECOSYSTEM.md): OpenMP threads bound to every
  core, none reserved, Intel OpenMP preloaded. Its prefix cache is off: the comparison
  runs the same prompts once per knob setting, and with the cache on (vLLM's default) every
  run after the first found the prompts' keys and values left by the one before and skipped
  their encoding (task S then ran at 13.7 queries/s, which computed in full would take the
  whole bf16 matmul ceiling of the machine). The queries are distinct, so a first sight of
  them is what serving them costs; exegpt keeps no cache across requests either.
- `transformers-serve` is always reported as skipped: its `/v1/completions` (transformers
  5.24) answers a token-id prompt with 400 "prompt must be a string" and `ignore_eos` /
  `min_tokens` with 422, so it cannot run the same queries token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import transformers

from engine.bench_offline import RunResult, RunWork
from engine.bench_serve import Arrival, LoadConfig, run_load, served_model, summarize
from engine.model_loader import LoadedModel
from engine.workloads import Query

START_TIMEOUT_S = 600.0  # a first vLLM start compiles kernels


class PeerError(RuntimeError):
    """A peer that did not start, or a run with failed requests (reported, not hidden)."""


TRANSFORMERS_SERVE_SKIP = (
    f"transformers {transformers.__version__} `serve` takes text prompts only (a token-id "
    "prompt gets 400 'prompt must be a string') and refuses ignore_eos/min_tokens (422): "
    "it cannot run the same queries token for token"
)


@dataclass(frozen=True)
class Peer:
    """vLLM's OpenAI server from the Python of its own venv."""

    python: str
    model_folder: Path
    max_model_len: int
    name: str = "vllm"

    def command(self, port: int, batch: int) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_folder), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-num-seqs", str(batch),
            "--max-model-len", str(self.max_model_len),
            # on the CPU backend this is the share of RAM it reserves; it refuses to
            # start when more than that is not free, as on a machine shared with others
            "--gpu-memory-utilization", "0.3",
            "--no-enable-prefix-caching",  # each run computes its prompts (see above)
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        iomp = Path(self.python).resolve().parents[1] / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = str(iomp)
        return env


def find_peers(
    vllm_python: Path | None, model_folder: Path, max_model_len: int
) -> tuple[list[Peer], dict[str, str]]:
    """(peers found, {peer: why it is skipped})."""
    peers, skipped = [], {"transformers-serve": TRANSFORMERS_SERVE_SKIP}
    if vllm_python is None:
        skipped["vllm"] = "no --vllm-python given (vLLM's CPU build lives in its own venv)"
    elif not _has_module(str(vllm_python), "vllm"):
        skipped["vllm"] = f"{vllm_python} cannot import vllm"
    else:
        peers.append(Peer(str(vllm_python), model_folder, max_model_len))
    return peers, skipped


def _has_module(python: str, module: str) -> bool:
    try:
        check = subprocess.run(
            [python, "-c", f"import importlib.util as u; exit(u.find_spec({module!r}) is None)"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(peer: Peer, batch: int) -> Iterator[str]:
    """The peer serving on a free loopback port with room for `batch` running queries;
    yields its URL, stops it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            peer.command(port, batch), stdout=log, stderr=subprocess.STDOUT,
            env=peer.environment(), start_new_session=True,
        )  # fmt: skip
        try:
            _wait_ready(process, url, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"exited with status {process.returncode}: {_tail(log)}")
        try:
            asyncio.run(served_model(url, None))
            return
        except (aiohttp.ClientError, OSError, TimeoutError, KeyError, IndexError):
            time.sleep(1.0)
    raise PeerError(f"not ready after {START_TIMEOUT_S:.0f} s: {_tail(log)}")


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return " | ".join(log.read().decode(errors="replace").strip().splitlines()[-3:])


def run_peer(
    loaded: LoadedModel,
    name: str,
    url: str,
    task: str,
    batch: int,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
) -> RunResult:
    """One run of the whole workload on a running peer, at most `batch` queries in flight."""
    model = asyncio.run(served_model(url, None))
    config = LoadConfig(url, model, drain_s=3600.0, max_concurrency=batch, progress=False)
    arrivals = [Arrival(0.0, q) for q in queries]
    records, duration = asyncio.run(run_load(config, arrivals, prompts))
    report = summarize(records, duration, None)
    bad = report["num_short_outputs"] + report["num_prompt_len_mismatches"]
    if report["num_ok"] != len(queries) or bad:
        raise PeerError(
            f"{report['num_ok']}/{len(queries)} ok, {report['num_short_outputs']} short "
            f"outputs, {report['num_prompt_len_mismatches']} prompt lengths differ, "
            f"errors {report['errors']}"
        )
    latencies = tuple(r.e2e_s for r in records if r.e2e_s is not None)
    tokens = sum(r.num_output_tokens for r in records)
    work = RunWork.of(loaded, queries, None)  # a peer does not say what it computed
    return RunResult(name, task, {"batch_size": batch}, latencies, duration, tokens, work)
