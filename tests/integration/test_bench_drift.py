"""`exegpt bench drift` end to end on random:llama: both modes, every phase reported."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli import main


def test_drift_benchmark_reports_every_phase_of_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "drift.json"
    argv = [
        "bench", "drift", "--model", "random:llama", "--dtype", "float32", "--num-threads", "1",
        "--phases", "S,G", "--slos", "none,3x", "--phase-s", "1.5", "--rate", "4",
        "--scale", "0.05", "--max-num-seqs", "8", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    phases = json.loads(out.read_text())["phases"]
    # "3x": three times the tightest bound the served profile predicts for G's lengths,
    # the same in both modes
    bound = phases[1]["slo_s"]
    assert bound > 0
    assert [(p["mode"], p["task"], p["slo_s"]) for p in phases] == [
        ("adaptive", "S", None), ("adaptive", "G", bound),
        ("fixed", "S", None), ("fixed", "G", bound),
    ]  # fmt: skip
    for phase in phases:
        assert phase["num_sent"] == 6 and phase["num_dropped"] == 0
        assert phase["throughput_req_s"] > 0 and phase["p99_latency_s"] > 0
    # the schedule solved once at start never changes
    assert all(p["change_delay_s"] is None for p in phases if p["mode"] == "fixed")
    assert phases[2]["schedule"] == phases[3]["schedule"]
