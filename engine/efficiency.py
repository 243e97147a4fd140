"""How much of the machine a run used: the compute ceiling, useful FLOPs, and where steps go.

- `measure_ceiling` times a large matrix product in the serving dtype with the engine's
  threads: the most arithmetic this machine does per second, measured in the same run as
  the benchmark so that the ratio survives a busy or throttled machine.
- `ModelWork` counts the FLOPs a query needs from the model itself (parameters of its
  layers and head, attention over the context): what any engine must compute, with no
  padding and no finished rows, so `useful_flops / makespan / ceiling` is the share of the
  ceiling a run achieved.
- `profile_steps` runs engine steps under torch's profiler and sorts the time into
  matrix products, attention, KV-cache copies, sampling, other tensor operations, and what
  is left (Python, scheduling, thread wake-ups) per encoding phase and decoding iteration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile

from engine.model_loader import LoadedModel
from engine.workloads import Query

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine  # which imports this module

# square matrices large enough to run at the kernel's peak: on a GPU a product must also
# outlast the launch and the synchronisation that times it
CEILING_SIZE = {"cpu": 2048, "cuda": 8192}


def measure_ceiling(dtype: torch.dtype, device: torch.device, min_seconds: float = 1.0) -> float:
    """FLOP/s of the fastest [n, n] @ [n, n] product in `dtype` on `device` over at least
    `min_seconds`.

    The best of many products: a moment of contention or a core's frequency ramp lowers
    some of them, never the best one. A GPU's product is timed to its completion.
    """
    n = CEILING_SIZE.get(device.type, CEILING_SIZE["cpu"])
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.mm(a, b)  # one-time kernel setup
    sync()
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


@dataclass(frozen=True)
class ModelWork:
    """FLOPs per token of one model: projections and MLPs, the LM head, and attention."""

    input_params: int  # weights each prompt token multiplies (encoder, or every layer)
    output_params: int  # weights each decoding iteration multiplies (decoder layers)
    head_params: int  # the LM head, applied once per output token
    attn_width: int  # heads * head_dim
    input_layers: int
    output_layers: int
    is_encoder_decoder: bool

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelWork:
        model: Any = loaded.model
        head = model.get_output_embeddings().weight.numel()
        cfg = model.config
        if loaded.is_encoder_decoder:
            enc = sum(p.numel() for p in model.encoder.block.parameters())
            dec = sum(p.numel() for p in model.decoder.block.parameters())
            width = cfg.num_heads * cfg.d_kv
            return cls(enc, dec, head, width, cfg.num_layers, cfg.num_decoder_layers, True)
        body = getattr(model, "model", None) or model.transformer
        blocks = getattr(body, "layers", None) or body.h
        params = sum(p.numel() for p in blocks.parameters())
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
        width = heads * (getattr(cfg, "head_dim", None) or hidden // heads)
        return cls(params, params, head, width, len(blocks), len(blocks), False)

    def query_flops(self, prompt_len: int, output_len: int) -> float:
        """What a query needs: its prompt encoded once and output_len tokens made."""
        p, o = prompt_len, output_len
        # attention: 4 * width FLOPs per (query, key) pair; causal prompts see half the pairs
        pairs = p * p if self.is_encoder_decoder else p * (p + 1) / 2
        encode = 2.0 * self.input_params * p + 4.0 * self.input_layers * self.attn_width * pairs
        if self.is_encoder_decoder:
            # the decoder runs once per output token over its own outputs and the prompt
            steps, keys = o, o * p + o * (o + 1) / 2
        else:
            # the first output token comes out of the encoding pass
            steps, keys = o - 1, (o - 1) * p + (o - 1) * o / 2
        decode = 2.0 * self.output_params * steps
        decode += 4.0 * self.output_layers * self.attn_width * keys
        return encode + decode + 2.0 * self.head_params * o

    def workload_flops(self, queries: Sequence[Query]) -> float:
        return sum(self.query_flops(q.prompt_len, q.output_len) for q in queries)


def needed_tokens(queries: Sequence[Query]) -> int:
    """Token rows a workload needs computed: every prompt token and every decode input."""
    return sum(q.prompt_len + q.output_len - 1 for q in queries)


# -- step profile ------------------------------------------------------------------------
CATEGORIES = ("matmul", "attention", "kv_cache", "sampling", "other_ops", "python_and_idle")
_MATMUL = ("mm", "addmm", "bmm", "matmul", "linear", "_linear_pointwise")
SAMPLING_LABEL = "exegpt::sample"
KV_MOVE_LABEL = "exegpt::kv_move"
PHASE_LABELS = {"encode": "exegpt::encode", "decode": "exegpt::decode"}


def _category(name: str) -> str:
    op = name.split("::")[-1]
    if op in _MATMUL:
        return "matmul"
    if "attention" in op:  # torch's SDPA and flash attention, exegpt's kernels
        return "attention"
    if op in ("index_put_", "_index_put_impl_"):
        return "kv_cache"
    return "other_ops"


@dataclass(frozen=True)
class StepProfile:
    """Milliseconds per step by category, for encoding phases and decoding iterations."""

    steps: dict[str, int]  # phase -> number of profiled steps
    ms_per_step: dict[str, dict[str, float]]  # phase -> category -> ms

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ms_per_step": self.ms_per_step}


def profile_steps(engine: LLMEngine, max_steps: int) -> StepProfile:
    """Profile up to `max_steps` of the engine's steps, fewer if it runs out of work; a
    step that started an encoding phase counts as encode, any other as decode."""
    walls: dict[str, float] = {"encode": 0.0, "decode": 0.0}
    counts: dict[str, int] = {"encode": 0, "decode": 0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max_steps):
            if not engine.has_unfinished():
                break
            encodes = engine.counters.encode_steps
            start = time.perf_counter()
            engine.step()
            ran = "encode" if engine.counters.encode_steps > encodes else "decode"
            walls[ran] += time.perf_counter() - start
            counts[ran] += 1
    spent = {phase: dict.fromkeys(CATEGORIES, 0.0) for phase in walls}
    for event in prof.events():
        phase = _phase_of(event)
        if phase is None:
            continue
        if event.name == SAMPLING_LABEL:
            spent[phase]["sampling"] += event.cpu_time_total / 1e3
        elif event.name == KV_MOVE_LABEL:
            spent[phase]["kv_cache"] += event.cpu_time_total / 1e3
        elif "::" in event.name and not event.name.startswith("exegpt::"):
            if _inside(event, (SAMPLING_LABEL, KV_MOVE_LABEL)):
                continue  # counted whole with its label
            spent[phase][_category(event.name)] += event.self_cpu_time_total / 1e3
    result: dict[str, dict[str, float]] = {}
    for phase, count in counts.items():
        if not count:
            continue
        measured = spent[phase]
        measured["python_and_idle"] = max(0.0, walls[phase] * 1e3 - sum(measured.values()))
        result[phase] = {k: round(v / count, 3) for k, v in measured.items()}
    return StepProfile({k: v for k, v in counts.items() if v}, result)


def _phase_of(event: Any) -> str | None:
    node = event
    while node is not None:
        for phase, label in PHASE_LABELS.items():
            if node.name == label:
                return phase
        node = node.cpu_parent
    return None


def _inside(event: Any, labels: tuple[str, ...]) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name in labels:
            return True
        node = node.cpu_parent
    return False
