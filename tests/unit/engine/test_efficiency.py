"""FLOP accounting and the step profile."""

import pytest

from engine.efficiency import CATEGORIES, ModelWork, profile_steps
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams


def test_query_flops_count_weights_head_and_attention() -> None:
    work = ModelWork(
        input_params=100,
        output_params=100,
        head_params=10,
        attn_width=4,
        input_layers=2,
        output_layers=2,
        is_encoder_decoder=False,
    )
    # prompt of 3: 2*100*3 weights + 4*2*4 * (1+2+3) causal pairs; 2 decode steps over
    # contexts 4 and 5: 2*100*2 + 4*2*4*(4+5); a head product per output token: 2*10*3
    expected = 600 + 32 * 6 + 400 + 32 * 9 + 60
    assert work.query_flops(3, 3) == pytest.approx(expected)


def test_model_work_of_a_llama_counts_its_layers(load_cached) -> None:  # type: ignore[no-untyped-def]
    loaded = load_cached("random:llama")
    work = ModelWork.of(loaded)
    layers = loaded.model.model.layers
    assert work.input_params == sum(p.numel() for p in layers.parameters())
    assert work.input_layers == len(layers)
    assert work.head_params == loaded.model.lm_head.weight.numel()


def test_step_profile_sorts_each_phase_into_categories(load_cached) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(
        EngineConfig(dtype="float32", max_num_seqs=4, max_model_len=64, num_threads=1),
        load_cached("random:llama"),
    )
    for i in range(3):
        engine.add_request(str(i), list(range(5, 15 + i)), SamplingParams(max_tokens=4))

    result = profile_steps(engine, 100)

    assert result.steps == {"encode": 1, "decode": 3}  # one phase, then 3 iterations
    for phase in ("encode", "decode"):
        spent = result.ms_per_step[phase]
        assert set(spent) == set(CATEGORIES)
        assert spent["matmul"] > 0 and spent["attention"] > 0 and spent["sampling"] > 0
        assert all(v >= 0 for v in spent.values())
    assert engine.counters.prompt_tokens == 10 + 11 + 12
    assert engine.counters.decode_rows == 3 * 3
    # the encoding forward's 33 rows were rounded up to 64, as the executor pads them
    assert engine.counters.padding_rows == 64 - 33
    assert engine.counters.computed_tokens == 64 + 3 * 3
