"""Every policy's greedy output equals Hugging Face `generate`, query by query.

Prompts of different lengths are batched together, queries finish at different times and
their rows are reused, so this covers packed prefill, masked ragged decode and compaction.
Random-weight models run in float32, where the only difference from `generate` would be a
bug, not rounding.
"""

import pytest
import torch

from adaptive.schedule import Policy, Schedule
from engine.llm_engine import EngineConfig, LLMEngine
from engine.models import EncodeItem, build_executor, decoder_only
from engine.sampling import SamplingParams

SCHEDULES = [
    Schedule(Policy.RRA, encode_batch=3, decode_iters=2, max_batch=5),
    Schedule(Policy.STATIC, encode_batch=4),
    Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=5),
]


@pytest.mark.parametrize("model", ["random:llama", "random:gpt2", "random:t5"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.policy.value)
def test_greedy_matches_generate(
    load_cached, hf_greedy, model, schedule, mixed_queries, run_to_end
):
    loaded = load_cached(model)
    queries = mixed_queries(seed=1, n=9)
    config = EngineConfig(
        model=model, dtype="float32", max_num_seqs=5, max_model_len=96, schedule=schedule
    )
    assert config.carry_decode  # encoding phases carry the running rows' iteration
    got = run_to_end(LLMEngine(config, loaded), queries)
    for i, (prompt, n) in enumerate(queries):
        assert got[f"q{i}"] == hf_greedy(loaded, prompt, n), f"query {i} differs"


@pytest.mark.parametrize("model", ["random:llama", "random:t5"])
def test_strict_alternation_matches_generate(
    load_cached, hf_greedy, model, mixed_queries, run_to_end
):
    """The paper's form: encoding phases do not decode the running batch."""
    loaded = load_cached(model)
    queries = mixed_queries(seed=4, n=7)
    config = EngineConfig(
        model=model,
        dtype="float32",
        max_num_seqs=4,
        max_model_len=96,
        schedule=SCHEDULES[0],
        carry_decode=False,
    )
    got = run_to_end(LLMEngine(config, loaded), queries)
    for i, (prompt, n) in enumerate(queries):
        assert got[f"q{i}"] == hf_greedy(loaded, prompt, n), f"query {i} differs"


def test_rra_with_one_decode_iteration_schedules_like_continuous(load_cached, mixed_queries):
    """Same plans step by step. (A query done at its encoding step frees its row at once;
    continuous refills it immediately while RRA decodes once first, hence min_out=2.)"""
    loaded = load_cached("random:llama")
    queries = mixed_queries(seed=2, n=12, min_out=2)
    traces = []
    for schedule in (
        Schedule(Policy.RRA, encode_batch=64, decode_iters=1, max_batch=4),
        Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=4),
    ):
        engine = LLMEngine(
            EngineConfig(dtype="float32", max_num_seqs=4, max_model_len=96, schedule=schedule),
            loaded,
        )
        for i, (prompt, n) in enumerate(queries):
            engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        trace = []
        while (plan := engine.scheduler.schedule()) is not None:
            trace.append((plan.phase, [r.request_id for r in plan.requests]))
            engine.scheduler.update(plan, engine.lanes[0].runner.execute(plan))
        traces.append(trace)
    assert traces[0] == traces[1]


def test_abort_mid_decode_frees_the_row_and_reports_once(load_cached):
    loaded = load_cached("random:llama")
    engine = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=2, max_model_len=64), loaded)
    engine.add_request("keep", [500, 600, 700], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("drop", [800, 900], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("drop")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [("drop", "abort")]
    assert engine.stats().num_running == 1
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["keep"]


def test_prompt_over_the_context_limit_is_rejected(load_cached):
    engine = LLMEngine(
        EngineConfig(dtype="float32", max_num_seqs=1, max_model_len=16), load_cached("random:llama")
    )
    with pytest.raises(ValueError, match="exceeds the context limit of 16"):
        engine.add_request("long", list(range(100, 112)), SamplingParams(max_tokens=8))


def test_stop_string_ends_the_request_and_is_not_returned(load_cached):
    loaded = load_cached("random:llama")
    reference = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=1), loaded)
    reference.add_request("r", [500, 600], SamplingParams(max_tokens=12, ignore_eos=True))
    text = ""
    while reference.has_unfinished():
        text += "".join(o.new_text for o in reference.step())
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=1), loaded)
    engine.add_request(
        "r", [500, 600], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))
    )
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    streamed = "".join(o.new_text for o in outputs)
    assert streamed == text[: text.index(stop)]
    assert outputs[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(load_cached, hf_greedy):
    loaded = load_cached("random:llama")

    def sample_once(params: SamplingParams) -> list[int]:
        engine = LLMEngine(EngineConfig(dtype="float32", max_num_seqs=2), loaded)
        engine.add_request("r", [500, 600, 700], params)
        engine.add_request("other", [42, 43], SamplingParams(max_tokens=5, temperature=1.0))
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() if o.request_id == "r" for t in o.new_token_ids]
        return tokens

    sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=3, ignore_eos=True)
    assert sample_once(sampled) == sample_once(sampled)
    assert sample_once(sampled) != hf_greedy(loaded, [500, 600, 700], 16)


def test_encoding_steps_round_their_rows_up_without_changing_the_logits(load_cached, monkeypatch):
    """Padding rows only repeat the matrix products' shapes: the queries' logits, the
    running rows' and the cached keys are those of the unpadded step."""
    loaded = load_cached("random:llama")
    items = [EncodeItem(2, [5 + i for i in range(7)]), EncodeItem(3, [9] * 10)]
    batch = decoder_only.DecoderOnlyExecutor.batch(items, [11, 12], [4, 6])
    assert batch.num_tokens == 32 and batch.padding == 32 - 19
    assert decoder_only.DecoderOnlyExecutor.batch([], [11, 12], [4, 6]).padding == 0

    def run(pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(decoder_only, "PAD_TOKENS_TO", pad_to)
        executor = build_executor(loaded, 4, 32)
        executor.forward([EncodeItem(0, [3] * 5), EncodeItem(1, [4] * 7)], [], [])
        logits = executor.forward(items, [11, 12], [5, 7])
        return logits, executor.k_cache[0][:4, :, :10]

    padded, unpadded = run(32), run(1)
    assert padded[0].shape == (4, loaded.vocab_size)
    torch.testing.assert_close(padded[0], unpadded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], unpadded[1], rtol=1e-5, atol=1e-5)


def test_prompts_group_by_tokens_whole_and_in_order() -> None:
    items = [EncodeItem(i, [1] * n) for i, n in enumerate((5, 3, 9, 2, 1))]
    groups = decoder_only.prompt_groups(items, 8)
    assert [[len(item.token_ids) for item in group] for group in groups] == [[5, 3], [9], [2, 1]]
    assert decoder_only.prompt_groups(items, None) == [items]
    assert decoder_only.prompt_groups([], 8) == [[]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_encoding_step_in_groups_of_prompts_gives_the_one_pass_logits(load_cached, dtype):
    """On the CPU a step's prompts run through the layers in groups of at most chunk_tokens
    tokens, the running rows with the last group: the logits and the cached keys are the
    one pass's (in bf16, bit for bit: the kernels compute a row apart from its batch)."""
    loaded = load_cached("random:llama", dtype)
    items = [EncodeItem(2, [5 + i for i in range(7)]), EncodeItem(3, [9] * 10), EncodeItem(4, [8])]

    def run(chunk_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        executor = build_executor(loaded, 6, 32)
        assert executor.chunk_tokens == decoder_only.ENCODE_CHUNK_TOKENS
        executor.chunk_tokens = chunk_tokens
        executor.forward([EncodeItem(0, [3] * 5), EncodeItem(1, [4] * 7)], [], [])
        logits = executor.forward(items, [11, 12], [5, 7])
        return logits, executor.k_cache[0][:5, :, :10]

    grouped, whole = run(8), run(None)  # groups of 7, 10 and 1 tokens
    assert grouped[0].shape == (5, loaded.vocab_size)
    if dtype == "bfloat16":
        assert torch.equal(grouped[0], whole[0]) and torch.equal(grouped[1], whole[1])
    else:
        torch.testing.assert_close(grouped[0], whole[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped[1], whole[1], rtol=1e-5, atol=1e-5)
