"""The gateway's wire shapes: OpenAI-compatible HTTP bodies and the MQTT payloads.

Requests are decoded straight into these Structs, so a wrong type fails with msgspec's
precise message ("Expected `int`, got `str` - at `$.max_tokens`") and becomes a 400.
Responses keep `omit_defaults` off: OpenAI clients expect `"finish_reason": null` to be
present, not missing. Unknown request fields are ignored, as OpenAI's API does.
"""

from __future__ import annotations

import msgspec

from engine import protocol as p

# --- requests --------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension; benchmarks force output lengths with it
    user: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[str | int]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None


class SloUpdate(msgspec.Struct, forbid_unknown_fields=True):
    latency_s: float | None


# --- responses -------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class ChatMessageOut(msgspec.Struct):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    max_model_len: int
    object: str = "model"
    owned_by: str = "exegpt"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class ScheduleOut(msgspec.Struct):
    policy: str
    encode_batch: int
    decode_iters: int
    max_batch: int
    description: str
    predicted_latency_s: float | None
    predicted_throughput_req_s: float | None


class SloState(msgspec.Struct):
    latency_s: float | None
    measured_p50_s: float | None
    measured_p99_s: float | None
    num_measured: int
    schedule: ScheduleOut  # selected by the current bound
    active_schedule: ScheduleOut  # running now; the selected one starts at the next encode phase
    is_feasible: bool
    schedule_source: str
    adaptation: p.AdaptationInfo | None = None  # the online controller's view (engine side)


# --- MQTT ------------------------------------------------------------------------------


class MqttRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A request published to the request topic; tokens go to reply_topic."""

    id: str
    reply_topic: str
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    max_tokens: int | None = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False


class MqttReplyHint(msgspec.Struct):
    """What can still be read from a malformed payload to route its error reply."""

    id: str | None = None
    reply_topic: str | None = None


class MqttDelta(msgspec.Struct, tag="delta"):
    id: str
    index: int
    text: str
    token_ids: list[int]


class MqttFinished(msgspec.Struct, tag="finished"):
    id: str
    finish_reason: str
    text: str  # the whole completion, for a subscriber that joined late
    usage: Usage


class MqttError(msgspec.Struct, tag="error"):
    id: str | None
    error: ErrorBody
