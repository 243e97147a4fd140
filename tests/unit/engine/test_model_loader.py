import subprocess
import sys

import pytest
import torch

from engine.cli import main
from engine.model_loader import ModelLoadError, load_model


@pytest.mark.parametrize(("arch", "encdec"), [("llama", False), ("gpt2", False), ("t5", True)])
def test_random_models_load_with_the_default_tokenizer(load_cached, arch, encdec):
    loaded = load_cached(f"random:{arch}")
    assert loaded.is_encoder_decoder is encdec
    assert loaded.tokenizer("hello world").input_ids
    assert loaded.eos_token_ids == {loaded.tokenizer.eos_token_id}
    assert loaded.vocab_size >= len(loaded.tokenizer)


def test_a_saved_model_folder_loads_by_path(load_cached, tmp_path):
    source = load_cached("random:gpt2")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), "float32")
    assert loaded.model.config.model_type == "gpt2"
    assert loaded.max_model_len == source.max_model_len


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "no such directory"),
        ("random:bert", "unknown random architecture"),
    ],
)
def test_bad_model_names_give_a_clear_error(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_unknown_dtype_is_rejected():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("random:llama", "int3")


def test_cli_reports_a_bad_model_path_in_one_line():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "generate",
            "--model",
            "/no/such/model",
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "exegpt generate: error: model '/no/such/model': no such directory (expected a Hugging "
        "Face model folder, 'smollm2' or 'random:<llama|gpt2|t5>')"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "device 'cuda': torch sees no CUDA device on this machine"),
        ("tpu", "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
)
def test_a_device_that_is_not_there_is_one_line_and_status_2(
    device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", "random:llama", "--device", device, "--prompt", "hi"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"exegpt generate: error: {message}"


def test_workers_stay_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "offline", "--model", "random:llama", "--device", "cuda", "--workers", "2"]
    assert main(argv) == 2
    assert "model workers run on the CPU" in capsys.readouterr().err
