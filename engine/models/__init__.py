"""Model executors: our own forward passes over Hugging Face weights with a slot KV cache."""

from __future__ import annotations

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem, ModelExecutor
from engine.models.decoder_only import PAD_TOKENS_TO, DecoderOnlyExecutor
from engine.models.t5 import T5Executor


def build_executor(loaded: LoadedModel, num_slots: int, max_len: int) -> ModelExecutor:
    if loaded.is_encoder_decoder:
        return T5Executor(loaded, num_slots, max_len)
    return DecoderOnlyExecutor(loaded, num_slots, max_len)


def pad_tokens_to(loaded: LoadedModel) -> int:
    """The multiple `build_executor`'s executor rounds an encoding step's token count up
    to (decoder_only.padded_token_count; T5 encodes unpadded: 1)."""
    return 1 if loaded.is_encoder_decoder else PAD_TOKENS_TO


__all__ = ["EncodeItem", "ModelExecutor", "build_executor", "pad_tokens_to"]
