"""How a completion and a chat completion look on the wire (SSE chunks and full bodies)."""

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


class ResponseFormat(Protocol):
    def opening(self) -> bytes: ...
    def chunk(self, text: str, finish_reason: str | None) -> bytes: ...
    def usage_chunk(self, usage: Usage) -> bytes: ...
    def full(self, text: str, finish_reason: str, usage: Usage) -> bytes: ...


class CompletionFormat:
    def __init__(self, request_id: str, model: str, created: int) -> None:
        self.request_id, self.model, self.created = request_id, model, created

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
