"""The scheduler on its own: plans checked against hand-made runner outputs, no model."""

from adaptive.schedule import Policy, Schedule
from engine.request import Request, RequestStatus
from engine.sampling import SamplingParams
from engine.scheduler import Phase, RequestTable, Scheduler, StepResult

EOS = 2


def make(schedule: Schedule, slots: int = 8, carry_decode: bool = False) -> Scheduler:
    # strict alternation unless a test asks for carried decoding iterations
    return Scheduler(schedule, slots, frozenset({EOS}), carry_decode=carry_decode)


def add(s: Scheduler, rid: str, max_tokens: int, ignore_eos: bool = False) -> Request:
    r = Request(rid, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
    s.add(r)
    return r


def run_step(s: Scheduler, token: int = 9) -> tuple[Phase, list[str]]:
    plan = s.schedule()
    assert plan is not None
    s.update(plan, StepResult([token] * len(plan.computed)))
    s.slots.check_integrity()
    return plan.phase, [r.request_id for r in plan.requests]


def test_rra_encodes_b_e_then_decodes_n_d_times():
    s = make(Schedule(Policy.RRA, encode_batch=2, decode_iters=3, max_batch=8))
    for i in range(5):
        add(s, f"q{i}", max_tokens=100)
    phases = [run_step(s) for _ in range(9)]
    assert phases[0] == (Phase.ENCODE, ["q0", "q1"])
    assert [p for p, _ in phases[1:4]] == [Phase.DECODE] * 3
    assert phases[4] == (Phase.ENCODE, ["q2", "q3"])
    assert phases[5][1] == ["q0", "q1", "q2", "q3"]  # newly encoded queries joined the batch
    assert phases[8] == (Phase.ENCODE, ["q4"])


def test_carried_encoding_phase_decodes_the_running_batch_and_counts_as_an_iteration():
    s = make(Schedule(Policy.RRA, encode_batch=2, decode_iters=3, max_batch=8), carry_decode=True)
    first = [add(s, f"q{i}", max_tokens=100) for i in range(2)]
    add(s, "q2", max_tokens=100)
    plan = s.schedule()
    assert plan is not None and plan.carried == ()  # nothing runs yet: a plain encoding phase
    s.update(plan, StepResult([9, 9]))
    phases = [run_step(s) for _ in range(3)]
    assert [p for p, _ in phases] == [Phase.DECODE] * 3
    plan = s.schedule()  # N_D = 3 iterations done: encode q2, carrying q0 and q1 along
    assert plan is not None and plan.phase is Phase.ENCODE
    assert [r.request_id for r in plan.requests] == ["q2"]
    assert plan.carried == tuple(first)
    s.update(plan, StepResult([7, 8, 8]))
    assert [r.output_ids[-1] for r in first] == [8, 8] and len(first[0].output_ids) == 5
    # the carried pass was the first of the next N_D iterations: two more, then encode again
    add(s, "q3", max_tokens=100)
    assert [run_step(s)[0] for _ in range(3)] == [Phase.DECODE, Phase.DECODE, Phase.ENCODE]


def test_finished_query_leaves_at_once_and_its_row_is_reused():
    s = make(Schedule(Policy.RRA, encode_batch=3, decode_iters=1, max_batch=3), slots=3)
    short = add(s, "short", max_tokens=2)
    add(s, "a", max_tokens=50)
    add(s, "b", max_tokens=50)
    waiting = add(s, "next", max_tokens=50)
    assert run_step(s)[0] is Phase.ENCODE
    assert run_step(s) == (Phase.DECODE, ["short", "a", "b"])
    assert short.status is RequestStatus.FINISHED_LENGTH
    assert short.slot is None
    plan = s.schedule()  # row of "short" was refilled by "b" (compaction) and "next" admitted
    assert plan is not None and plan.phase is Phase.ENCODE
    assert [(m.src, m.dst, m.request.request_id) for m in plan.moves] == [(2, 0, "b")]
    assert plan.requests == (waiting,) and waiting.slot == 2


def test_static_batch_runs_to_its_longest_member():
    s = make(Schedule(Policy.STATIC, encode_batch=2))
    early = add(s, "early", max_tokens=1)
    add(s, "late", max_tokens=3)
    add(s, "after", max_tokens=1)
    assert run_step(s) == (Phase.ENCODE, ["early", "late"])
    assert early.status.is_finished
    # the finished row is still computed (no early termination) and nobody joins
    assert run_step(s) == (Phase.DECODE, ["early", "late"])
    assert run_step(s) == (Phase.DECODE, ["early", "late"])
    assert s.slots.num_used == 0
    assert run_step(s) == (Phase.ENCODE, ["after"])


def test_continuous_admits_whenever_a_row_is_free():
    s = make(Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=2))
    add(s, "a", max_tokens=2)
    add(s, "b", max_tokens=5)
    add(s, "c", max_tokens=5)
    assert run_step(s) == (Phase.ENCODE, ["a", "b"])
    assert run_step(s) == (Phase.DECODE, ["a", "b"])  # "a" finishes here
    assert run_step(s) == (Phase.ENCODE, ["c"])


def test_eos_stops_unless_ignored():
    s = make(Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=4))
    stops = add(s, "stops", max_tokens=10)
    forced = add(s, "forced", max_tokens=10, ignore_eos=True)
    run_step(s, token=EOS)
    assert stops.status is RequestStatus.FINISHED_STOPPED
    assert forced.status is RequestStatus.DECODING


def test_abort_frees_the_row_and_waiting_requests_never_run():
    s = make(Schedule(Policy.RRA, encode_batch=1, decode_iters=4, max_batch=4))
    running = add(s, "running", max_tokens=10)
    queued = add(s, "queued", max_tokens=10)
    run_step(s)
    assert s.abort("running") is running and s.abort("queued") is queued
    assert s.abort("running") is None  # already finished
    assert s.slots.num_used == 0 and not s.waiting and s.num_unfinished == 0
    assert s.schedule() is None


def test_new_rra_schedule_takes_over_at_the_next_step_counting_iterations_already_run():
    s = make(Schedule(Policy.RRA, encode_batch=1, decode_iters=8, max_batch=8))
    for i in range(6):
        add(s, f"q{i}", max_tokens=100)
    run_step(s)
    run_step(s)
    run_step(s)  # 2 of the old N_D=8 iterations have run
    s.set_schedule(Schedule(Policy.RRA, encode_batch=2, decode_iters=3, max_batch=8))
    assert run_step(s)[0] is Phase.DECODE  # the third, now the new N_D=3's last
    assert s.schedule_value.encode_batch == 2
    assert run_step(s) == (Phase.ENCODE, ["q1", "q2"])


def test_new_schedule_waits_for_a_static_batch_to_end():
    s = make(Schedule(Policy.STATIC, encode_batch=2))
    for i in range(3):
        add(s, f"q{i}", max_tokens=3)
    run_step(s)
    s.set_schedule(Schedule(Policy.RRA, encode_batch=1, decode_iters=1, max_batch=8))
    assert run_step(s) == (Phase.DECODE, ["q0", "q1"])  # the static batch runs to its end
    assert run_step(s) == (Phase.DECODE, ["q0", "q1"])
    assert s.schedule_value.policy is Policy.STATIC
    assert run_step(s) == (Phase.ENCODE, ["q2"])
    assert s.schedule_value.policy is Policy.RRA


def test_static_batch_whose_last_member_is_aborted_releases_every_held_row():
    s = make(Schedule(Policy.STATIC, encode_batch=2), slots=2)
    add(s, "early", max_tokens=1)
    add(s, "late", max_tokens=50)
    run_step(s)  # "early" finishes at its encoding step; its row is held for the batch
    assert s.slots.num_used == 2
    s.abort("late")
    assert s.slots.num_used == 0 and not s.requests  # nothing leaks
    add(s, "next", max_tokens=3)
    assert run_step(s) == (Phase.ENCODE, ["next"])


def test_lanes_share_the_queue_and_split_the_schedule_s_batches():
    """A pipelined engine's schedulers (engine/pipelined.py): each encodes half of B_E,
    rounded up, into rows of its own, from the one queue; a failure of the workers
    finishes only each lane's own rows."""
    schedule = Schedule(Policy.RRA, encode_batch=3, decode_iters=2, max_batch=8)
    table = RequestTable()
    lanes = [
        Scheduler(schedule, 4, frozenset({EOS}), carry_decode=False, lanes=2, table=table)
        for _ in range(2)
    ]
    for i in range(5):
        add(lanes[0], f"q{i}", max_tokens=100)
    assert run_step(lanes[0]) == (Phase.ENCODE, ["q0", "q1"])
    assert run_step(lanes[1]) == (Phase.ENCODE, ["q2", "q3"])
    assert run_step(lanes[0]) == (Phase.DECODE, ["q0", "q1"])
    assert [r.request_id for r in table.waiting] == ["q4"]
    failed = lanes[1].fail_started()
    assert [r.request_id for r in failed] == ["q2", "q3"]
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in failed)
    assert lanes[1].slots.num_used == 0 and lanes[0].slots.num_used == 2
    assert sorted(table.requests) == ["q0", "q1", "q4"]
