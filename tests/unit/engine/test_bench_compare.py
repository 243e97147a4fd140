"""`bench compare` on a random model: every system run on the same queries, honest skips.

A handful of very short queries and a tiny profile: behaviour only, never timings.
"""

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.bench_compare import Trial, interleave
from engine.bench_offline import BOUND_BATCHES, QUICK_GRID
from engine.bench_peers import Peer, find_peers
from engine.cli import main
from engine.profiler import ProfileOptions, profile_model

TINY = ProfileOptions(max_batch=8, min_len=8, max_len=32, max_tokens=256, warmup=0, runs=1)


def _compare(load_cached, folder: Path, *extra: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    profile = folder / "profile.json"
    profile.write_text(json.dumps(profile_model(load_cached("random:llama"), TINY, progress=False)))
    argv = ["bench", "compare", "--model", "random:llama", "--tasks", "S", "--quick"]
    argv += ["--num-queries", "8", "--scale", "0.05", "--num-threads", "1"]
    argv += ["--profile", str(profile), "--json", str(folder / "r.json"), *extra]
    assert main(argv) == 0
    result: dict[str, Any] = json.loads((folder / "r.json").read_text())
    return result


@pytest.fixture(scope="module")
def report(load_cached, tmp_path_factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("compare")
    result = _compare(load_cached, folder, "--plot", str(folder / "r.png"))
    assert (folder / "r.png").read_bytes().startswith(b"\x89PNG")
    return result


@pytest.fixture(scope="module")
def hf_bounds(load_cached, tmp_path_factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return _compare(load_cached, tmp_path_factory.mktemp("hf"), "--bounds-from", "hf_generate")


def test_interleave_takes_one_setting_of_each_system_in_turn() -> None:
    a = [Trial("a", {"k": i}) for i in range(3)]
    b = [Trial("b", {"k": 0})]
    c = [Trial("c", {"k": i}) for i in range(2)]

    order = [(t.system, t.knobs["k"]) for t in interleave([a, b, c])]

    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]


def test_every_system_runs_its_knob_grid_on_the_same_workload(report: dict[str, Any]) -> None:
    task = report["tasks"]["S"]
    runs = task["runs"]

    assert report["systems"] == ["exegpt", "static", "continuous", "hf_generate"]
    assert sorted(r["knobs"]["batch_size"] for r in runs if r["policy"] == "static") == sorted(
        QUICK_GRID.static
    )
    assert len([r for r in runs if r["policy"] == "continuous"]) == len(QUICK_GRID.continuous)
    assert len([r for r in runs if r["policy"] == "hf_generate"]) == len(QUICK_GRID.static)
    assert any(r["policy"] == "exegpt" for r in runs)
    assert {r["num_requests"] for r in runs} == {8} and task["failed"] == []
    assert set(task["bounds_s"]) == {"p10", "p30", "p70", "none"}
    assert set(BOUND_BATCHES) <= {r["knobs"].get("batch_size") for r in runs}


def test_unavailable_peers_are_skipped_with_their_reason(report: dict[str, Any]) -> None:
    assert "--vllm-python" in report["skipped"]["vllm"]
    assert "token for token" in report["skipped"]["transformers-serve"]
    assert "vllm" not in {r["policy"] for r in report["tasks"]["S"]["runs"]}
    _, skipped = find_peers(Path(sys.executable), Path("."), 64)
    assert "cannot import vllm" in skipped["vllm"]


def test_vllm_computes_every_run_s_prompts() -> None:
    """The comparison runs the same prompts once per knob setting: vLLM's prefix cache
    would serve later runs' prompts from the earlier ones', so it is off; its batch knob
    is its max-num-seqs."""
    command = Peer("python", Path("model"), 1024).command(port=8123, batch=16)
    assert "--no-enable-prefix-caching" in command
    assert command[command.index("--max-num-seqs") + 1] == "16"


def test_ratios_are_exegpt_over_each_system_at_each_bound(report: dict[str, Any]) -> None:
    task = report["tasks"]["S"]
    best = {(r["policy"], r["bound"]): r["throughput_req_s"] for r in task["records"]}
    for bound, ratios in task["ratios"].items():
        assert set(ratios) == {"static", "continuous", "hf_generate"}
        for system, ratio in ratios.items():
            ours, theirs = best[("exegpt", bound)], best[(system, bound)]
            if ours is None or theirs is None:
                assert ratio is None
            else:
                assert ratio == pytest.approx(ours / theirs)
    assert task["ratios"]["none"]["hf_generate"] is not None  # unbounded: both always meet it


def test_hugging_face_static_batching_can_set_the_bounds(hf_bounds: dict[str, Any]) -> None:
    """With --bounds-from hf_generate the bounds are the percentiles of Hugging Face
    static batching's p99 latencies, and each system's batch sizes still run once."""
    task = hf_bounds["tasks"]["S"]
    runs = task["runs"]
    hf_p99 = [
        r["p99_latency_s"]
        for r in runs
        if r["policy"] == "hf_generate" and r["knobs"]["batch_size"] in BOUND_BATCHES
    ]

    assert task["bounds_from"] == "hf_generate"
    finite = [task["bounds_s"][label] for label in ("p10", "p30", "p70")]
    assert finite == pytest.approx(list(np.percentile(hf_p99, [10, 30, 70])))
    for system in ("static", "hf_generate"):
        sizes = sorted(r["knobs"]["batch_size"] for r in runs if r["policy"] == system)
        assert sizes == sorted(QUICK_GRID.static), system


def test_exegpt_s_best_policy_is_the_fastest_of_its_policies_within_each_bound(
    hf_bounds: dict[str, Any],
) -> None:
    task = hf_bounds["tasks"]["S"]
    runs = task["runs"]
    for label, best in task["best_ours"].items():
        limit = task["bounds_s"][label]
        meets = [r for r in runs if limit is None or r["p99_latency_s"] <= limit]
        ours = [r for r in meets if r["policy"] in ("exegpt", "static", "continuous")]
        if not ours:
            assert best is None
            continue
        assert best is not None
        assert best["throughput_req_s"] == max(r["throughput_req_s"] for r in ours)
        assert best["policy"] in {r["policy"] for r in ours}
        hf = [r["throughput_req_s"] for r in meets if r["policy"] == "hf_generate"]
        expected = best["throughput_req_s"] / max(hf) if hf else None
        assert best["vs"] == {"hf_generate": pytest.approx(expected) if hf else None}
    assert task["best_ours"]["none"] is not None
