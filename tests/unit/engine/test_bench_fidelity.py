"""`bench fidelity` on a random model: one row per schedule run, errors from both sides.

Tiny profile grid and workload: behaviour only, never how close the predictions are.
"""

import json
from typing import Any

import pytest

from engine.bench_fidelity import error_summary, measure_fidelity, replay
from engine.bench_offline import BOUND_BATCHES, KnobGrid
from engine.profiler import ProfileOptions, profile_model
from engine.workloads import make_prompts, task_queries

GRID = KnobGrid(static=BOUND_BATCHES, continuous=(8,), rra=((4, 2),), rra_max_batch=8)
TINY = ProfileOptions(max_batch=8, min_len=8, max_len=32, max_tokens=256, warmup=0, runs=1)


@pytest.fixture(scope="module")
def report(load_cached) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")
    queries = task_queries("S", 8, seed=1, scale=0.05)
    prompts = make_prompts(queries, loaded.vocab_size, seed=1)
    raw = profile_model(loaded, TINY, progress=False)
    return measure_fidelity(loaded, "S", queries, prompts, GRID, raw, num_threads=1, progress=False)


def test_every_grid_schedule_and_each_planner_choice_has_a_row(report: dict[str, Any]) -> None:
    grid = [r for r in report["rows"] if r["source"] == "grid"]
    planned = [r for r in report["rows"] if r["source"].startswith("planner@")]

    assert [r["schedule"] for r in grid] == [
        *(f"static(batch={b})" for b in BOUND_BATCHES),
        "continuous(max_batch=8)",
        "rra(B_E=4, N_D=2)",
    ]
    assert set(report["bounds_s"]) == {"p10", "p30", "p70", "none"}
    assert {r["source"] for r in planned} <= {f"planner@{b}" for b in report["bounds_s"]}
    assert "planner@none" in {r["source"] for r in planned}  # unbounded is always solvable
    assert all(r["policy"] == "rra" and r["knobs"]["max_batch"] <= GRID.max_batch for r in planned)


def test_errors_are_predicted_against_measured(report: dict[str, Any]) -> None:
    for row in report["rows"]:
        assert row["predicted_req_s"] > 0 and row["measured_req_s"] > 0
        assert row["measured_p99_latency_s"] > 0 and row["predicted_p99_latency_s"] > 0
        assert row["throughput_error"] == pytest.approx(
            row["predicted_req_s"] / row["measured_req_s"] - 1
        )
        assert row["latency_error"] == pytest.approx(
            row["predicted_p99_latency_s"] / row["measured_p99_latency_s"] - 1
        )
    assert report["summary"] == error_summary(report["rows"])


def test_step_times_are_priced_by_the_profile(report: dict[str, Any]) -> None:
    # every run encodes and decodes; a ratio is measured over predicted time, so a
    # profile taken on this machine a moment earlier lands within a few times of 1
    for row in report["rows"]:
        for key in ("encode_step_ratio", "decode_step_ratio"):
            assert 0.2 < row[key] < 5.0, (row["schedule"], key, row[key])


def test_error_summary_by_hand() -> None:
    rows = [
        {"throughput_error": 0.05, "latency_error": -0.2} | REFIT_ERRORS,
        {"throughput_error": -0.15, "latency_error": 0.1} | REFIT_ERRORS,
    ]

    summary = error_summary(rows, within=0.1)

    assert summary["throughput_error"] == pytest.approx(
        {"mean_abs": 0.1, "max_abs": 0.15, "share_within": 0.5}
    )
    assert summary["latency_error"] == pytest.approx(
        {"mean_abs": 0.15, "max_abs": 0.2, "share_within": 0.5}
    )
    assert summary["refit_latency_error"]["share_within"] == 1.0


REFIT_ERRORS = {"refit_throughput_error": 0.01, "refit_latency_error": -0.02}


def test_the_refit_prediction_follows_the_run_s_own_step_times(report: dict[str, Any]) -> None:
    """Scaled by the measured over predicted step times: steps slower than the profile
    lower the refit throughput and raise its latency, and the reverse."""
    for row in report["rows"]:
        ratios = (row["encode_step_ratio"], row["decode_step_ratio"])
        if min(ratios) > 1:
            assert row["refit_req_s"] < row["predicted_req_s"]
            assert row["refit_p99_latency_s"] > row["predicted_p99_latency_s"]
        elif max(ratios) < 1:
            assert row["refit_req_s"] > row["predicted_req_s"]
            assert row["refit_p99_latency_s"] < row["predicted_p99_latency_s"]
        assert row["refit_throughput_error"] == pytest.approx(
            row["refit_req_s"] / row["measured_req_s"] - 1
        )


def test_on_two_workers_rra_and_waa_are_priced_on_two_devices(load_cached) -> None:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")
    queries = task_queries("S", 8, seed=1, scale=0.05)
    prompts = make_prompts(queries, loaded.vocab_size, seed=1)
    raw = profile_model(loaded, TINY, progress=False)
    grid = KnobGrid(
        static=BOUND_BATCHES, continuous=(8,), rra=((4, 2),), rra_max_batch=8, waa=(2,),
        waa_max_batch=8,
    )  # fmt: skip
    report = measure_fidelity(
        loaded, "S", queries, prompts, grid, raw, num_threads=2, num_workers=2, progress=False
    )
    assert report["num_workers"] == 2
    grid_rows = [r for r in report["rows"] if r["source"] == "grid"]
    # static batching runs for the bounds only: the rows are the two-worker policies'
    assert [r["schedule"] for r in grid_rows] == [
        "rra(B_E=4, N_D=2)", "waa_c(B_E=2, micro=1, enc=1/2)",
    ]  # fmt: skip
    for row in report["rows"]:
        assert row["predicted_req_s"] > 0 and row["measured_req_s"] > 0


def test_a_replay_predicts_the_measured_runs_again_from_the_report_s_profile(
    report: dict[str, Any],
) -> None:
    """--replay judges a changed simulator on the same measurements: the same model gives
    the same rows back, and a profile twice as slow predicts each run about half as fast
    and its steps twice as slow, while the measured side stays as it was."""
    saved = json.loads(json.dumps(report | {"seed": 1, "scale": 0.05}))  # as --json writes it
    again = replay(saved)
    assert [r["schedule"] for r in again["rows"]] == [r["schedule"] for r in report["rows"]]
    for before, after in zip(report["rows"], again["rows"], strict=True):
        assert after["predicted_req_s"] == pytest.approx(before["predicted_req_s"])
        assert after["refit_p99_latency_s"] == pytest.approx(before["refit_p99_latency_s"])
        assert after["measured_req_s"] == before["measured_req_s"]
        assert after["encode_step_ratio"] == before["encode_step_ratio"]

    for side in ("encode", "decode"):
        for point in saved["profile"]["tp"][0][side]:
            point[2] *= 2  # [batch, length, ms per layer]
    for kind in saved["profile"]["head_ms"].values():
        for point in kind:
            point[2] *= 2
    slower = replay(saved)
    for before, after in zip(report["rows"], slower["rows"], strict=True):
        assert after["predicted_req_s"] == pytest.approx(before["predicted_req_s"] / 2, rel=0.05)
        assert after["measured_p99_latency_s"] == before["measured_p99_latency_s"]
        for key in ("encode_step_ratio", "decode_step_ratio"):
            assert after[key] == pytest.approx(before[key] / 2)
    # a report from before step shapes were kept replays with the ratios it carries
    for row in saved["rows"]:
        del row["steps"]
    older = replay(saved)
    for before, after in zip(report["rows"], older["rows"], strict=True):
        assert after["encode_step_ratio"] == before["encode_step_ratio"]
    with pytest.raises(ValueError, match="no profile"):
        replay({k: v for k, v in saved.items() if k != "profile"})
