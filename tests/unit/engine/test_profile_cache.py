"""The serving profile is measured once per model, device, dtype, threads and grid, then read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptive.errors import PlanningError
from engine.profile_cache import cache_path, serving_profile


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
