"""How a completion and a chat completion look on the wire (SSE chunks and full bodies).

A stream sends one chunk per token that differs from the last only in its text, so each
format encodes its chunk once with a marker for the text and keeps the bytes either side;
a token's chunk is then those two parts around its JSON-encoded text. The template comes
from the same Structs as every other chunk, so the bytes are the same as encoding the
whole chunk each time.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    Usage,
)

_encode = msgspec.json.Encoder().encode


def sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


_MARKER = "\x00exegpt-text\x00"


class TextChunk:
    """The SSE event of one text delta, split around its text once per stream."""

    def __init__(self, template: msgspec.Struct) -> None:
        parts = sse(template).split(_encode(_MARKER))
        if len(parts) != 2:
            raise ValueError("the chunk template must hold the text marker exactly once")
        self.head, self.tail = parts

    def __call__(self, text: str) -> bytes:
        return self.head + _encode(text) + self.tail


class ResponseFormat(Protocol):
    def opening(self) -> bytes: ...
    def text_chunk(self, text: str) -> bytes: ...
    def chunk(self, text: str, finish_reason: str | None) -> bytes: ...
    def usage_chunk(self, usage: Usage) -> bytes: ...
    def full(self, text: str, finish_reason: str, usage: Usage) -> bytes: ...


class CompletionFormat:
    def __init__(self, request_id: str, model: str, created: int) -> None:
        self.request_id, self.model, self.created = request_id, model, created
        self.text_chunk = TextChunk(self._body([CompletionChoice(0, _MARKER, None)], None))

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> Completion:
        return Completion(self.request_id, self.created, self.model, choices, usage)

    def opening(self) -> bytes:
        return b""

    def chunk(self, text: str, finish_reason: str | None) -> bytes:
        return sse(self._body([CompletionChoice(0, text, finish_reason)], None))

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse(self._body([], usage))

    def full(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        return _encode(self._body([CompletionChoice(0, text, finish_reason)], usage))


class ChatFormat:
    def __init__(self, request_id: str, model: str, created: int) -> None:
        self.request_id, self.model, self.created = request_id, model, created
        choice = ChatChunkChoice(0, ChatDelta(content=_MARKER))
        self.text_chunk = TextChunk(ChatCompletionChunk(request_id, created, model, [choice]))

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None) -> bytes:
        return sse(ChatCompletionChunk(self.request_id, self.created, self.model, choices, usage))

    def opening(self) -> bytes:
        # OpenAI's first chunk carries the role and no content.
        return self._chunk([ChatChunkChoice(0, ChatDelta(role="assistant", content=""))], None)

    def chunk(self, text: str, finish_reason: str | None) -> bytes:
        delta = ChatDelta(content=text) if text or finish_reason is None else ChatDelta()
        return self._chunk([ChatChunkChoice(0, delta, finish_reason)], None)

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def full(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        choice = ChatChoice(0, ChatMessageOut(text), finish_reason)
        return _encode(ChatCompletion(self.request_id, self.created, self.model, [choice], usage))
