"""The load generator's pure parts: figures from records, arrivals, the loopback rule."""

import itertools
import json
import math
from pathlib import Path

import pytest

from engine.bench_serve import (
    LoadConfig,
    RequestRecord,
    check_loopback,
    poisson_arrivals,
    read_trace,
    summarize,
)
from engine.cli import main
from engine.workloads import Query


def ok(index: int, ttft: float, e2e: float, tokens: int) -> RequestRecord:
    return RequestRecord(index, 8, tokens, "ok", ttft, e2e, tokens, 8)


def test_summary_matches_hand_computed_figures() -> None:
    records = [
        ok(0, 0.1, 1.0, 10),  # TPOT (1.0 - 0.1) / 9 = 0.1
        ok(1, 0.2, 2.0, 10),  # 0.2
        ok(2, 0.3, 3.0, 10),  # 0.3
        ok(3, 0.4, 4.0, 10),  # 0.4
        ok(4, 1.0, 10.0, 10),  # 1.0
        RequestRecord(5, 8, 10, "error", error="HTTP 400: too long"),
        RequestRecord(6, 8, 10, "cancelled", ttft_s=0.5, num_output_tokens=3),
    ]
    report = summarize(records, duration_s=10.0, slo_s=3.5)

    assert (report["num_sent"], report["num_ok"], report["num_error"]) == (7, 5, 1)
    assert report["num_cancelled"] == 1
    assert report["throughput_req_s"] == pytest.approx(0.5)
    assert report["throughput_tok_s"] == pytest.approx(5.0)  # ok requests' tokens only
    assert report["goodput_req_s"] == pytest.approx(0.3)  # 1, 2 and 3 s meet 3.5 s
    # numpy's linear percentile: p99 of [1, 2, 3, 4, 10] = 4 + 0.96 * (10 - 4)
    assert report["e2e_s"] == pytest.approx({"mean": 4.0, "p50": 3.0, "p99": 9.76})
    assert report["ttft_s"] == pytest.approx({"mean": 0.4, "p50": 0.3, "p99": 0.976})
    assert report["tpot_s"] == pytest.approx({"mean": 0.4, "p50": 0.3, "p99": 0.976})
    assert report["errors"] == {"HTTP 400: too long": 1}


def test_summary_without_bound_or_requests() -> None:
    report = summarize([], duration_s=0.0, slo_s=None)

    assert report["num_sent"] == 0 and report["throughput_req_s"] == 0.0
    assert report["goodput_req_s"] is None and report["e2e_s"] is None


def test_mismatched_lengths_are_reported() -> None:
    short = RequestRecord(0, 8, 10, "ok", 0.1, 1.0, num_output_tokens=4, num_prompt_tokens=9)

    report = summarize([short], duration_s=1.0, slo_s=None)

    assert report["num_short_outputs"] == 1 and report["num_prompt_len_mismatches"] == 1


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8000", "http://example.com", "http://0.0.0.0:8000", "ftp://[::1]"]
)
def test_non_loopback_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"loopback|http://HOST:PORT"):
        LoadConfig(url, "m")


def test_loopback_urls_are_accepted() -> None:
    for url in (
        "http://127.0.0.1:8000",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.9.9.9",
    ):
        check_loopback(url)


def test_cli_refuses_a_remote_url_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--url", "http://192.168.0.7:8000"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    queries = [Query(4, 4)] * 4000
    a = poisson_arrivals(queries, rate=50.0, seed=1)

    assert a == poisson_arrivals(queries, rate=50.0, seed=1)
    assert a[0].at_s == 0.0 and all(x.at_s <= y.at_s for x, y in itertools.pairwise(a))
    assert a[-1].at_s / (len(a) - 1) == pytest.approx(1 / 50.0, rel=0.05)
    assert {x.at_s for x in poisson_arrivals(queries[:3], math.inf)} == {0.0}


def test_trace_is_read_in_time_order(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [{"arrival_s": 0.5, "prompt_len": 3, "output_len": 2}]
    rows.append({"arrival_s": 0.1, "prompt_len": 5, "output_len": 1})
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    arrivals = read_trace(trace)

    assert [(a.at_s, a.query) for a in arrivals] == [(0.1, Query(5, 1)), (0.5, Query(3, 2))]
    trace.write_text('{"prompt_len": 3, "output_len": 2}\n')
    with pytest.raises(ValueError, match="arrival_s"):
        read_trace(trace)
