"""The default model end to end: the CLI and every policy against Hugging Face `generate`."""

import subprocess
import sys

import pytest

from adaptive.schedule import Policy, Schedule
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams

PROMPT = "The capital of France is"


def test_cli_generate_prints_the_greedy_completion(load_cached, hf_greedy):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "generate",
            "--model",
            "smollm2",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loaded = load_cached("smollm2", "bfloat16")
    tokenizer = loaded.tokenizer
    expected = hf_greedy(loaded, tokenizer(PROMPT).input_ids, 8)
    assert result.stdout == PROMPT + tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert "Paris" in result.stdout


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(Policy.RRA, encode_batch=2, decode_iters=3, max_batch=4),
        Schedule(Policy.STATIC, encode_batch=4),
        Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=4),
    ],
    ids=lambda s: s.policy.value,
)
def test_every_policy_matches_generate_on_smollm2(load_cached, hf_greedy, schedule):
    loaded = load_cached("smollm2", "float32")
    prompts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def add(a, b):",
        "List three colours:",
        "In 1969, the first humans",
        "Q: What is 7 times 8?\nA:",
    ]
    lengths = [6, 10, 4, 8, 12, 3]
    engine = LLMEngine(
        EngineConfig(dtype="float32", max_num_seqs=4, max_model_len=64, schedule=schedule),
        loaded,
    )
    ids = [loaded.tokenizer(p).input_ids for p in prompts]
    for i, (prompt_ids, n) in enumerate(zip(ids, lengths, strict=True)):
        engine.add_request(str(i), prompt_ids, SamplingParams(max_tokens=n, ignore_eos=True))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        engine.scheduler.slots.check_integrity()
    for i, (prompt_ids, n) in enumerate(zip(ids, lengths, strict=True)):
        assert got[str(i)] == hf_greedy(loaded, prompt_ids, n), prompts[i]
