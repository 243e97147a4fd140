"""The serving profile is measured once per model, device, dtype, threads, grid and build of
the compiled kernels, then read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptive.errors import PlanningError
from engine.profile_cache import cache_path, serving_profile
from engine.profiler import QUICK, is_clean, profile_model


def test_quick_profile_is_measured_once_then_read_from_the_cache(
    load_cached, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")  # loaded from the shared model cache first
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))
    # the tiny model's layer times sit in the timer's noise, so its grid may come out
    # inverted, and is then not cached; that check is tested on its own below
    monkeypatch.setattr("engine.profile_cache.is_clean", lambda raw: True)
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
        torch.set_num_threads(1)
        monkeypatch.setattr("engine.kernels.signature", lambda dtype, device: "exegpt_kernels_0123")
        assert cache_path(loaded, "quick") != path  # other compiled kernels, another profile
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(PlanningError, match="no profile"):
        serving_profile(loaded, str(tmp_path / "missing.json"))


def test_a_noise_dominated_cached_profile_is_measured_again(
    load_cached, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A profile cached before the inversion check, measured on a busy machine, would
    mislead the planner at every start: it is replaced by a fresh measurement (a clean
    one here: the tiny model's own times may sit in the timer's noise)."""
    loaded = load_cached("random:llama")
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = profile_model(loaded, QUICK, progress=False)
        for kind in ("encode", "decode"):
            for point in clean["tp"][0][kind]:  # grows with batch and length
                point[2] = 1e-3 * point[0] * point[1]
        poisoned = json.loads(json.dumps(clean))
        del poisoned["inverted_share"]
        for point in poisoned["tp"][0]["encode"]:  # the smaller, the slower: all inverted
            point[2] = 1e3 / (point[0] * point[1])
        assert is_clean(clean) and not is_clean(poisoned)
        path = cache_path(loaded, "quick")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(poisoned))
        monkeypatch.setattr("engine.profile_cache.profile_model", lambda *a, **k: clean)
        serving_profile(loaded, "quick")
        again = json.loads(path.read_text())
    finally:
        torch.set_num_threads(threads)
    assert again == clean
