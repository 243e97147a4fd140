from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adaptive.distributions import TASKS, LengthDistribution, observe
from adaptive.errors import PlanningError

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("task", list(TASKS))
def test_task_pmf_matches_table3(task: str) -> None:
    dist = LengthDistribution.from_task(task)
    spec = TASKS[task]
    assert dist.max_output == spec.output_max and dist.max_input == spec.input_max
    assert dist.target_output_len == spec.output_p99
    # Truncation at 1 raises the mean above the table's mu; never by more than the std.
    assert spec.output_mean <= dist.mean_output < spec.output_mean + spec.output_std


def test_scaled_task_shrinks_every_length() -> None:
    full, quarter = (
        LengthDistribution.from_task("C1"),
        LengthDistribution.from_task("C1", scale=0.25),
    )
    assert quarter.max_input == 128 and quarter.max_output == 40
    assert quarter.target_output_len == round(TASKS["C1"].output_p99 / 4)
    assert quarter.mean_output == pytest.approx(full.mean_output / 4, rel=0.05)
    with pytest.raises(PlanningError, match="scale"):
        LengthDistribution.from_task("C1", scale=1.5)


def test_sampled_task_is_seeded() -> None:
    a = LengthDistribution.from_task("C1", num_samples=500, seed=3)
    b = LengthDistribution.from_task("C1", num_samples=500, seed=3)
    c = LengthDistribution.from_task("C1", num_samples=500, seed=4)
    assert np.array_equal(a.output_pmf, b.output_pmf)
    assert not np.array_equal(a.output_pmf, c.output_pmf)


def test_from_jsonl_reads_anchor_workload() -> None:
    dist = LengthDistribution.from_jsonl(DATA / "anchor-S.jsonl")
    assert dist.weight == 96
    assert 20 < dist.mean_output < 45 and dist.max_input <= 512


def test_observe_decays_old_samples() -> None:
    first = LengthDistribution.from_samples([10] * 10, [5] * 10)
    later = observe(first, [10] * 10, [50] * 10, decay=0.1)
    assert later.weight == pytest.approx(11.0)
    assert later.output_pmf[50] == pytest.approx(10 / 11)


@pytest.mark.parametrize(
    "build",
    [
        lambda: LengthDistribution.from_task("Q"),
        lambda: LengthDistribution.from_samples([], []),
        lambda: LengthDistribution(np.zeros(5), np.ones(5)),
        lambda: LengthDistribution.from_samples([1, 2], [3]),
        lambda: observe(LengthDistribution.from_task("S"), [1], [1], decay=0.5),
    ],
)
def test_bad_inputs_raise_one_error(build: object) -> None:
    with pytest.raises(PlanningError):
        build()  # type: ignore[operator]


def test_malformed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_len": 3}\n')
    with pytest.raises(PlanningError, match=r"bad\.jsonl:1"):
        LengthDistribution.from_jsonl(path)
