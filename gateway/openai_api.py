"""POST /v1/completions and /v1/chat/completions: validation, then one shared request path.

The request path submits to the engine and waits for Accepted or Error before answering,
so every validation failure (including the engine's context-length check) is a 4xx with a
JSON body even for `stream: true`. After that it either streams Server-Sent Events (token
deltas written by the engine reader itself, see DeltaWriter) or collects one JSON body.
Its `finally` aborts the request: a client that disconnects (aiohttp cancels the handler)
frees its KV slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TypeVar

import msgspec
from aiohttp import hdrs, web

from engine import protocol as p
from gateway.engine_client import EngineUnavailable, Overloaded, RequestStream, StreamEvent
from gateway.errors import ApiError, error_body
from gateway.formats import ChatFormat, CompletionFormat, ResponseFormat
from gateway.keys import CONFIG, ENGINE, METRICS
from gateway.metrics import Metrics
from gateway.schemas import ChatCompletionRequest, ChatMessageIn, CompletionRequest, Usage

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


T = TypeVar("T")


def decode_body(raw: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None


def check_sampling(
    request: web.Request, body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None
) -> None:
    engine = request.app[ENGINE]
    served = engine.ready.model if engine.ready else request.app[CONFIG].model
    if body.model != served:
        raise ApiError(
            404,
            f"The model {body.model!r} does not exist; this server serves {served!r}.",
            param="model",
            code="model_not_found",
        )
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    context = engine.ready.max_model_len if engine.ready else request.app[CONFIG].max_model_len
    limit = request.app[CONFIG].max_tokens_limit or context
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise ApiError(
            400, f"max_tokens must be between 1 and {limit}, got {max_tokens}", param="max_tokens"
        )
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise ApiError(400, "temperature must be in [0, 2]", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")


def make_submit(
    request_id: str,
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    *,
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    messages: list[p.ChatMessage] | None = None,
) -> p.Submit:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return p.Submit(
        request_id=request_id,
        prompt=prompt,
        messages=messages,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=[s for s in stop if s],
        ignore_eos=body.ignore_eos,
    )


async def completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await request.read(), CompletionRequest)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
    check_sampling(request, body, max_tokens)
    prompt, prompt_ids = split_prompt(body.prompt)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    submit = make_submit(request_id, body, max_tokens, prompt=prompt, prompt_ids=prompt_ids)
    fmt = CompletionFormat(request_id, body.model, int(time.time()))
    return await serve_request(request, submit, fmt, body)


def split_prompt(prompt: str | list[str | int]) -> tuple[str | None, list[int] | None]:
    """OpenAI's prompt forms: text, token ids, or a batch of texts (only of one here)."""
    if isinstance(prompt, str):
        text = prompt
    elif prompt and all(isinstance(x, int) for x in prompt):
        return None, [int(x) for x in prompt]
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        text = prompt[0]
    else:
        raise ApiError(
            400,
            "prompt must be a string, one string in a list, or a list of token ids",
            param="prompt",
        )
    if not text:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return text, None


def flatten_content(message: ChatMessageIn) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(part.text or "" for part in message.content if part.type == "text")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await request.read(), ChatCompletionRequest)
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_sampling(request, body, max_tokens)
    if not body.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    messages = [p.ChatMessage(m.role, flatten_content(m)) for m in body.messages]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    submit = make_submit(request_id, body, max_tokens, messages=messages)
    fmt = ChatFormat(request_id, body.model, int(time.time()))
    return await serve_request(request, submit, fmt, body)


async def serve_request(
    request: web.Request,
    submit: p.Submit,
    fmt: ResponseFormat,
    body: CompletionRequest | ChatCompletionRequest,
) -> web.StreamResponse:
    engine, metrics = request.app[ENGINE], request.app[METRICS]
    start = time.monotonic()
    try:
        stream = engine.submit(submit)
    except Overloaded as exc:
        metrics.requests.labels("overloaded").inc()
        retry = str(request.app[CONFIG].retry_after_s)
        raise ApiError(
            429, f"server busy: {exc}; retry later", headers={"Retry-After": retry}
        ) from None
    except EngineUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    try:
        first = await stream.queue.get()
        if isinstance(first, p.Error):
            metrics.requests.labels("rejected" if first.status < 500 else "error").inc()
            raise ApiError(first.status, first.message, param=first.param)
        logger.info(
            "request %s: accepted, %d prompt tokens",
            submit.request_id,
            first.num_prompt_tokens if isinstance(first, p.Accepted) else -1,
        )
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await stream_events(request, stream, fmt, include_usage, start)
        return await collect(stream, fmt, start, request)
    except BaseException:
        if engine.is_open(submit.request_id):  # the client left before the end
            metrics.requests.labels("aborted").inc()
        raise
    finally:
        engine.abort(submit.request_id)  # no-op when it already ended


async def stream_events(
    request: web.Request,
    stream: RequestStream,
    fmt: ResponseFormat,
    include_usage: bool,
    start: float,
) -> web.StreamResponse:
    metrics, queue = request.app[METRICS], stream.queue
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    opening = fmt.opening()
    if opening:
        await response.write(opening)
    assert request.transport is not None  # prepared, so the connection is open
    is_chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
    write_delta = DeltaWriter(request.transport, is_chunked, fmt, metrics, start)
    # Deltas that came while the response was being prepared go first; from here on the
    # engine reader writes them itself. No await in between, so the order is kept.
    event = queue.get_nowait() if not queue.empty() else None
    while isinstance(event, p.TokenDelta):
        write_delta(event)
        event = queue.get_nowait() if not queue.empty() else None
    if event is None:
        stream.on_delta = write_delta
        event = await queue.get()
    await response.write(closing(event, fmt, include_usage))
    if isinstance(event, p.Finished):
        metrics.on_finished(time.monotonic() - start)
    else:
        metrics.requests.labels("error").inc()
    await response.write_eof()
    return response


class DeltaWriter:
    """Writes each token delta of one stream to its client's socket as soon as the engine
    reader decodes it: one SSE event in one HTTP chunk, no queue hop and no task switch.
    With 64 streams a step's 64 deltas are written in one pass over the frame; handing
    each to its handler task instead cost the last stream of the step about twice the
    added delay. The handler still writes the stream's last events and its end through
    aiohttp. Unlike `response.write`, nothing here waits for a slow client: what it has
    not read stays in the transport's buffer, at most this stream's max_tokens deltas."""

    def __init__(
        self,
        transport: asyncio.Transport,
        is_chunked: bool,
        fmt: ResponseFormat,
        metrics: Metrics,
        start: float,
    ) -> None:
        self._transport = transport
        self._is_chunked = is_chunked  # HTTP/1.1; an HTTP/1.0 body is the raw events
        self._fmt = fmt
        self._metrics = metrics
        self._start = start
        self._is_first = True

    def __call__(self, delta: p.TokenDelta) -> None:
        if self._transport.is_closing():
            return  # the client left: its handler is cancelled and aborts the request
        event = self._fmt.text_chunk(delta.text)
        if self._is_chunked:
            event = b"%x\r\n%b\r\n" % (len(event), event)
        self._transport.write(event)
        now = time.monotonic()
        if self._is_first:
            self._metrics.ttft.observe(now - self._start)
            self._is_first = False
        self._metrics.on_tokens(len(delta.token_ids))
        self._metrics.on_written(delta.emitted_at, now)


def closing(event: StreamEvent, fmt: ResponseFormat, include_usage: bool) -> bytes:
    """The last events of a stream: finish reason (and usage), or the error; then [DONE]."""
    if isinstance(event, p.Finished):
        usage = fmt.usage_chunk(usage_of(event)) if include_usage else b""
        return fmt.chunk("", event.finish_reason) + usage + DONE
    if isinstance(event, p.Error):
        return b"data: " + error_body(event.status, event.message) + b"\n\n" + DONE
    raise AssertionError(f"unexpected {event!r} after Accepted")


async def collect(
    stream: RequestStream, fmt: ResponseFormat, start: float, request: web.Request
) -> web.Response:
    metrics = request.app[METRICS]
    parts: list[str] = []
    while True:
        event = await stream.queue.get()
        if isinstance(event, p.TokenDelta):
            if not parts:
                metrics.ttft.observe(time.monotonic() - start)
            metrics.on_tokens(len(event.token_ids))
            parts.append(event.text)
        elif isinstance(event, p.Finished):
            metrics.on_finished(time.monotonic() - start)
            body = fmt.full("".join(parts), event.finish_reason, usage_of(event))
            return web.Response(body=body, content_type="application/json")
        elif isinstance(event, p.Error):
            metrics.requests.labels("error").inc()
            raise ApiError(event.status, event.message)


def usage_of(finished: p.Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.num_prompt_tokens,
        completion_tokens=finished.num_output_tokens,
        total_tokens=finished.num_prompt_tokens + finished.num_output_tokens,
    )
