"""The serving profile is measured once per model, device, dtype, threads and grid, then read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptive.errors import PlanningError
from engine.profile_cache import cache_path, serving_profile
from engine.profiler import MAX_INVERTED_SHARE


def test_quick_profile_is_measured_once_then_read_from_the_cache(
    load_cached, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")  # loaded from the shared model cache first
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = cache_path(loaded, "quick")
        assert path.parent == tmp_path / "profiles" and not path.exists()
        first = serving_profile(loaded, "quick")
        assert path.is_file() and first.source == str(path)
        written = path.stat().st_mtime_ns
        again = serving_profile(loaded, "quick")
        assert path.stat().st_mtime_ns == written  # read, not measured again
        assert again.layers == first.layers == 2 and (again.tables == first.tables).all()
        torch.set_num_threads(2)
        assert cache_path(loaded, "quick") != path  # another thread count, another profile
        assert cache_path(loaded, "full") != path
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(PlanningError, match="no profile"):
        serving_profile(loaded, str(tmp_path / "missing.json"))


def test_a_noise_dominated_cached_profile_is_measured_again(
    load_cached, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A profile cached before the inversion check, measured on a busy machine, would
    mislead the planner at every start: it is replaced by a fresh measurement."""
    loaded = load_cached("random:llama")
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serving_profile(loaded, "quick")
        path = cache_path(loaded, "quick")
        raw = json.loads(path.read_text())
        encode = raw["tp"][0]["encode"]
        slowest = max(t for _, _, t in encode)
        for point in encode:  # the smaller the point, the slower: every neighbour inverted
            point[2] = slowest * 1000 / (point[0] * point[1])
        del raw["inverted_share"]
        path.write_text(json.dumps(raw))
        serving_profile(loaded, "quick")
        again = json.loads(path.read_text())
    finally:
        torch.set_num_threads(threads)
    assert again["inverted_share"] <= MAX_INVERTED_SHARE
    assert again["tp"][0]["encode"] != encode
