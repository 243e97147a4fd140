"""The driver of benchmarks/gpu.sh: profile an OPT-1.3B-shaped model, then `bench offline`.

The model is made and profiled within the device scope `exegpt --device` enters (torch's
default device: `from_config`, `from_pretrained` and the engine create their tensors
there), and `bench offline` runs with `--device cuda` on a GPU. The model is OPT-1.3B's
shape (hidden
2048, 24 layers, 32 heads, FFN 8192, 2048 positions, vocabulary 50272) in the GPT-2
architecture the engine runs (pre-LayerNorm, learned positions, GELU MLP; OPT differs
only in its ReLU), with random weights: timing does not depend on their values.
`--tiny` shrinks everything so the CPU-feasible path can be checked anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from adaptive.cache import cache_dir
from engine.cli import main as exegpt
from engine.model_loader import device_scope, load_model, model_folder
from engine.profiler import ProfileOptions, profile_model

OPT_1_3B = {"n_embd": 2048, "n_layer": 24, "n_head": 32, "n_inner": 8192, "n_positions": 2048}
TINY = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 2048}


def shaped_model(tiny: bool) -> Path:
    """A random-weight GPT-2 folder of OPT-1.3B's shape (made once in the model cache)."""
    target = cache_dir() / "models" / ("gpt2-tiny-random" if tiny else "opt-1.3b-shaped-random")
    if (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.for_model("gpt2", vocab_size=50272, **(TINY if tiny else OPT_1_3B))
    torch.manual_seed(0)
    # initialised in the caller's device scope: 1.3B random weights took ~100 s on a GPU
    # host's CPU
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # the benchmarks never decode text; any tokenizer that loads will do
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder("random:gpt2")))
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU)")
    parser.add_argument("--num-queries", type=int, default=None, help="queries per task")
    parser.add_argument("--scale", type=float, default=None, help="multiply all lengths")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    grid = (
        ProfileOptions(max_batch=8, max_len=64, max_tokens=512, warmup=0, runs=1)
        if args.tiny
        else ProfileOptions(max_batch=64, max_len=1024, max_tokens=16384, warmup=2, runs=5)
    )
    with device_scope(device):
        folder = shaped_model(args.tiny)
        started = time.monotonic()
        profile = profile_model(load_model(str(folder), "bfloat16"), grid)
    (args.out / "profile.json").write_text(json.dumps(profile, indent=1) + "\n")
    print(f"profiled on {profile['device']} in {time.monotonic() - started:.0f} s", flush=True)
    # 32 queries at half length: the eager engine on an H100 steps in ~15 ms (launch-bound,
    # benchmarks/README.md), so the paper's 96 full-length queries take over 8 minutes
    num_queries, scale = (8, 0.05) if args.tiny else (32, 0.5)
    num_queries = args.num_queries or num_queries
    scale = args.scale or scale
    workload = ["--num-queries", str(num_queries), "--scale", str(scale)]
    return exegpt(
        ["bench", "offline", "--model", str(folder), "--device", device, "--tasks", "S,C1",
         "--quick", *workload, "--json", str(args.out / "offline.json")]
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
