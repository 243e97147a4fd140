from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptive.errors import PlanningError
from adaptive.profile import Profile, load_profile

SHARED_FORMAT = {
    "model": "tiny",
    "layer": {"hidden": 64, "heads": 4, "head_dim": 16, "ffn": 256, "layers": 2},
    "tp": [
        {
            "tp": 1,
            "encode": [[1, 16, 0.1], [2, 16, 0.15], [1, 32, 0.12], [2, 32, 0.2]],
            "decode": [[1, 16, 0.05], [2, 16, 0.06], [1, 32, 0.05], [2, 32, 0.07]],
        }
    ],
}


def test_packaged_profiles_load_every_degree(opt13b: Profile) -> None:
    assert opt13b.tps == (1, 2, 4, 8)
    assert opt13b.weight_bytes == pytest.approx(25.7e9, rel=0.02)  # 13B params in bf16
    t5 = load_profile("t5-11b")
    assert t5.is_encdec and t5.encode_layers == t5.decode_layers == 24
    # gpt3-341b has no decode points at tp=1: derived from the nearest degree.
    big = load_profile("gpt3-341b")
    assert big.layer_time_s("decode", 1, 8, 512) > big.layer_time_s("decode", 2, 8, 512)


def test_interpolation_hits_measured_points_and_is_monotone(opt13b: Profile) -> None:
    assert opt13b.layer_time_s("encode", 1, 8, 512) == pytest.approx(3.6247e-3, rel=0.01)
    batches = [1, 3, 8, 40, 300, 512, 2000]
    times = [opt13b.layer_time_s("decode", 2, b, 700) for b in batches]
    assert all(np.diff(times) >= -1e-15)
    per_query = [t / b for t, b in zip(times, batches, strict=True)]
    assert all(np.diff(per_query) <= 1e-15)


def test_batches_past_the_grid_cost_their_work(opt13b: Profile) -> None:
    """Past the last profiled batch (512) time grows with the batch, slope 1 in log-log:
    RRA's steady decode batch can reach 1e4 at small N_D."""
    last = opt13b.layer_time_s("decode", 2, 512, 700)
    for factor in (1.5, 4.0, 32.0):
        assert opt13b.layer_time_s("decode", 2, 512 * factor, 700) == pytest.approx(
            factor * last, rel=1e-12
        )


def test_engine_profile_with_extra_keys(tmp_path: Path) -> None:
    raw = dict(SHARED_FORMAT, weight_bytes=1234.0, kv_bytes_per_token=56.0)
    raw["device_memory_bytes"] = 8e9
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(raw))
    profile = load_profile(path)
    assert (profile.weight_bytes, profile.kv_bytes_per_token) == (1234.0, 56.0)
    assert profile.device_memory_bytes == 8e9
    assert profile.layer_time_s("decode", 1, 2, 16) == pytest.approx(0.06e-3, rel=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps({"tp": []}),
        json.dumps(dict(SHARED_FORMAT, layer={"hidden": 64})),
        json.dumps(dict(SHARED_FORMAT, tp=[{"tp": 1, "encode": [[1, 16]], "decode": []}])),
        json.dumps(dict(SHARED_FORMAT, tp=[{"tp": 1, "encode": [[1, 16, 0.1]]}])),
    ],
)
def test_malformed_profile_is_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PlanningError, match="profile"):
        load_profile(path)


def test_unknown_model_name() -> None:
    with pytest.raises(PlanningError, match="opt-13b"):
        load_profile("no-such-model")
