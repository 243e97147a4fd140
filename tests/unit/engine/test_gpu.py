"""The engine, the profiler and the bench's ceiling on a CUDA device (skipped without one).

The engine creates its tensors on torch's default device and `from_pretrained` loads onto
it, so each test sets the default device to CUDA and loads its own model there. Float32
outputs are held to Hugging Face `generate` on the same device, token for token, as the
CPU suite holds them; bf16 runs must keep torch's operations (exegpt's kernels are CPU
code).
"""

from collections.abc import Iterator

import pytest
import torch

from adaptive.schedule import Policy, Schedule
from engine import kernels
from engine.cli import main
from engine.efficiency import measure_ceiling
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model_loader import load_model
from engine.profiler import ProfileOptions, profile_model
from engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu

SCHEDULES = [
    Schedule(Policy.RRA, encode_batch=3, decode_iters=2, max_batch=5),
    Schedule(Policy.STATIC, encode_batch=4),
    Schedule(Policy.CONTINUOUS, encode_batch=1, max_batch=5),
]


@pytest.fixture
def on_cuda() -> Iterator[None]:
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")


@pytest.mark.parametrize("model", ["random:llama", "random:gpt2", "random:t5"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.policy.value)
def test_greedy_matches_generate_on_cuda(
    on_cuda, hf_greedy, model, schedule, mixed_queries, run_to_end
):
    loaded = load_model(model, "float32")
    assert loaded.device.type == "cuda"
    queries = mixed_queries(seed=1, n=9)
    config = EngineConfig(
        model=model, dtype="float32", max_num_seqs=5, max_model_len=96, schedule=schedule
    )
    got = run_to_end(LLMEngine(config, loaded), queries)
    for i, (prompt, n) in enumerate(queries):
        assert got[f"q{i}"] == hf_greedy(loaded, prompt, n), f"query {i} differs"


def test_bf16_engine_keeps_torch_operations_on_cuda(on_cuda, mixed_queries, run_to_end):
    loaded = load_model("random:llama", "bfloat16")
    config = EngineConfig(
        model="random:llama", dtype="bfloat16", max_num_seqs=5, max_model_len=96,
        schedule=SCHEDULES[0],
    )  # fmt: skip
    engine = LLMEngine(config, loaded)
    assert kernels.signature(loaded.dtype, loaded.device) == "torch"
    queries = mixed_queries(seed=3, n=8)
    got = run_to_end(engine, queries)
    assert [len(got[f"q{i}"]) for i in range(len(queries))] == [n for _, n in queries]
    assert all(0 <= t < loaded.vocab_size for tokens in got.values() for t in tokens)


def test_seeded_sampling_repeats_on_cuda(on_cuda):
    """Per-request generators live on the CPU; a seed draws the same tokens again."""
    loaded = load_model("random:llama", "float32")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=96), loaded)
        engine.add_request("s", [5, 17, 300, 42], params)
        engine.add_request("g", [9, 8, 7], SamplingParams(max_tokens=12, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_unfinished():
            tokens += [
                t for out in engine.step() if out.request_id == "s" for t in out.new_token_ids
            ]
        runs.append(tokens)
    assert len(runs[0]) == 12 and runs[0] == runs[1]


def test_profile_on_cuda_names_the_gpu_and_times_every_point(on_cuda):
    loaded = load_model("random:llama", "bfloat16")
    grid = ProfileOptions(max_batch=8, max_len=64, max_tokens=512, warmup=1, runs=2)
    profile = profile_model(loaded, grid, progress=False)
    assert profile["device"] == torch.cuda.get_device_name()
    assert profile["device_memory_bytes"] == torch.cuda.get_device_properties(0).total_memory
    (entry,) = profile["tp"]
    for kind in ("encode", "decode"):
        assert entry[kind] and all(ms > 0 for _, _, ms in entry[kind]), kind


def test_ceiling_is_timed_to_completion_on_cuda():
    """An unsynchronised timer would read the launch alone: petaFLOP/s and more."""
    flops = measure_ceiling(torch.bfloat16, torch.device("cuda"), min_seconds=0.5)
    assert 1e12 < flops < 3e15


def test_generate_on_the_gpu_writes_what_it_writes_on_the_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = []
    for device in ("cpu", "cuda"):
        argv = ["generate", "--model", "random:llama", "--dtype", "float32", "--device", device,
                "--prompt", "The capital of France is", "--max-tokens", "12"]  # fmt: skip
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("The capital of France is")
