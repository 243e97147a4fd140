"""`exegpt plan` through the two public functions the engine's CLI wires in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from adaptive.cli import add_plan_arguments, run_plan


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


BASE = ["--profile", "opt-13b", "--devices", "4", "--cluster", "a40", "--task", "S"]


def test_json_plan_with_verification(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([*BASE, "--slo", "5.9", "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is True
    assert out["latency_s"] <= 5.9
    assert out["schedule"]["policy"] in ("rra", "waa_c", "waa_m")
    assert out["schedule"]["num_workers"] == 4
    assert out["baseline"]["schedule"]["policy"] == "static"
    assert out["gain"] == pytest.approx(
        out["throughput_req_s"] / out["baseline"]["throughput_req_s"]
    )
    assert {"throughput_tok_s", "solve_ms"} <= out.keys()


def test_lengths_file_and_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    lengths = Path(__file__).parent / "data" / "anchor-C1.jsonl"
    argv = ["--profile", "t5-11b", "--devices", "8", "--lengths", str(lengths)]
    assert _run(argv) == 0
    assert "schedule:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*BASE[:6], "--task", "Z"], "unknown task"),
        ([*BASE, "--slo", "0.001"], "lowest latency"),
        ([*BASE, "--slo", "-2"], "positive"),
        (["--profile", "nope", "--task", "S"], "no profile"),
        (["--task", "S"], "--profile is required"),
        ([*BASE[:2], "--devices", "0"], "--devices"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_profile_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"layer": {"hidden": 1}}')
    assert _run(["--profile", str(bad), "--task", "S"]) == 2
    assert "malformed profile" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path: Path) -> None:
    target = tmp_path / "tradeoff.png"
    assert _run([*BASE, "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_paper_writes_json(tmp_path: Path) -> None:
    target = tmp_path / "paper.json"
    assert _run(["--reproduce-paper", "--json", str(target)]) == 0
    payload = json.loads(target.read_text())
    assert len(payload["rows"]) == 96
    assert all(row["gain"] >= 1.0 for row in payload["rows"])
    assert payload["summary"]["overall"] > 1.0
    # The paper's FT: tensor parallelism over a whole node (OPT-13B has only 4 devices).
    ft_degrees = {row["ft_schedule"].split("TP=")[1].split("x")[0] for row in payload["rows"]}
    assert ft_degrees == {"4", "8"}
    assert all("TP=8x" in row["ft_schedule"] for row in payload["rows"] if row["devices"] >= 8)
