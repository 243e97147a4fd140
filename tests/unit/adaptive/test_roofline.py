"""Carrying H100 profiles to the paper's cards and degrees, and the FT baseline's batch."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.cluster import DEVICES, preset_cluster
from adaptive.distributions import LengthDistribution
from adaptive.profile import Profile, load_profile
from adaptive.roofline import on_device, with_degree
from adaptive.schedule import Policy, Schedule
from adaptive.simulator import simulate


@pytest.fixture(scope="module")
def graphs13b() -> Profile:
    return load_profile("h100-cudagraphs/opt-13b")


def test_on_device_scales_by_the_bound_resource(graphs13b: Profile) -> None:
    h100, a100 = DEVICES["h100"], DEVICES["a100"]
    moved = on_device(graphs13b, h100, a100)
    bandwidth = h100.memory_bandwidth / a100.memory_bandwidth
    compute = h100.peak_flops / a100.peak_flops
    # A small decode step reads weights: it slows by the bandwidth ratio.
    small = moved.layer_time_s("decode", 4, 1, 256) / graphs13b.layer_time_s("decode", 4, 1, 256)
    assert small == pytest.approx(bandwidth, rel=0.02)
    # A long prefill is matrix products: it slows by the compute ratio.
    big = moved.layer_time_s("encode", 4, 64, 1024) / graphs13b.layer_time_s("encode", 4, 64, 1024)
    assert big == pytest.approx(compute, rel=0.02)


@pytest.mark.parametrize("model", ["gpt3-101b", "gpt3-175b"])
@pytest.mark.parametrize("card", ["a100", "a40"])
def test_on_device_keeps_the_cost_invariants(model: str, card: str) -> None:
    """Rescaled tables stay monotone and subadditive in batch: the A100 turns
    compute-bound before the H100, which uncorrected made one doubling cost 2.6x."""
    moved = on_device(load_profile(f"h100-cudagraphs/{model}"), DEVICES["h100"], DEVICES[card])
    steps = np.diff(moved.tables, axis=2)  # [kind, tp, batch - 1, length] ln-time steps
    assert (steps >= 0).all() and (steps <= np.log(2.0) + 1e-12).all()
    assert (np.diff(moved.tables, axis=3) >= 0).all()


def test_with_degree_halves_the_shard_time(graphs13b: Profile) -> None:
    assert 8 not in graphs13b.tps
    wider = with_degree(graphs13b, 8)
    assert wider.tps == (*graphs13b.tps, 8)
    for kind in ("encode", "decode"):
        t4 = graphs13b.layer_time_s(kind, 4, 16, 512)
        assert wider.layer_time_s(kind, 8, 16, 512) == pytest.approx(t4 / 2)
        assert wider.layer_time_s(kind, 4, 16, 512) == pytest.approx(t4)
    assert with_degree(wider, 8) is wider


@pytest.mark.parametrize("batch", [4, 64, 256])
def test_static_batches_decode_to_their_longest_member(opt13b: Profile, batch: int) -> None:
    """FT's latency is a max-length batch (the paper's), its throughput the expected
    longest member of `batch` draws: more than batch / latency, less as batches grow."""
    dist = LengthDistribution.from_task("S")
    schedule = Schedule(Policy.STATIC, batch, tp_degree=4, tp_workers=4, num_workers=4)
    p = simulate(opt13b, preset_cluster("a40", 4), dist, schedule)
    ratio = p.throughput_req_s * p.latency_s / batch
    assert 1.0 < ratio < dist.max_output / dist.mean_output
