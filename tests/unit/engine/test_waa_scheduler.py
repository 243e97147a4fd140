"""WAA on the driver without workers: the scheduler checked against hand-made runner
results (hand-outs to the encode workers, arrivals, placements), and the clear refusals of
schedules that cannot run where they are asked to."""

from __future__ import annotations

import pytest

from adaptive.schedule import Policy, Schedule
from engine.cli import main
from engine.llm_engine import EngineConfig
from engine.request import Request, RequestStatus
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, StepPlan, StepResult
from engine.waa import WaaScheduler

EOS = 2


def waa(encode_batch: int = 2, max_batch: int = 4) -> Schedule:
    return Schedule(
        Policy.WAA_C, encode_batch, max_batch=max_batch, num_workers=2, encode_workers=1
    )


def make(slots: int = 4, **knobs: int) -> WaaScheduler:
    return WaaScheduler(waa(**knobs), slots, frozenset({EOS}))


def add(s: Scheduler, rid: str, max_tokens: int = 100) -> Request:
    r = Request(rid, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    s.add(r)
    return r


def ids(requests: tuple[Request, ...] | list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def plan_of(s: Scheduler) -> StepPlan:
    plan = s.schedule()
    assert plan is not None
    return plan


def test_batches_go_out_while_the_rows_decode_and_join_at_the_next_step() -> None:
    s = make()
    for i in range(5):
        add(s, f"q{i}")
    plan = plan_of(s)
    assert ids(plan.dispatched) == ["q0", "q1"] and plan.requests == ()
    assert [ids(batch) for batch in plan.awaiting] == [["q0", "q1"]]
    s.update(plan, StepResult([], [[7, 7]]))  # with no row, the runner waited for it
    assert s.slots.owners() == ["q0", "q1"]
    plan = plan_of(s)
    assert plan.installs == ((0, 1),)  # their KV goes in before they decode
    assert ids(plan.requests) == ["q0", "q1"]
    assert ids(plan.dispatched) == ["q2", "q3"]  # handed out while they decode
    s.update(plan, StepResult([8, 8]))  # nothing arrived during the iteration
    plan = plan_of(s)
    # q4 waits: 2 rows and 2 queries on the encode workers fill max_batch 4
    assert plan.dispatched == () and plan.installs == ()
    s.update(plan, StepResult([9, 9], [[5, 5]]))
    assert s.slots.owners() == ["q0", "q1", "q2", "q3"]
    assert [r.output_ids for r in s.running()] == [[7, 8, 9], [7, 8, 9], [5], [5]]
    s.slots.check_integrity()


def test_at_most_two_batches_are_on_the_encode_workers() -> None:
    s = make(slots=8, encode_batch=1, max_batch=8)
    for i in range(4):
        add(s, f"q{i}")
    for expected in (["q0"], ["q1"], []):
        plan = plan_of(s)
        assert ids(plan.dispatched) == expected
        s.update(plan, StepResult([]))
    assert s.num_encoding == 2


def test_queries_that_end_before_their_placement_get_no_row() -> None:
    s = make(encode_batch=3)
    one = add(s, "one", max_tokens=1)
    gone = add(s, "gone")
    kept = add(s, "kept")
    plan = plan_of(s)
    s.abort("gone")  # while it is encoded
    assert s.num_encoding == 3  # its row stays promised until the batch is back
    changed = s.update(plan, StepResult([], [[4, 4, 4]]))
    assert ids(changed) == ["one", "kept"]
    assert one.status is RequestStatus.FINISHED_LENGTH
    assert one.slot is None and gone.slot is None and kept.slot == 0
    plan = plan_of(s)
    assert plan.installs == ((-1, -1, 0),) and s.num_encoding == 0


def test_an_arrived_query_not_placed_yet_moves_without_a_copy() -> None:
    s = make()
    add(s, "x")
    add(s, "y")
    s.update(plan_of(s), StepResult([], [[1, 1]]))
    add(s, "z")
    plan = plan_of(s)
    s.update(plan, StepResult([2, 2], [[3]]))  # z arrives: row 2
    s.abort("x")  # x's row is refilled by z, whose KV is not in the cache yet
    plan = plan_of(s)
    assert plan.moves == ()
    assert plan.installs == ((0,),)
    assert ids(plan.requests) == ["z", "y"]


def test_lost_workers_fail_the_rows_and_the_batches_out_but_not_the_queue() -> None:
    s = make()
    for i in range(3):
        add(s, f"q{i}")
    s.update(plan_of(s), StepResult([], [[1, 1]]))
    assert ids(plan_of(s).dispatched) == ["q2"]
    add(s, "q3")
    failed = s.fail_started()
    assert sorted(ids(failed)) == ["q0", "q1", "q2"]
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in failed)
    assert s.slots.num_used == 0 and s.num_encoding == 0 and ids(s.waiting) == ["q3"]
    plan = plan_of(s)
    assert [ids(batch) for batch in plan.awaiting] == [["q3"]]


def test_a_new_waa_schedule_applies_at_the_next_step() -> None:
    s = make()
    for i in range(4):
        add(s, f"q{i}")
    s.set_schedule(waa(encode_batch=3))
    assert ids(plan_of(s).dispatched) == ["q0", "q1", "q2"]


def test_schedules_for_the_other_kind_of_workers_are_refused() -> None:
    with pytest.raises(ValueError, match="encodes on separate workers"):
        Scheduler(waa(), 4, frozenset({EOS}))
    with pytest.raises(ValueError, match="runs waa_c or waa_m schedules, not rra"):
        make().set_schedule(Schedule(Policy.RRA, encode_batch=2))
    with pytest.raises(ValueError, match="spans 2, the engine has 1"):
        EngineConfig(model="random:llama", schedule=waa())


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--model", "random:llama", "--policy", "waa_c"],
        ["bench", "offline", "--model", "random:llama", "--policies", "waa_m"],
    ],
    ids=["serve", "bench"],
)
def test_waa_on_one_worker_is_a_one_line_error(
    argv: list[str],
    capsys: pytest.CaptureFixture,  # type: ignore[type-arg]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "separate workers" in err and "--workers 2" in err and "\n" not in err
