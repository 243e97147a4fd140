"""Switching schedules while queries run drops nothing and changes no greedy token.

The controller hands the engine a new Schedule whenever it re-solves; the scheduler
applies it at the next step (after a static batch). Queries already encoded keep their
rows and KV, so a run that switches every few steps must equal an unswitched run token
for token.
"""

from __future__ import annotations

import random
from itertools import cycle

from adaptive.schedule import Policy, Schedule
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams

START = Schedule(Policy.RRA, encode_batch=2, decode_iters=4, max_batch=6)
SWITCHES = [
    Schedule(Policy.RRA, encode_batch=6, decode_iters=1, max_batch=6),
    Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=3),
    Schedule(Policy.RRA, encode_batch=1, decode_iters=8, max_batch=4),
    START,
]


def run(engine: LLMEngine, queries: list[tuple[list[int], int]], switch_every: int) -> dict:  # type: ignore[type-arg]
    """Run to completion, switching to the next of SWITCHES every `switch_every` steps
    (0: never), mid-phase on purpose."""
    for i, (prompt, n) in enumerate(queries):
        engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    got: dict[str, list[int]] = {f"q{i}": [] for i in range(len(queries))}
    finished: list[str] = []
    schedules = cycle(SWITCHES)
    ran = {engine.stats().schedule.describe()}
    num_steps = 0
    while engine.has_unfinished():
        if switch_every and num_steps % switch_every == switch_every - 1:
            engine.set_schedule(next(schedules))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                assert out.finish_reason == "length"
                finished.append(out.request_id)
        engine.scheduler.slots.check_integrity()
        ran.add(engine.stats().schedule.describe())
        num_steps += 1
    assert sorted(finished) == sorted(got)  # every query ended, once
    return {"tokens": got, "ran": ran}


def engine(load_cached) -> LLMEngine:  # type: ignore[no-untyped-def]
    config = EngineConfig(
        model="random:llama",
        dtype="float32",
        max_num_seqs=6,
        max_model_len=96,
        schedule=START,
        num_threads=1,
    )
    return LLMEngine(config, load_cached("random:llama"))


def test_switching_under_load_keeps_every_token(load_cached) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    queries = [
        ([rng.randrange(100, 40000) for _ in range(rng.randrange(2, 40))], rng.randrange(4, 14))
        for _ in range(16)
    ]
    unswitched = run(engine(load_cached), queries, switch_every=0)
    switched = run(engine(load_cached), queries, switch_every=5)

    assert switched["tokens"] == unswitched["tokens"]
    assert all(len(switched["tokens"][f"q{i}"]) == n for i, (_, n) in enumerate(queries))
    assert switched["ran"] == {s.describe() for s in SWITCHES}  # every schedule really ran
