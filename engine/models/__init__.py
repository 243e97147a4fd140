"""Model executors: our own forward passes over Hugging Face weights with a slot KV cache."""

from __future__ import annotations

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem, ModelExecutor
from engine.models.decoder_only import DecoderOnlyExecutor
from engine.models.t5 import T5Executor


def build_executor(loaded: LoadedModel, num_slots: int, max_len: int) -> ModelExecutor:
    if loaded.is_encoder_decoder:
        return T5Executor(loaded, num_slots, max_len)
    return DecoderOnlyExecutor(loaded, num_slots, max_len)


__all__ = ["EncodeItem", "ModelExecutor", "build_executor"]
