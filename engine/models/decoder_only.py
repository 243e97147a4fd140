"""Decoder-only forward (Llama family, GPT-2) over Hugging Face weights with a slot KV cache.

The Hugging Face modules supply the weights and the per-token pieces (norm weights, projections,
MLP, rotary tables); attention and the cache are ours, so that a batch can mix queries of
different lengths: prompts are packed without padding, and a decode iteration attends each
row over its own context only (keys past a row's length are masked, never computed into
its output).

A worker of a multi-worker engine (engine/parallel.py) runs a slice of this forward: a
contiguous range of the layers (a pipeline stage) and, within each layer, a share of the
attention heads and MLP columns (tensor parallelism, Llama family only):

    q/k/v, gate, up: column-parallel   each worker computes its heads / columns
    o_proj, down:    row-parallel      partial products, summed by an all-reduce

KV heads are split with their query heads, so every GQA group stays on one worker and a
worker's cache holds its own heads only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.functional import rms_norm, scaled_dot_product_attention

from engine import kernels
from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem, causal_prefill_attention
from engine.models.linear import FusedLinear


@dataclass(frozen=True)
class TensorSlice:
    """One worker's share of every layer: heads and MLP columns `rank` of `size`.

    `all_reduce` sums a tensor in place over the workers of the slice's group."""

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], None]

    def rows(self, weight: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """A copy of this worker's block of output rows, in whole units (a head is head_dim
        rows); a copy, so that the whole weight can be freed."""
        part = weight.shape[0] // unit // self.size * unit
        return weight[self.rank * part : (self.rank + 1) * part].clone()

    def columns(self, weight: torch.Tensor, unit: int = 1) -> torch.Tensor:
        part = weight.shape[1] // unit // self.size * unit
        return weight[:, self.rank * part : (self.rank + 1) * part].contiguous()


class _Arch(Protocol):
    """One architecture's pieces around attention; the executor owns attention and cache.

    Layers are this worker's only, indexed from 0; heads are this worker's."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def set_positions(self, positions: torch.Tensor) -> None: ...

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def attn_scale(self, i: int) -> float | None: ...

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...

    def drop_model_layers(self) -> None: ...


def _linear(*modules: Any) -> FusedLinear:
    return FusedLinear([m.weight for m in modules], [getattr(m, "bias", None) for m in modules])


def _column_linear(tp: TensorSlice | None, unit: int, *modules: Any) -> FusedLinear:
    """Fused output rows of `modules`, each cut to this worker's share (whole `unit`s)."""
    if tp is None:
        return _linear(*modules)
    biases = [getattr(m, "bias", None) for m in modules]
    return FusedLinear(
        [tp.rows(m.weight, unit) for m in modules],
        [None if b is None else tp.rows(b.unsqueeze(1), unit)[:, 0] for b in biases],
    )


def _row_linear(tp: TensorSlice | None, unit: int, module: Any) -> FusedLinear:
    """This worker's input columns of `module`; its bias is added once, by worker 0."""
    if tp is None:
        return _linear(module)
    bias = getattr(module, "bias", None)
    return FusedLinear([tp.columns(module.weight, unit)], [bias if tp.rank == 0 else None])


class _LlamaArch:
    def __init__(self, model: Any, layers: range | None, tp: TensorSlice | None) -> None:
        cfg = model.config  # a transformers LlamaForCausalLM (or alike)
        self.body: Any = model.model
        own = list(self.body.layers) if layers is None else [self.body.layers[i] for i in layers]
        self.num_layers = len(own)
        self.hidden_size = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        size = 1 if tp is None else tp.size  # dividing the KV heads: Layout.check
        self.num_heads = cfg.num_attention_heads // size
        self.num_kv_heads = cfg.num_key_value_heads // size
        self.tp = tp
        weight = self.body.embed_tokens.weight
        fused_norm = kernels.rms_norm(weight.dtype, weight.device)
        self.input_norms = [_RMSNorm(layer.input_layernorm, fused_norm) for layer in own]
        self.post_norms = [_RMSNorm(layer.post_attention_layernorm, fused_norm) for layer in own]
        self.final_norm = _RMSNorm(self.body.norm, fused_norm)
        # q and k by their positions
        self.rotate = kernels.rotary(weight.dtype, weight.device) or _rotate
        attns = [layer.self_attn for layer in own]
        mlps = [layer.mlp for layer in own]
        hd = self.head_dim
        self.qkv_proj = [_column_linear(tp, hd, a.q_proj, a.k_proj, a.v_proj) for a in attns]
        self.o_proj = [_row_linear(tp, hd, a.o_proj) for a in attns]
        if cfg.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported MLP activation {cfg.hidden_act!r} (expected silu)")
        self.gate_proj = [_column_linear(tp, 1, m.gate_proj) for m in mlps]
        self.up_proj = [_column_linear(tp, 1, m.up_proj) for m in mlps]
        self.down_proj = [_row_linear(tp, 1, m.down_proj) for m in mlps]
        self.lm_head = _linear(model.lm_head)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_positions(self, positions: torch.Tensor) -> None:
        dtype = self.body.embed_tokens.weight.dtype  # rotary_emb reads only x's dtype
        cos, sin = self.body.rotary_emb(torch.empty(0, dtype=dtype), positions.unsqueeze(0))
        self.rope = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [T, 1, head_dim]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(ids)  # [T, hidden]

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv_proj[i](self.input_norms[i](h))  # [tokens, (heads + 2 kv_heads) hd]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        assert self.rope is not None
        # q and k are rotated in one pass: their columns are adjacent in the fused output
        qk = self.rotate(
            qkv[:, : (heads + kv_heads) * hd].view(-1, heads + kv_heads, hd), *self.rope
        )
        v = qkv[:, (heads + kv_heads) * hd :].view(-1, kv_heads, hd)
        return qk[:, :heads], qk[:, heads:], v

    def attn_scale(self, i: int) -> float | None:
        return None

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = self._add_projected(self.o_proj[i], attn_out, h)
        x = self.post_norms[i](h)
        gated = self.up_proj[i].mul(x, self.gate_proj[i].silu(x))  # silu(gate(x)) * up(x)
        return self._add_projected(self.down_proj[i], gated, h)

    def _add_projected(self, proj: FusedLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + proj(x); a row-parallel projection's partial products are summed first."""
        if self.tp is None:
            return proj.add(x, h)
        out = proj(x)
        self.tp.all_reduce(out)
        return h + out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head.widened(self.final_norm(h))

    def drop_model_layers(self) -> None:
        self.body.layers = torch.nn.ModuleList()


class _RMSNorm:
    """Hugging Face's Llama-family RMSNorm: normalised in float32, rounded to the input's
    dtype, then scaled by the weight. In bf16 exegpt's kernel does it in one pass
    (`fused`, engine/kernels); otherwise torch's rms_norm does the float32 part, the same
    arithmetic bit for bit."""

    def __init__(self, module: Any, fused: Callable[..., torch.Tensor] | None) -> None:
        self.weight: torch.Tensor = module.weight.detach()
        self.shape = (self.weight.shape[0],)
        self.eps = float(module.variance_epsilon)
        self.fused = fused

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(h, self.weight, self.eps)
        return self.weight * rms_norm(h.float(), self.shape, eps=self.eps).to(h.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding, x * cos + rotate_half(x) * sin, rounded as it rounds
    each product, without materialising rotate_half(x): (-a) * b is -(a * b) exactly."""
    half = x.shape[-1] // 2
    out = x * cos
    rotated = torch.empty_like(out)
    torch.mul(x[..., half:], sin[..., :half], out=rotated[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=rotated[..., half:])
    return out.add_(rotated)


class _GPT2Arch:
    def __init__(self, model: Any, layers: range | None, tp: TensorSlice | None) -> None:
        if tp is not None:
            raise ValueError("tensor parallelism supports the Llama family, not gpt2")
        cfg = model.config  # a transformers GPT2LMHeadModel
        self.body: Any = model.transformer
        self.lm_head: Any = model.lm_head
        layers = range(len(self.body.h)) if layers is None else layers
        self.layers: list[Any] = [self.body.h[i] for i in layers]
        self.num_layers = len(self.layers)
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.hidden_size = cfg.n_embd
        base = 1 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.scales = [
            base / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base for i in layers
        ]

    def set_positions(self, positions: torch.Tensor) -> None:
        """GPT-2's positions enter through the embedding only."""

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.body.wte(ids) + self.body.wpe(positions)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layers[i]
        q, k, v = layer.attn.c_attn(layer.ln_1(h)).split(self.hidden_size, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def attn_scale(self, i: int) -> float | None:
        return self.scales[i]

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.attn.c_proj(attn_out)
        return h + layer.mlp(layer.ln_2(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body.ln_f(h)).float()

    def drop_model_layers(self) -> None:
        self.body.h = torch.nn.ModuleList()


_ARCHS: dict[str, type[_LlamaArch] | type[_GPT2Arch]] = {
    "llama": _LlamaArch,
    "mistral": _LlamaArch,
    "qwen2": _LlamaArch,
    "gpt2": _GPT2Arch,
}
TP_ARCHS = frozenset(name for name, arch in _ARCHS.items() if arch is _LlamaArch)


PAD_TOKENS_TO = 32  # encoding steps' token counts are rounded up to a multiple of this
# On the CPU the executor's forward runs an encoding step's prompts through the layers in
# groups of whole prompts of at most this many tokens (a longer prompt alone), so that a
# group's activations stay in the caches between a layer's operations (pipeline stages
# and WAA's encode workers run a step whole). On two cores of a 32 MB-L3 EPYC, C1's
# first step (32 prompts, 7,881 tokens) took 2.45-2.84 s in one pass and 2.17-2.24 s in
# groups; C1 continuous max 32 went from 7.34-7.51 to 7.72-7.75 queries/s (groups of
# 2,048 tokens gave 7.42-7.51, of 512 7.59-7.66).
ENCODE_CHUNK_TOKENS = 1024


def padded_token_count(tokens: int) -> int:
    """The rows an encoding step computes. oneDNN builds a kernel for every new row count
    of a matrix product (~5 ms each for SmolLM2's projections on two cores), and packed
    prompts make a new count nearly every step; rounded up, the counts repeat and their
    kernels are cached, for at most PAD_TOKENS_TO - 1 extra rows. Decoding steps' counts
    are batch sizes, which repeat already."""
    return -(-tokens // PAD_TOKENS_TO) * PAD_TOKENS_TO


def prompt_groups(items: list[EncodeItem], max_tokens: int | None) -> list[list[EncodeItem]]:
    """Consecutive groups of whole prompts of at most max_tokens tokens each (a longer
    prompt alone); one group, possibly empty, where max_tokens is None."""
    groups: list[list[EncodeItem]] = [[]]
    tokens = 0
    for item in items:
        length = len(item.token_ids)
        if max_tokens is not None and groups[-1] and tokens + length > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(item)
        tokens += length
    return groups


def num_layers(loaded: LoadedModel) -> int:
    return int(loaded.model.config.num_hidden_layers)


@dataclass(frozen=True)
class StepBatch:
    """One forward's inputs as tensors, the same on every worker (positions, masks)."""

    items: list[EncodeItem]
    lengths: list[int]  # prompt length of each item
    ids: torch.Tensor  # [packed + n]: prompt tokens first, then one token per running row
    positions: torch.Tensor  # [packed + n]
    decode_pos: torch.Tensor  # [n]: each running row's new token's position
    prompt_lens: torch.Tensor  # [items]: `lengths` as a tensor, for the prefill kernel
    mask: torch.Tensor  # [n, 1, 1, span]: row r sees keys 0..decode_pos[r]
    num_keys: torch.Tensor  # [n]: decode_pos + 1, the keys each running row attends
    first_row: int = 0  # the running rows are cache rows [first_row, first_row + n)
    padding: int = 0  # rows after the running ones that only round the token count up

    @property
    def packed(self) -> int:
        return sum(self.lengths)

    @property
    def num_rows(self) -> int:
        return len(self.decode_pos)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_logits(self) -> int:
        return len(self.items) + len(self.decode_pos)


class DecoderOnlyExecutor:
    """The forward over `layers` (default: all the model has) and one tensor slice
    (default: whole)."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int,
        max_len: int,
        layers: range | None = None,
        tp: TensorSlice | None = None,
    ) -> None:
        model_type = loaded.model.config.model_type
        if model_type not in _ARCHS:
            raise ValueError(
                f"unsupported decoder-only architecture {model_type!r} "
                f"(supported: {', '.join(sorted(_ARCHS))})"
            )
        self.arch: _Arch = _ARCHS[model_type](loaded.model, layers, tp)
        shape = (num_slots, self.arch.num_kv_heads, max_len, self.arch.head_dim)
        # [slots, kv_heads, max_len, head_dim] per layer: a row's keys are contiguous in time
        self.k_cache = [torch.zeros(shape, dtype=loaded.dtype) for _ in range(self.arch.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=loaded.dtype) for _ in range(self.arch.num_layers)]
        self.max_len = max_len
        self.dtype = loaded.dtype
        arch = self.arch
        shape_args = (loaded.dtype, loaded.device, arch.head_dim, arch.num_heads, arch.num_kv_heads)
        self.decode_kernel = kernels.decode_attention(*shape_args)
        self.prefill_kernel = kernels.prefill_attention(*shape_args)
        self.chunk_tokens = ENCODE_CHUNK_TOKENS if loaded.device.type == "cpu" else None

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    @torch.inference_mode()
    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        """The step's logits; on the CPU its prompts in groups of at most chunk_tokens
        tokens, the running rows with the last group. A prompt attends only to itself
        and a row's projections do not depend on the rows beside it, so the groups give
        the one pass's tokens."""
        *groups, last = prompt_groups(items, self.chunk_tokens)
        logits = [self._pass(group, [], []) for group in groups]
        return torch.cat([*logits, self._pass(last, token_ids, context_lens)])

    def _pass(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        batch = self.batch(items, token_ids, context_lens)
        return self.logits(batch, self.run_layers(batch, self.embed(batch)))

    @staticmethod
    def batch(
        items: list[EncodeItem], token_ids: list[int], context_lens: list[int], first_row: int = 0
    ) -> StepBatch:
        lengths = [len(item.token_ids) for item in items]
        decode_pos = torch.tensor(context_lens, dtype=torch.long)
        span = max(context_lens, default=0) + 1
        tokens = sum(lengths) + len(token_ids)
        padding = padded_token_count(tokens) - tokens if items else 0
        return StepBatch(
            items=items,
            lengths=lengths,
            ids=torch.tensor(
                [t for item in items for t in item.token_ids] + token_ids + [0] * padding
            ),
            positions=torch.cat(
                [
                    *(torch.arange(length) for length in lengths),
                    decode_pos,
                    torch.zeros(padding, dtype=torch.long),
                ]
            ),
            decode_pos=decode_pos,
            prompt_lens=torch.tensor(lengths, dtype=torch.long),
            mask=(torch.arange(span).unsqueeze(0) <= decode_pos.unsqueeze(1))[:, None, None, :],
            num_keys=decode_pos + 1,
            first_row=first_row,
            padding=padding,
        )

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.arch.embed(batch.ids, batch.positions)  # [packed + n, hidden]

    def run_layers(self, batch: StepBatch, h: torch.Tensor) -> torch.Tensor:
        """This executor's layers over h [packed + n, hidden], caching their keys and values."""
        self.arch.set_positions(batch.positions)
        packed, lengths = batch.packed, batch.lengths
        n = batch.num_rows
        rows_end = packed + n
        first, rows = batch.first_row, torch.arange(batch.first_row, batch.first_row + n)
        span = batch.mask.shape[-1]
        for i in range(self.arch.num_layers):
            q, k, v = self.arch.qkv(i, h)  # q [tokens, heads, hd], k/v [tokens, kv_heads, hd]
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            parts = []
            if batch.items:
                start = 0
                for item, length in zip(batch.items, lengths, strict=True):
                    end = start + length
                    k_cache[item.slot, :, :length] = k[start:end].transpose(0, 1)
                    v_cache[item.slot, :, :length] = v[start:end].transpose(0, 1)
                    start = end
                parts.append(self._prefill_attention(i, q[:packed], k[:packed], v[:packed], batch))
            if n:
                k_cache[rows, :, batch.decode_pos] = k[packed:rows_end]
                v_cache[rows, :, batch.decode_pos] = v[packed:rows_end]
                keys = k_cache[first : first + n, :, :span], v_cache[first : first + n, :, :span]
                parts.append(self._decode_attention(i, q[packed:rows_end], *keys, batch))
            if batch.padding:  # padding rows attend to nothing
                parts.append(q.new_zeros(batch.padding, q.shape[1] * q.shape[2]))
            h = self.arch.finish_layer(i, h, parts[0] if len(parts) == 1 else torch.cat(parts))
        return h

    def _prefill_attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """[packed, heads * head_dim]: each prompt's causal attention within itself (q
        [packed, heads, head_dim], k and v [packed, kv_heads, head_dim]); the compiled
        kernel where it runs, else torch's flash attention per prompt."""
        if self.prefill_kernel is not None:
            scale = self._kernel_scale(i)
            return self.prefill_kernel(q, k, v, batch.prompt_lens, scale).flatten(1)
        return causal_prefill_attention(q, k, v, batch.lengths, self.arch.attn_scale(i)).flatten(1)

    def _decode_attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """[n, heads * head_dim]: each running row's query (q [n, heads, head_dim]) over its
        cached keys and values (k, v [n, kv_heads, span, head_dim]) up to its new token.
        The compiled kernel reads a row's cache up to its own length only; SDPA reads
        every row up to the span and masks."""
        if self.decode_kernel is not None:
            scale = self._kernel_scale(i)
            return self.decode_kernel(q, k, v, batch.num_keys, scale).flatten(1)
        out = scaled_dot_product_attention(
            q.unsqueeze(2),
            k,
            v,
            attn_mask=batch.mask,
            scale=self.arch.attn_scale(i),
            enable_gqa=True,
        )  # [n, heads, 1, head_dim]
        return out.flatten(1)

    def _kernel_scale(self, i: int) -> float:
        """Layer i's softmax scale for the compiled kernels: the architecture's, else
        1/sqrt(head_dim), what torch's attention takes for None."""
        scale = self.arch.attn_scale(i)
        return self.arch.head_dim**-0.5 if scale is None else scale

    def logits(self, batch: StepBatch, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [items + n, vocab]; an item's come from its last prompt token."""
        if batch.items:
            last = torch.tensor(batch.lengths).cumsum(0) - 1
            h = torch.cat([h[last], h[batch.packed : batch.packed + batch.num_rows]])
        return self.arch.logits(h)

    def drop_model_layers(self) -> None:
        """Free the model's layers but this executor's share: it holds what it computes
        with, so the rest (other stages' layers; with TP, whole weights) goes. Only for a
        model nothing else uses: a worker's own copy."""
        self.arch.drop_model_layers()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst, :, :length] = cache[src, :, :length]

    def prompt_cache(self, slot: int, prompt_len: int) -> list[list[torch.Tensor]]:
        """Per layer of this executor, views of what encoding a prompt of `prompt_len`
        tokens into `slot` cached: its keys and values, [kv_heads, prompt_len, head_dim]
        each. WAA hands them from the encode to the decode workers (engine/handover.py)."""
        return [
            [k[slot, :, :prompt_len], v[slot, :, :prompt_len]]
            for k, v in zip(self.k_cache, self.v_cache, strict=True)
        ]

    def receive_prompt(self, slot: int, prompt_len: int) -> list[list[torch.Tensor]]:
        """prompt_cache's views of `slot`, for a hand-over to fill."""
        return self.prompt_cache(slot, prompt_len)
