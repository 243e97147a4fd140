"""The serving model's profile on this device: measured once, then read from the cache.

The controller plans with the engine's own layer times (`exegpt profile`, engine/profiler.py).
Measuring SmolLM2's full grid takes about 95 s here, so a profile is kept under
`$EXEGPT_CACHE/profiles/`, keyed by model, device, dtype, torch threads, grid and the
compiled kernels that run (engine/kernels: another build of them is measured again); a
later start reads it in milliseconds. `quick` is the small grid (batch <= 16, length <=
256, seconds on a small model; the controller's refit corrects its scale while serving); a
path names a profile file made by `exegpt profile`.

Only a clean profile is kept: one measured while the machine was too busy (over
MAX_INVERTED_SHARE of neighbouring points inverted even after re-measuring, see
engine/profiler.py) serves this run and is measured again at the next start, and a cached
one that fails the check (written before it existed) is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from adaptive.cache import cache_dir
from adaptive.profile import Profile, load_profile, parse_profile, read_profile_json
from engine import kernels
from engine.model_loader import LoadedModel
from engine.models import pad_tokens_to
from engine.profiler import QUICK, ProfileOptions, device_info, is_clean, profile_model

logger = logging.getLogger(__name__)

GRIDS = {"full": ProfileOptions(), "quick": QUICK}


def cache_path(loaded: LoadedModel, grid: str) -> Path:
    device, _ = device_info(loaded)
    ops = kernels.signature(loaded.dtype, loaded.device)
    threads = torch.get_num_threads()
    # the executor's padding is part of what a profile describes (older ones lack it)
    pad = pad_tokens_to(loaded)
    key = f"{loaded.name}|{device}|{loaded.dtype}|{threads}|{grid}|{ops}|pad{pad}"
    readable = re.sub(r"[^A-Za-z0-9]+", "-", f"{loaded.name}-{grid}").strip("-")[:60]
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "profiles" / f"{readable}-{digest}.json"


def serving_profile(loaded: LoadedModel, grid: str) -> Profile:
    """The profile for `loaded` as the engine will run it (call after setting threads,
    before an engine uses the model: profiling cuts its layer lists while it runs)."""
    if grid not in GRIDS:
        return load_profile(grid)
    path = cache_path(loaded, grid)
    if path.is_file():
        cached = read_profile_json(path)
        if is_clean(cached):
            return parse_profile(cached, source=str(path))
        logger.warning("cached profile %s is noise-dominated: measuring again", path)
    logger.info("profiling %s (%s grid) on this device, once: %s", loaded.name, grid, path)
    raw = profile_model(loaded, GRIDS[grid], progress=False)
    if not is_clean(raw):
        logger.warning("the profile stays noisy: used for this run, not cached")
        return parse_profile(raw, source=f"{path} (not cached: measured on a busy machine)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(raw, indent=1) + "\n")
    partial.replace(path)  # atomic: a concurrent start never reads half a file
    return parse_profile(raw, source=str(path))
