"""Shared fixtures and factories for the whole suite."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

# Tests share one model cache per machine so random models and the SmolLM2 conversion are
# made once; a run can point elsewhere by setting EXEGPT_CACHE itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def load_cached():  # type: ignore[no-untyped-def]
    """Factory: load_cached(name, dtype) loads each (model, dtype) once per test session."""
    from engine.model_loader import LoadedModel, load_model

    cache: dict[tuple[str, str], LoadedModel] = {}

    def load(name: str, dtype: str = "float32") -> LoadedModel:
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(name, dtype)
        return cache[name, dtype]

    return load


Queries = list[tuple[list[int], int]]  # (prompt ids, forced output length) per query


@pytest.fixture(scope="session")
def mixed_queries():  # type: ignore[no-untyped-def]
    """Factory: mixed_queries(seed, n, min_out=1), n seeded queries of 2-47 prompt tokens
    and min_out-13 output tokens: lengths that differ inside every batch."""

    def make(seed: int, n: int, min_out: int = 1) -> Queries:
        rng = random.Random(seed)
        return [
            (
                [rng.randrange(100, 40000) for _ in range(rng.randrange(2, 48))],
                rng.randrange(min_out, 14),
            )
            for _ in range(n)
        ]

    return make


@pytest.fixture(scope="session")
def run_to_end():  # type: ignore[no-untyped-def]
    """Factory: run_to_end(engine, queries) -> {"q<i>": tokens}. Adds every query (EOS
    ignored) and steps until all finish, checking the KV rows' bookkeeping after every
    step and that every finished query gave its row back."""
    from engine.sampling import SamplingParams

    def run(engine: Any, queries: Queries) -> dict[str, list[int]]:
        for i, (prompt, n) in enumerate(queries):
            engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        got: dict[str, list[int]] = {f"q{i}": [] for i in range(len(queries))}
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
            for lane in engine.lanes:
                lane.scheduler.slots.check_integrity()
            assert engine.stats().num_running <= engine.config.max_num_seqs
        assert engine.stats().num_running == 0
        return got

    return run


@pytest.fixture(scope="session")
def hf_greedy():  # type: ignore[no-untyped-def]
    """Factory: hf_greedy(loaded, prompt_ids, n), Hugging Face `generate`'s greedy
    continuation of one prompt with EOS ignored: the reference for exactness tests."""
    return _hf_greedy


def _hf_greedy(loaded, prompt_ids: list[int], max_new_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    import torch

    out = loaded.model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return list(out[0, -max_new_tokens:].tolist())
