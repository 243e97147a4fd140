"""WAA: encode workers prefill apart, asynchronously, and hand each query's KV and first
token to the decode workers, which give the single worker's greedy tokens; a killed encode
worker fails the requests the group held, and the group restarts.

Each engine here starts one to three worker processes (torch import and model load: a
few seconds each).
"""

from __future__ import annotations

from typing import Any

import pytest

from adaptive.schedule import Policy, Schedule
from engine.bench import sweep
from engine.bench_offline import BOUND_BATCHES, KnobGrid, latency_bounds, selection_records
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import StepPlan, StepResult
from engine.workloads import make_prompts, task_queries


@pytest.fixture
def waa_config(engine_config: Any) -> Any:
    """Factory: a small engine's config running WAA-C over `num_workers` workers."""

    def make(
        model: str,
        dtype: str = "float32",
        *,
        num_workers: int = 2,
        encode_workers: int = 1,
        micro: int = 1,
        **overrides: Any,
    ) -> EngineConfig:
        schedule = Schedule(
            Policy.WAA_C,
            encode_batch=3,
            max_batch=5,
            decode_microbatches=micro,
            num_workers=num_workers,
            encode_workers=encode_workers,
        )
        return engine_config(model, dtype, schedule=schedule, num_workers=num_workers, **overrides)

    return make


@pytest.mark.parametrize(
    ("model", "dtype", "num_workers", "encode_workers", "tp", "micro"),
    [
        ("random:llama", "float32", 2, 1, 1, 1),
        ("random:llama", "bfloat16", 2, 1, 1, 1),
        ("random:t5", "float32", 2, 1, 1, 1),
        ("random:llama", "float32", 3, 1, 1, 2),
        ("random:t5", "float32", 3, 2, 1, 1),
        ("random:llama", "float32", 4, 2, 2, 1),
    ],
    ids=[
        "llama",
        "llama-bf16",
        "t5",
        "llama-2-decode-stages-2-micro",
        "t5-2-encode-stages",
        "llama-tp2-each-side",
    ],
)
def test_waa_matches_one_worker(
    load_cached,
    engine_config,
    waa_config,
    model,
    dtype,
    num_workers,
    encode_workers,
    tp,
    micro,
    mixed_queries,
    run_to_end,
):
    """More queries than rows, outputs of 1 to 13 tokens: hand-outs, arrivals and finishes
    interleave. The KV crosses as is, and each side computes whole rows, so the tokens are
    the single worker's. With stages on both sides the two split the layers differently:
    a decode rank takes its layers from several encode ranks, or the reverse."""
    loaded = load_cached(model, dtype)
    queries = mixed_queries(seed=4, n=12)
    expected = run_to_end(LLMEngine(engine_config(model, dtype), loaded), queries)
    cfg = waa_config(
        model,
        dtype,
        num_workers=num_workers,
        encode_workers=encode_workers,
        micro=micro,
        tp_degree=tp,
    )
    with LLMEngine(cfg, loaded) as engine:
        assert engine.workers is not None
        assert engine.workers.allocation.encode_workers == encode_workers
        assert run_to_end(engine, queries) == expected


def test_the_driver_decodes_while_a_batch_is_encoded(load_cached, waa_config, monkeypatch):
    """A step that hands a batch out sends it to the encode workers before its own
    forward: some steps do, with running rows to decode, and their rows get tokens (on a
    busy machine the batch may arrive within the same step, so no clock decides this)."""
    loaded = load_cached("random:llama", "float32")
    with LLMEngine(waa_config("random:llama"), loaded) as engine:
        runner = engine.lanes[0].runner
        execute, overlapped = runner.execute, []

        def spy(plan: StepPlan) -> StepResult:
            result = execute(plan)
            if plan.dispatched and plan.requests:
                overlapped.append(len(result.tokens) == len(plan.requests))
            return result

        monkeypatch.setattr(runner, "execute", spy)
        for i in range(6):
            engine.add_request(f"q{i}", [7] * 40, SamplingParams(max_tokens=30, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        assert overlapped and all(overlapped)


def test_a_killed_encode_worker_fails_its_requests_and_the_group_restarts(
    load_cached, engine_config, waa_config, mixed_queries, run_to_end, kill_a_worker
):
    loaded = load_cached("random:llama", "float32")
    queries = mixed_queries(seed=3, n=6)
    expected = run_to_end(LLMEngine(engine_config("random:llama"), loaded), queries)
    with LLMEngine(waa_config("random:llama", worker_timeout_s=20), loaded) as engine:
        assert engine.workers is not None
        for i in range(8):
            engine.add_request(f"long{i}", [7] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
        while not (engine.scheduler.running() and engine.scheduler.waiting):
            engine.step()
        rows = {r.request_id for r in engine.scheduler.running()}
        # rank 1, the encode worker, dies; the next step hands it a batch (a small model's
        # batches come back within the step that hands them out)
        kill_a_worker(engine)
        waiting = [r.request_id for r in engine.scheduler.waiting]
        failed = {o.request_id: o.finish_reason for o in engine.step() if o.finished}
        # every request the group held, the rows and the batch handed out, once each
        assert failed == dict.fromkeys(
            sorted({f"long{i}" for i in range(8)} - set(waiting)), "abort"
        )
        assert rows < set(failed)
        for request_id in waiting:  # what the engine process does: fail the rest too
            engine.abort_request(request_id)
        while engine.has_unfinished():
            engine.step()
        assert run_to_end(engine, queries) == expected  # on a fresh group
        assert len(engine.workers.pids) == 1


def test_the_offline_bench_sweeps_waa_on_split_workers(load_cached):
    """`exegpt bench offline --workers 2 --policies waa_c`: static batching sets the bounds
    on the two workers as one pipeline, then WAA's settings run on them split."""
    loaded = load_cached("random:llama", "float32")
    queries = task_queries("C1", 10, seed=3, scale=0.05)
    prompts = make_prompts(queries, loaded.vocab_size, seed=3)
    grid = KnobGrid(
        static=BOUND_BATCHES,
        continuous=(4,),
        rra=((2, 2),),
        rra_max_batch=8,
        waa=(2, 4),
        waa_max_batch=8,
    )
    runs = sweep(
        loaded,
        "C1",
        queries,
        prompts,
        ["waa_c"],
        grid,
        num_threads=2,
        progress=False,
        num_workers=2,
    )
    waa = [r for r in runs if r.policy == "waa_c"]
    assert [r.knobs["encode_batch"] for r in waa] == [2, 4]
    assert all(r.knobs["encode_workers"] == 1 and r.num_requests == 10 for r in waa)
    records = selection_records(runs, latency_bounds(runs), "C1", ["static", "waa_c"])
    assert {r["policy"] for r in records if r["knobs"]} == {"static", "waa_c"}
