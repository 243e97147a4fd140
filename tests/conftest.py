"""Shared fixtures and factories for the whole suite."""

from __future__ import annotations

import os

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
