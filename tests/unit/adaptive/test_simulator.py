"""The analytic simulator against the discrete-event one, and its feasibility verdicts."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adaptive import kernels as K
from adaptive.cluster import preset_cluster
from adaptive.distributions import LengthDistribution
from adaptive.errors import PlanningError
from adaptive.profile import Profile, load_profile
from adaptive.schedule import Policy, Schedule
from adaptive.simulator import build_scenario, simulate, simulate_discrete

DES_TOLERANCE = 0.03  # analytic vs discrete-event throughput and decode batch
UNCAPPED = 1 << 20  # a max_batch no RRA batch here reaches


@pytest.mark.parametrize("task", ["S", "T", "C1"])
@pytest.mark.parametrize(("b_e", "n_d", "tp", "tp_workers"), [(16, 8, 1, 0), (48, 13, 2, 4)])
def test_rra_little_matches_discrete_event(
    opt13b: Profile, task: str, b_e: int, n_d: int, tp: int, tp_workers: int
) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task(task)
    schedule = Schedule(
        Policy.RRA,
        b_e,
        decode_iters=n_d,
        max_batch=UNCAPPED,
        tp_degree=tp,
        tp_workers=tp_workers,
        num_workers=4,
    )
    analytic = simulate(opt13b, cluster, dist, schedule)
    des = simulate_discrete(opt13b, cluster, dist, schedule, num_queries=20000, seed=1)
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)
    assert analytic.decode_batch == pytest.approx(des.mean_decode_batch, rel=DES_TOLERANCE)


@pytest.mark.parametrize(("task", "b_e", "n_d", "cap"), [("S", 16, 2, 32), ("C1", 8, 4, 48)])
def test_rra_capped_batch_matches_discrete_event(
    opt13b: Profile, task: str, b_e: int, n_d: int, cap: int
) -> None:
    """Past the engine's max_batch a cycle admits only what left: B_E no longer sets the
    rate, the cap does."""
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task(task)
    capped = Schedule(Policy.RRA, b_e, decode_iters=n_d, max_batch=cap, num_workers=4)
    free = simulate(opt13b, cluster, dist, replace(capped, max_batch=UNCAPPED))
    analytic = simulate(opt13b, cluster, dist, capped)
    des = simulate_discrete(opt13b, cluster, dist, capped, num_queries=20000, seed=1)
    assert free.decode_batch > cap  # the cap binds
    assert analytic.decode_batch == cap
    assert analytic.throughput_req_s < free.throughput_req_s
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)


def test_paper_relation_understates_decode_batch(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("T")
    schedule = Schedule(Policy.RRA, 52, decode_iters=13, max_batch=UNCAPPED, num_workers=4)
    paper = simulate(opt13b, cluster, dist, schedule, batch_relation="paper")
    des = simulate_discrete(opt13b, cluster, dist, schedule, seed=2)
    # The notes: 383 vs 553 for task T, N_D = 13, B_E = 52.
    assert paper.decode_batch == pytest.approx(383, rel=0.02)
    assert des.mean_decode_batch == pytest.approx(553, rel=0.02)


@pytest.mark.parametrize("batch", [4, 64, 256])
def test_continuous_matches_discrete_event(opt13b: Profile, batch: int) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("C1")
    schedule = Schedule(
        Policy.CONTINUOUS, 1, max_batch=batch, tp_degree=4, tp_workers=4, num_workers=4
    )
    analytic = simulate(opt13b, cluster, dist, schedule)
    des = simulate_discrete(opt13b, cluster, dist, schedule, seed=3)
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)


def test_memory_and_bound_feasibility(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("S")
    small = Schedule(Policy.STATIC, 8, tp_degree=4, tp_workers=4, num_workers=4)
    huge = Schedule(Policy.STATIC, 1024, tp_degree=4, tp_workers=4, num_workers=4)
    ok = simulate(opt13b, cluster, dist, small, slo_s=100.0)
    assert ok.is_feasible
    assert not simulate(opt13b, cluster, dist, huge).fits_memory
    assert not simulate(opt13b, cluster, dist, small, slo_s=ok.latency_s / 2).meets_bound
    # FT decodes to the longest output, so its latency is for 80 tokens, not 63.
    rra = simulate(opt13b, cluster, dist, Schedule(Policy.RRA, 8, decode_iters=80, num_workers=4))
    assert (
        rra.latency_s
        < simulate(opt13b, cluster, dist, Schedule(Policy.STATIC, 8, num_workers=4)).latency_s
    )


def test_waa_duplicates_decoder_only_weights(opt13b: Profile) -> None:
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("S")
    waa = Schedule(Policy.WAA_C, 1, num_workers=4, encode_workers=1)
    rra = Schedule(Policy.RRA, 1, num_workers=4)
    waa_mem = simulate(opt13b, cluster, dist, waa).memory_bytes_per_device
    rra_mem = simulate(opt13b, cluster, dist, rra).memory_bytes_per_device
    assert waa_mem > 2 * rra_mem


def test_schedule_must_match_cluster(opt13b: Profile) -> None:
    with pytest.raises(PlanningError):
        simulate(
            opt13b,
            preset_cluster("a40", 4),
            LengthDistribution.from_task("S"),
            Schedule(Policy.RRA, 4, num_workers=8),
        )


def test_waa_capped_decode_rows_admit_only_what_leaves(opt13b: Profile) -> None:
    """Like RRA's: past the engine's max_batch the decode side holds the cap, each period
    encodes fewer queries, and a token comes back sooner than with the uncapped batch."""
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_task("C1")
    capped = Schedule(Policy.WAA_C, 16, num_workers=4, encode_workers=1, max_batch=32)
    free = simulate(opt13b, cluster, dist, replace(capped, max_batch=UNCAPPED))
    analytic = simulate(opt13b, cluster, dist, capped)
    assert free.decode_batch > 32  # the cap binds
    assert analytic.decode_batch == pytest.approx(32)
    assert analytic.throughput_req_s < free.throughput_req_s
    assert analytic.latency_s < free.latency_s


def test_the_model_counts_the_decoding_iterations_the_engine_runs(load_cached) -> None:  # type: ignore[no-untyped-def]
    """The engine samples a query's first token from its encoding pass, so S output tokens
    take S - 1 decoding iterations; the planner must count the same work."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    outputs = [1, 3, 6]
    engine = LLMEngine(
        EngineConfig(dtype="float32", max_num_seqs=4, max_model_len=64, num_threads=1),
        load_cached("random:llama"),
    )
    for i, n in enumerate(outputs):
        engine.add_request(str(i), [5, 6, 7, 8], SamplingParams(max_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.counters.decode_rows == sum(n - 1 for n in outputs)

    dist = LengthDistribution.from_samples([4] * 3, outputs)
    cluster = preset_cluster("a40", 1)
    profile = load_profile("opt-13b")
    exegpt = build_scenario(profile, cluster, dist)
    paper = build_scenario(profile, cluster, dist, model="paper")
    assert exegpt.vector[K.S_DEC_MEAN] * len(outputs) == pytest.approx(sum(outputs) - 3)
    assert paper.vector[K.S_DEC_MEAN] * len(outputs) == pytest.approx(sum(outputs))
    assert exegpt.vector[K.S_DEC_TARGET] == paper.vector[K.S_DEC_TARGET] - 1


def test_queries_whose_first_token_ends_them_cost_only_their_encoding(opt13b: Profile) -> None:
    """One-token answers (a classifier's label, max_tokens=1) leave with their encoding: no
    decoding iteration, no running row, and a latency of one encoding pass."""
    cluster = preset_cluster("a40", 4)
    dist = LengthDistribution.from_samples([250, 250, 250], [1, 1, 1])
    rra = Schedule(Policy.RRA, 8, decode_iters=4, max_batch=64, num_workers=4)
    analytic = simulate(opt13b, cluster, dist, rra)
    sc = build_scenario(opt13b, cluster, dist)
    layout = K.split_devices(0, 0, 1, 4, 0)
    encode = K.pass_time(opt13b.tables, sc.axes, sc.vector, K.ENCODE, layout, 8, 250.0)
    assert analytic.decode_batch == 0
    assert analytic.latency_s == pytest.approx(encode)
    assert analytic.throughput_req_s == pytest.approx(8 / encode)
    des = simulate_discrete(opt13b, cluster, dist, rra, num_queries=4000, seed=4)
    assert des.throughput_req_s == pytest.approx(analytic.throughput_req_s, rel=DES_TOLERANCE)
    assert des.mean_decode_batch == 0
    continuous = Schedule(Policy.CONTINUOUS, 1, max_batch=16, num_workers=4)
    served = simulate(opt13b, cluster, dist, continuous)
    assert math.isfinite(served.throughput_req_s) and served.throughput_req_s > 0
    des = simulate_discrete(opt13b, cluster, dist, continuous, num_queries=4000, seed=5)
    assert des.mean_decode_batch == 0


@pytest.mark.parametrize(("b_e", "n_d"), [(4, 16), (2, 32), (1, 64)])
def test_rra_latency_counts_the_prompts_spread_where_encoding_dominates(
    opt13b: Profile, b_e: int, n_d: int
) -> None:
    """On a device where encoding costs as much as on a CPU (OPT-13B's encode times x20),
    a query's p99 latency depends on how long the prompts of the phases it meets are: the
    paper's account (every phase at the mean prompt) falls short of the discrete-event
    p99 by 7-13% with small B_E; the percentile over queries stays within 10% and closer."""
    tables = opt13b.tables.copy()
    tables[K.ENCODE] += math.log(20.0)
    heavy = replace(opt13b, tables=tables)
    cluster = preset_cluster("a40", 4)
    base = LengthDistribution.from_task("S")
    ins, outs = base.sample(50000, np.random.default_rng(0))
    dist = LengthDistribution.from_samples(ins, outs)
    schedule = Schedule(Policy.RRA, b_e, decode_iters=n_d, max_batch=UNCAPPED, num_workers=4)
    errors = {}
    for model in ("engine", "paper"):
        analytic = simulate(heavy, cluster, dist, schedule, model=model)
        des = simulate_discrete(heavy, cluster, dist, schedule, seed=1, model=model)
        errors[model] = analytic.latency_s / des.p99_latency_s - 1
    assert abs(errors["engine"]) < 0.10
    assert abs(errors["engine"]) < abs(errors["paper"])


def test_encoding_is_priced_at_the_tokens_the_engine_pads_it_to(opt13b: Profile) -> None:
    """The engine rounds an encoding step's token count up to a multiple of its profile's
    `pad_tokens_to` (about (q - 1) / 2 tokens more per step, spread over its prompts); a
    profile measured at multiples of it sees none, so the model adds them. The paper's
    account and profiles without the field are unchanged."""
    padded = replace(opt13b, pad_tokens_to=32)
    cluster = preset_cluster("a40", 1)
    dist = LengthDistribution.from_task("S")
    layout = K.split_devices(0, 0, 1, 1, 0)
    for batch in (1, 4):
        sc = build_scenario(padded, cluster, dist)
        priced = K.pass_time(padded.tables, sc.axes, sc.vector, K.ENCODE, layout, batch, 20.0)
        layer = padded.layer_time_s("encode", 1, batch, 20.0 + 15.5 / batch)
        assert priced == pytest.approx(padded.encode_layers * layer)
    rra = Schedule(Policy.RRA, 2, decode_iters=8, max_batch=UNCAPPED)
    plain = simulate(opt13b, cluster, dist, rra)
    assert simulate(padded, cluster, dist, rra).throughput_req_s < plain.throughput_req_s
    for profile in (padded, opt13b):
        paper = simulate(profile, cluster, dist, rra, model="paper")
        assert paper == simulate(opt13b, cluster, dist, rra, model="paper")


def test_the_kernels_compiled_code_is_cached_per_version_of_every_kernel_module(
    tmp_path: Path,
) -> None:
    """Numba keys a function's cache on its own file: an RRA kernel calling an edited cost
    function would run its old machine code. The cache folder is named by all the sources."""
    kernels = Path(K.cost.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(kernels, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert K.cost.numba_cache_dir(copy) == K.cost.numba_cache_dir(kernels)
    cost = copy / "cost.py"
    cost.write_text(cost.read_text().replace("mean_padding / max(batch, 1.0)", "mean_padding"))
    assert K.cost.numba_cache_dir(copy) != K.cost.numba_cache_dir(kernels)


@pytest.mark.parametrize("b_e", [2, 6, 12])
def test_an_rra_cycle_decodes_only_while_some_row_needs_it(opt13b: Profile, b_e: int) -> None:
    """With N_D past most queries' lengths, a cycle ends when its last row leaves, which
    with few rows comes well before the longest length the histogram holds: the model
    runs iteration u with the probability that some row still needs it (the discrete-event
    run stops decoding when none does)."""
    cluster = preset_cluster("a40", 1)
    ins, outs = LengthDistribution.from_task("C1").sample(50000, np.random.default_rng(0))
    dist = LengthDistribution.from_samples(np.maximum(ins // 4, 1), np.maximum(outs // 4, 1))
    schedule = Schedule(Policy.RRA, b_e, decode_iters=32, max_batch=UNCAPPED)
    analytic = simulate(opt13b, cluster, dist, schedule)
    des = simulate_discrete(opt13b, cluster, dist, schedule, seed=2)
    assert analytic.throughput_req_s == pytest.approx(des.throughput_req_s, rel=DES_TOLERANCE)
