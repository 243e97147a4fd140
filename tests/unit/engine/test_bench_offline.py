"""The offline bench: workloads, complete runs, the paper's bound method and the selection.

A handful of very short queries on a random model; behaviour only, never timings.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import engine.bench
from engine.bench import sweep
from engine.bench_offline import (
    BOUND_BATCHES,
    Bound,
    KnobGrid,
    RunResult,
    RunWork,
    best_under_bound,
    latency_bounds,
    selection_records,
)
from engine.cli import main
from engine.workloads import Query, make_prompts, read_lengths, task_queries

DATA = Path(__file__).resolve().parents[2] / "data"
GRID = KnobGrid(static=BOUND_BATCHES, continuous=(4, 8), rra=((2, 2), (4, 3)), rra_max_batch=8)
RECORD_FIELDS = {
    "policy",
    "task",
    "latency_bound_s",
    "knobs",
    "throughput_req_s",
    "throughput_tok_s",
    "p50_latency_s",
    "p99_latency_s",
    "num_requests",
}


@pytest.fixture(scope="module")
def runs(load_cached) -> list[RunResult]:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")
    queries = task_queries("C1", 10, seed=3, scale=0.05)
    prompts = make_prompts(queries, loaded.vocab_size, seed=3)
    return sweep(
        loaded,
        "C1",
        queries,
        prompts,
        ["static", "continuous", "rra", "hf"],
        GRID,
        num_threads=1,
        progress=False,
    )


def test_jsonl_loader_reads_the_shared_format() -> None:
    queries = read_lengths(DATA / "anchor-S.jsonl")

    assert len(queries) == 96
    assert queries[:2] == [Query(288, 46), Query(223, 31)]


def test_task_sampler_reproduces_the_anchor_workload() -> None:
    assert task_queries("S", 96, seed=0) == read_lengths(DATA / "anchor-S.jsonl")
    short = task_queries("S", 96, seed=0, scale=0.25)
    assert all(q.prompt_len <= 128 and q.output_len <= 20 for q in short)


def test_every_run_completes_every_query(runs: list[RunResult]) -> None:
    expected = {("static", b) for b in BOUND_BATCHES} | {("hf_generate", b) for b in BOUND_BATCHES}
    assert expected <= {(r.policy, r.knobs.get("batch_size")) for r in runs}
    assert {r.policy for r in runs} == {"static", "continuous", "rra", "hf_generate"}
    tokens = {r.num_output_tokens for r in runs}
    assert len(tokens) == 1  # every policy generated exactly the forced lengths
    for r in runs:
        assert r.num_requests == 10
        assert all(lat > 0 for lat in r.latencies_s)
        assert r.throughput_req_s > 0 and r.latency_percentile_s(99) >= r.latency_percentile_s(50)


def test_engine_runs_record_finishes_and_steps(runs: list[RunResult]) -> None:
    for r in (r for r in runs if r.policy != "hf_generate"):
        assert len(r.finish_times_s) == r.num_requests
        assert min(r.finish_times_s) > 0 and max(r.finish_times_s) <= r.makespan_s
        # every query is encoded exactly once
        encoded = sum(t.batch for t in r.steps if t.is_encode)
        assert encoded == r.num_requests
        assert all(t.seconds > 0 for t in r.steps)


def test_only_static_batching_computes_more_than_its_queries_and_the_padding_need(
    runs: list[RunResult],
) -> None:
    # early termination and packed prompts: rra and continuous compute what the queries
    # need, each encoding step rounded up to a multiple of 32 rows; static keeps finished
    # rows and HF pads prompts and outputs
    for r in runs:
        share = r.summary()["useful_token_share"]
        if r.policy in ("rra", "continuous"):
            encodes = sum(1 for t in r.steps if t.is_encode)
            assert 0 < r.work.computed_tokens - r.work.needed_tokens <= 31 * encodes
        elif r.knobs["batch_size"] >= 4:  # batches mixing lengths
            assert share < 1.0, r
        assert 0 < share <= 1.0
        assert r.work.useful_flops == runs[0].work.useful_flops  # same queries, same work


def test_bounds_are_percentiles_of_static_p99_latencies(runs: list[RunResult]) -> None:
    bounds = latency_bounds(runs)
    static_p99 = [r.latency_percentile_s(99) for r in runs if r.policy == "static"]

    assert [b.label for b in bounds] == ["p10", "p30", "p70", "none"]
    finite = [b.latency_s for b in bounds if b.latency_s is not None]
    assert finite == sorted(finite)
    assert finite == pytest.approx(list(np.percentile(static_p99, [10, 30, 70])))
    assert bounds[-1].latency_s is None


def test_best_under_bound_respects_the_bound(runs: list[RunResult]) -> None:
    bounds = latency_bounds(runs)
    policies = ["static", "continuous", "rra", "hf_generate"]
    records = selection_records(runs, bounds, "C1", policies)

    assert len(records) == len(policies) * len(bounds)
    for record in records:
        assert set(record) >= RECORD_FIELDS
        bound = record["latency_bound_s"]
        if record["knobs"] is None:  # no setting meets the bound
            assert record["throughput_req_s"] is None
            continue
        assert bound is None or record["p99_latency_s"] <= bound
        mine = [r for r in runs if r.policy == record["policy"]]
        feasible = [
            r.throughput_req_s for r in mine if bound is None or r.latency_percentile_s(99) <= bound
        ]
        assert record["throughput_req_s"] == pytest.approx(max(feasible), rel=1e-3)


def test_best_under_bound_picks_fastest_feasible_or_none() -> None:
    def run(throughput: float, latency: float) -> RunResult:
        return RunResult("rra", "S", {}, (latency,) * 4, 4 / throughput, 4, RunWork(4, 4, 1.0))

    fast_slow, slow_fast = run(10.0, 5.0), run(2.0, 1.0)
    assert best_under_bound([fast_slow, slow_fast], Bound("p30", 2.0)) is slow_fast
    assert best_under_bound([fast_slow, slow_fast], Bound("none", None)) is fast_slow
    assert best_under_bound([fast_slow, slow_fast], Bound("p10", 0.5)) is None


def test_steady_state_leaves_out_the_ramp_up_and_the_drain() -> None:
    # eight queries: two finish early, two late, the middle ones one per second
    finish = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 12.0)
    latencies = (0.5, 1.0, 1.5, 1.5, 1.5, 2.5, 6.0, 9.0)
    run = RunResult("rra", "S", {}, latencies, 12.0, 8, RunWork(8, 8, 1.0), finish)

    throughput, p99 = run.steady_state(trim=0.25)

    # window: from the 3rd finish (2 s) to the 6th (5 s); the 4th, 5th and 6th inside
    assert throughput == pytest.approx(3 / 3.0)
    assert p99 == pytest.approx(float(np.percentile([1.5, 1.5, 2.5], 99)))
    assert run.throughput_req_s == pytest.approx(8 / 12.0)


def test_steady_state_needs_finish_times_and_enough_queries() -> None:
    work = RunWork(4, 4, 1.0)
    with pytest.raises(ValueError, match="no finish times"):
        RunResult("static", "S", {}, (1.0,) * 4, 4.0, 4, work).steady_state()
    with pytest.raises(ValueError, match="too few"):
        RunResult("static", "S", {}, (1.0,) * 4, 4.0, 4, work, (1.0, 2.0, 3.0, 4.0)).steady_state()


def test_cli_writes_records(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    status = main(
        [
            "bench",
            "offline",
            "--model",
            "random:llama",
            "--dtype",
            "float32",
            "--lengths",
            str(DATA / "anchor-S.jsonl"),
            "--scale",
            "0.03",
            "--quick",
            "--policies",
            "static,rra",
            "--num-threads",
            "1",
            "--profile-steps",
            "6",
            "--json",
            str(out),
        ]
    )

    assert status == 0
    report = json.loads(out.read_text())
    assert {r["policy"] for r in report["records"]} == {"static", "rra"}
    assert all(set(r) >= RECORD_FIELDS and r["num_requests"] == 96 for r in report["records"])
    assert report["ceiling_gflop_s"] > 0
    for r in report["records"]:
        if r["knobs"] is not None:
            assert (
                0
                < r["ceiling_share"]
                == pytest.approx(r["useful_gflop_s"] / report["ceiling_gflop_s"])
            )
    profiles = report["tasks"]["anchor-S"]["step_profile"]
    assert set(profiles) == {"static", "rra"}
    for profile in profiles.values():
        assert sum(profile["steps"].values()) == 6
        assert profile["ms_per_step"]["encode"]["matmul"] > 0


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--phases", "S,G", "--slos", "1"], "one entry per phase"),
        (["--slos", "1,-2,1,1"], "positive"),
        (["--modes", "both"], "adaptive, fixed"),
    ],
)
def test_drift_benchmark_rejects_bad_arguments(
    argv: list[str],
    words: str,
    capsys: pytest.CaptureFixture,  # type: ignore[type-arg]
) -> None:
    assert main(["bench", "drift", *argv]) == 2
    assert words in capsys.readouterr().err


def test_a_run_stopped_in_a_later_task_keeps_the_finished_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is written after each task, so a run killed at its time limit (the GPU
    script's) still returns what it measured."""
    out = tmp_path / "bench.json"
    sweep = engine.bench.sweep

    def sweep_then_stop(loaded, task, *args, **kwargs):  # type: ignore[no-untyped-def]
        if task == "C1":
            raise KeyboardInterrupt
        return sweep(loaded, task, *args, **kwargs)

    monkeypatch.setattr("engine.bench.sweep", sweep_then_stop)
    argv = ["bench", "offline", "--model", "random:llama", "--dtype", "float32",
            "--tasks", "S,C1", "--num-queries", "8", "--scale", "0.03", "--quick",
            "--policies", "static", "--num-threads", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 130  # stopped, as by Ctrl-C
    report = json.loads(out.read_text())
    assert list(report["tasks"]) == ["S"]
    assert {r["task"] for r in report["records"]} == {"S"} and report["runs"]
