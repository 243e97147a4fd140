"""Incremental detokenization: the text a new token adds, without re-decoding everything.

Byte-level BPE tokens can split a UTF-8 character; a delta is only released once the
decoded text no longer ends in the replacement character, so clients never see half a
character. Only the tokens since `prefix_offset` are decoded each step.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class DetokenizerState:
    prefix_offset: int = 0  # decode window start
    read_offset: int = 0  # tokens already turned into released text


def next_text(
    tokenizer: PreTrainedTokenizerBase, output_ids: list[int], state: DetokenizerState
) -> str:
    """Text released by the newest token(s); advances `state`."""
    window = output_ids[state.prefix_offset :]
    read = state.read_offset - state.prefix_offset
    prefix_text = str(tokenizer.decode(window[:read], skip_special_tokens=True))
    full_text = str(tokenizer.decode(window, skip_special_tokens=True))
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return ""
    state.prefix_offset = state.read_offset
    state.read_offset = len(output_ids)
    return full_text[len(prefix_text) :]
