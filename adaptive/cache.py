"""exegpt's cache folder: converted models, profiles and compiled kernels live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$EXEGPT_CACHE, else ~/.cache/exegpt."""
    return Path(os.environ.get("EXEGPT_CACHE", Path.home() / ".cache" / "exegpt"))
