"""Model workers: two processes in a gloo group give the single worker's greedy tokens,
and a killed worker fails the step in bounded time instead of hanging the engine.

Each engine here starts one worker process (torch import and model load: a few seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil
import pytest

from engine.efficiency import profile_steps
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.workers import WorkerFailure


@pytest.mark.parametrize(
    ("model", "dtype"),
    [
        ("random:llama", "bfloat16"),
        ("random:llama", "float32"),
        ("random:gpt2", "float32"),
        ("random:t5", "float32"),
    ],
)
def test_two_pipeline_stages_match_one_worker(
    load_cached, engine_config, model, dtype, mixed_queries, run_to_end
):
    """Each stage computes whole layers, in the same order, on one lane's rows at a time
    (one lane per stage, engine/pipelined.py): equal even in bfloat16. T5's stages split
    the encoder blocks and the decoder blocks."""
    loaded = load_cached(model, dtype)
    queries = mixed_queries(seed=1, n=9)
    expected = run_to_end(LLMEngine(engine_config(model, dtype), loaded), queries)
    with LLMEngine(engine_config(model, dtype, num_workers=2), loaded) as engine:
        assert engine.workers is not None and engine.workers.layout.num_stages == 2
        assert run_to_end(engine, queries) == expected


def test_step_profile_sorts_the_drivers_stage_on_lanes(load_cached, engine_config):
    """`--profile-steps` on pipeline stages: the driver's share of each lane's step (its
    stage's layers, sampling) is sorted under the phase of the plan it belongs to."""
    loaded = load_cached("random:llama")
    with LLMEngine(engine_config("random:llama", num_workers=2), loaded) as engine:
        for i in range(4):
            engine.add_request(str(i), list(range(5, 15 + i)), SamplingParams(max_tokens=4))

        result = profile_steps(engine, 100)
    for phase in ("encode", "decode"):
        spent = result.ms_per_step[phase]
        assert spent["matmul"] > 0 and spent["attention"] > 0 and spent["sampling"] > 0


def test_stages_work_on_the_lanes_at_once_and_an_abort_in_flight_ends_once(
    load_cached, engine_config, mixed_queries, run_to_end
):
    """Two stages: the driver starts the second lane's step before the first's logits are
    back, so both are in flight. A query aborted while its step is in flight ends with
    one abort output; its row's compaction waits for that step, so the others' tokens
    stay exact."""
    loaded = load_cached("random:llama")
    queries = mixed_queries(seed=4, n=8, min_out=6)
    expected = run_to_end(LLMEngine(engine_config("random:llama"), loaded), queries)
    with LLMEngine(engine_config("random:llama", num_workers=2), loaded) as engine:
        assert len(engine.lanes) == 2
        for i, (prompt, n) in enumerate(queries):
            engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        got: dict[str, list[int]] = {f"q{i}": [] for i in range(len(queries))}
        finishes: dict[str, list[str | None]] = {rid: [] for rid in got}
        in_flight_together = False
        victim = None
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
                if out.finished:
                    finishes[out.request_id].append(out.finish_reason)
            steps = [lane.step for lane in engine.lanes]
            if all(steps):
                in_flight_together = True
                if victim is None:
                    first = steps[0]
                    assert first is not None
                    victim = first.plan.computed[0].request_id
                    engine.abort_request(victim)
        assert in_flight_together and victim is not None
        assert finishes[victim] == ["abort"]
        for rid, tokens in got.items():
            if rid != victim:
                assert tokens == expected[rid] and finishes[rid] == ["length"]
        assert engine.stats().num_running == 0


@pytest.mark.parametrize("num_workers", [2, 4], ids=["tp2", "2_stages_of_tp2"])
def test_tensor_parallel_two_matches_one_worker(
    load_cached, engine_config, num_workers, mixed_queries, run_to_end
):
    """TP=2 splits every layer's heads and MLP columns and sums the halves of o_proj and
    down_proj with an all-reduce. In float32 that sum changes no greedy token; in bfloat16
    each half is rounded before the sum (one worker rounds once, after it), which can flip
    a near-tie on a random model, so the comparison runs in float32."""
    loaded = load_cached("random:llama", "float32")
    queries = mixed_queries(seed=2, n=9)
    expected = run_to_end(LLMEngine(engine_config("random:llama"), loaded), queries)
    cfg = engine_config("random:llama", num_workers=num_workers, tp_degree=2)
    with LLMEngine(cfg, loaded) as engine:
        assert engine.workers is not None
        assert engine.workers.layout.num_stages == num_workers // 2
        assert run_to_end(engine, queries) == expected


def test_a_killed_worker_fails_the_step_and_the_group_restarts(
    load_cached, engine_config, mixed_queries, run_to_end, kill_a_worker
):
    loaded = load_cached("random:llama", "float32")
    queries = mixed_queries(seed=3, n=4)
    expected = run_to_end(LLMEngine(engine_config("random:llama"), loaded), queries)
    cfg = engine_config("random:llama", num_workers=2, worker_timeout_s=20)
    with LLMEngine(cfg, loaded) as engine:
        assert engine.workers is not None
        for i in range(3):
            engine.add_request(f"long{i}", [7] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()  # the group is busy with these when its worker dies
        kill_a_worker(engine)
        for i in range(3):  # what the engine process does: fail the in-flight requests
            engine.abort_request(f"long{i}")
        while engine.has_unfinished():
            engine.step()
        assert run_to_end(engine, queries) == expected  # on a fresh group
        assert len(engine.workers.pids) == 1


def test_a_hung_worker_fails_the_step_after_the_timeout(load_cached, engine_config):
    loaded = load_cached("random:llama", "float32")
    with LLMEngine(
        engine_config("random:llama", num_workers=2, worker_timeout_s=10), loaded
    ) as engine:
        assert engine.workers is not None
        engine.add_request("q", [7] * 10, SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()
        os.kill(engine.workers.pids[0], signal.SIGSTOP)  # alive, but never answers
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"(?i)timed? ?out"):
            while engine.has_unfinished():
                engine.step()
        assert 10 <= time.monotonic() - start < 40
        assert engine.workers.pids == []  # the stopped worker was killed


def test_workers_started_elsewhere_join_at_the_rendezvous_and_after_a_failure(
    load_cached, engine_config, mixed_queries, run_to_end
):
    """`exegpt worker --rendezvous`: a rank the driver does not start (on another machine;
    a process of its own here) joins the group and computes its stage exactly. When it
    dies the step fails, and the group the driver starts next takes the worker that
    joins in its place. When it hangs, the step fails after the timeout without the
    driver hanging on it, and once it runs again it joins the next group."""
    loaded = load_cached("random:llama")
    queries = mixed_queries(seed=5, n=6)
    expected = run_to_end(LLMEngine(engine_config("random:llama"), loaded), queries)
    with socket.socket() as sock:  # a free port for the driver to listen on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    command = [sys.executable, "-m", "engine.workers", "--rendezvous", address, "--rank", "1"]
    first = subprocess.Popen(command)
    second = None
    try:
        cfg = engine_config(
            "random:llama", num_workers=2, rendezvous=address, local_workers=1,
            worker_timeout_s=10,
        )  # fmt: skip
        with LLMEngine(cfg, loaded) as engine:
            assert engine.workers is not None and engine.workers.pids == []  # none here
            assert run_to_end(engine, queries) == expected
            first.kill()
            first.wait()
            engine.add_request("lost", [7] * 10, SamplingParams(max_tokens=4, ignore_eos=True))
            with pytest.raises(WorkerFailure):
                while engine.has_unfinished():
                    engine.step()
            (lost,) = engine.step()
            assert lost.request_id == "lost" and lost.finish_reason == "abort"
            second = subprocess.Popen(command)
            again = run_to_end(engine, queries[:2])  # on the group it joined
            assert again == {rid: expected[rid] for rid in ("q0", "q1")}
            os.kill(second.pid, signal.SIGSTOP)  # alive, but never answers
            engine.add_request("hung", [7] * 10, SamplingParams(max_tokens=4, ignore_eos=True))
            start = time.monotonic()
            # gloo words it "timed out" or "Application timeout caused pair closure"
            with pytest.raises(WorkerFailure, match=r"(?i)time(d )?out"):
                while engine.has_unfinished():
                    engine.step()
            assert time.monotonic() - start < 30
            (hung,) = engine.step()
            assert hung.request_id == "hung" and hung.finish_reason == "abort"
            os.kill(second.pid, signal.SIGCONT)
            again = run_to_end(engine, queries[2:4])  # the same process, joined anew
            assert again == {"q0": expected["q2"], "q1": expected["q3"]}
        assert second.wait(timeout=30) == 0  # stopped by the driver's close
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()


def test_unsupported_layouts_are_refused_before_any_process_starts(load_cached, engine_config):
    with pytest.raises(ValueError, match="split into tensor-parallel groups"):
        engine_config("random:llama", num_workers=3, tp_degree=2)
    with pytest.raises(ValueError, match="tensor parallelism supports"):
        LLMEngine(engine_config("random:t5", num_workers=2, tp_degree=2), load_cached("random:t5"))
    with pytest.raises(ValueError, match="tensor parallelism supports"):
        LLMEngine(
            engine_config("random:gpt2", num_workers=2, tp_degree=2), load_cached("random:gpt2")
        )
    with pytest.raises(ValueError, match="must divide the KV heads"):  # random:llama has 2
        LLMEngine(
            engine_config("random:llama", num_workers=4, tp_degree=4), load_cached("random:llama")
        )
    with pytest.raises(ValueError, match="exceed the model's 2 layers"):
        LLMEngine(engine_config("random:llama", num_workers=3), load_cached("random:llama"))


@pytest.mark.parametrize("policy", ["rra", "waa_c"])
async def test_served_requests_get_errors_when_a_worker_dies(
    make_gateway: Any, policy: str
) -> None:
    """Through the engine process (`exegpt serve --workers 2`; with waa_c the worker is
    the encode worker): every in-flight stream ends with an error event, then the server
    answers new requests on a fresh worker group."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        make_gateway(num_workers=2, policy=policy) as server,
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        async with http.get(f"{server.url}/v1/slo") as response:
            assert (await response.json())["active_schedule"]["policy"] == policy
        url = f"{server.url}/v1/completions"
        body = {"model": "random:llama", "prompt": "count", "ignore_eos": True}
        started = [asyncio.Event() for _ in range(3)]

        async def last_event(started: asyncio.Event) -> dict[str, Any]:
            """The stream's last JSON event, read after its first token arrived."""
            events = []
            stream = body | {"max_tokens": 500, "stream": True}
            async with http.post(url, json=stream) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        events.append(json.loads(line.removeprefix(b"data: ")))
                        started.set()
            return events[-1]

        in_flight = [asyncio.create_task(last_event(event)) for event in started]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 30)
        (worker,) = [
            child
            for child in psutil.Process().children(recursive=True)
            if "engine.workers" in child.cmdline()
        ]
        worker.send_signal(signal.SIGKILL)
        for last in await asyncio.wait_for(asyncio.gather(*in_flight), 30):
            assert "model worker" in last["error"]["message"], last
        async with http.post(url, json=body | {"max_tokens": 3}) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert answer["usage"]["completion_tokens"] == 3
