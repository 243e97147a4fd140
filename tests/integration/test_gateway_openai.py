"""The OpenAI-compatible API through the real `openai` client against a served random:llama."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from gateway.server import GatewayServer

MODEL = "random:llama"

PROMPT = "The capital of France is"


def client_for(server: GatewayServer, max_connections: int = 100) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        timeout=60,
        max_retries=0,
        http_client=httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=max_connections), timeout=60
        ),
    )


async def test_models_lists_the_served_model(gateway: GatewayServer) -> None:
    client = client_for(gateway)
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_completion_non_streamed(gateway: GatewayServer) -> None:
    client = client_for(gateway)
    result = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text
    assert result.usage is not None and result.usage.completion_tokens == 8


async def test_greedy_streamed_completion_equals_non_streamed(gateway: GatewayServer) -> None:
    client = client_for(gateway)
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = await client.completions.create(**args)
    stream = await client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_chat_streamed_equals_non_streamed(gateway: GatewayServer) -> None:
    client = client_for(gateway)
    messages = [{"role": "user", "content": "Say hello."}]
    whole = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.timeout(180)
async def test_200_concurrent_streams_deliver_every_token_in_order(gateway: GatewayServer) -> None:
    client = client_for(gateway, max_connections=250)
    num_tokens = 16
    args = {"model": MODEL, "max_tokens": num_tokens, "temperature": 0,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    prompts = [f"Request number {i} says" for i in range(200)]
    # Reference texts, one request at a time (same prompts, greedy).
    references = {}
    for prompt in prompts[:8]:
        result = await client.completions.create(prompt=prompt, **args)
        references[prompt] = result.choices[0].text

    async def one(prompt: str) -> tuple[str, list[str], int]:
        stream = await client.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, **args
        )
        pieces: list[str] = []
        usage = -1
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason is None:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return prompt, pieces, usage

    results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 150)
    assert len(results) == 200
    for prompt, pieces, usage in results:
        assert usage == num_tokens
        assert len(pieces) <= num_tokens  # one SSE event per engine delta, never duplicated
        if prompt in references:
            assert "".join(pieces) == references[prompt]
