"""Decoder-only forward (Llama family, GPT-2) over Hugging Face weights with a slot KV cache.

The Hugging Face modules supply the weights and the per-token pieces (norms, projections,
MLP, rotary tables); attention and the cache are ours, so that a batch can mix queries of
different lengths: prompts are packed without padding, and a decode iteration attends each
row over its own context only (keys past a row's length are masked, never computed into
its output).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch.nn.functional import scaled_dot_product_attention

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem, causal_prefill_attention
from engine.models.linear import FusedLinear


class _Arch(Protocol):
    """One architecture's pieces around attention; the executor owns attention and cache."""

    layers: list[Any]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def attn_scale(self, i: int) -> float | None: ...

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...


def _linear(*modules: Any) -> FusedLinear:
    return FusedLinear([m.weight for m in modules], [getattr(m, "bias", None) for m in modules])


class _LlamaArch:
    def __init__(self, model: Any) -> None:  # a transformers LlamaForCausalLM (or alike)
        cfg = model.config
        self.body: Any = model.model
        self.layers: list[Any] = list(self.body.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        attns = [layer.self_attn for layer in self.layers]
        mlps = [layer.mlp for layer in self.layers]
        self.qkv_proj = [_linear(a.q_proj, a.k_proj, a.v_proj) for a in attns]
        self.o_proj = [_linear(a.o_proj) for a in attns]
        if cfg.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported MLP activation {cfg.hidden_act!r} (expected silu)")
        self.gate_proj = [_linear(m.gate_proj) for m in mlps]
        self.up_proj = [_linear(m.up_proj) for m in mlps]
        self.down_proj = [_linear(m.down_proj) for m in mlps]
        self.lm_head = _linear(model.lm_head)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.body.embed_tokens(ids)  # [T, hidden]
        cos, sin = self.body.rotary_emb(h, positions.unsqueeze(0))  # [1, T, head_dim]
        self.rope = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [T, 1, head_dim]
        return h

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj[i].split(self.layers[i].input_layernorm(h))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        assert self.rope is not None
        cos, sin = self.rope
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def attn_scale(self, i: int) -> float | None:
        return None

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = self.o_proj[i].add(attn_out, h)
        x = self.layers[i].post_attention_layernorm(h)
        gated = self.up_proj[i].mul(x, self.gate_proj[i].silu(x))  # silu(gate(x)) * up(x)
        return self.down_proj[i].add(gated, h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body.norm(h)).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _GPT2Arch:
    def __init__(self, model: Any) -> None:  # a transformers GPT2LMHeadModel
        cfg = model.config
        self.body: Any = model.transformer
        self.lm_head: Any = model.lm_head
        self.layers: list[Any] = list(self.body.h)
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.hidden = cfg.n_embd
        base = 1 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.scales = [
            base / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base
            for i in range(len(self.layers))
        ]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.body.wte(ids) + self.body.wpe(positions)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layers[i]
        q, k, v = layer.attn.c_attn(layer.ln_1(h)).split(self.hidden, dim=-1)
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


_ARCHS: dict[str, type[_LlamaArch] | type[_GPT2Arch]] = {
    "llama": _LlamaArch,
    "mistral": _LlamaArch,
    "qwen2": _LlamaArch,
    "gpt2": _GPT2Arch,
}


class DecoderOnlyExecutor:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_len: int) -> None:
        model_type = loaded.model.config.model_type
        if model_type not in _ARCHS:
            raise ValueError(
                f"unsupported decoder-only architecture {model_type!r} "
                f"(supported: {', '.join(sorted(_ARCHS))})"
            )
        self.arch: _Arch = _ARCHS[model_type](loaded.model)
        shape = (num_slots, self.arch.num_kv_heads, max_len, self.arch.head_dim)
        # [slots, kv_heads, max_len, head_dim] per layer: a row's keys are contiguous in time
        self.k_cache = [torch.zeros(shape, dtype=loaded.dtype) for _ in self.arch.layers]
        self.v_cache = [torch.zeros(shape, dtype=loaded.dtype) for _ in self.arch.layers]
        self.max_len = max_len

    @torch.inference_mode()
    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        lengths = [len(item.token_ids) for item in items]
        packed = sum(lengths)  # prompt tokens first, then one token per running row
        n = len(token_ids)
        ids = torch.tensor([t for item in items for t in item.token_ids] + token_ids)
        decode_pos = torch.tensor(context_lens, dtype=torch.long)  # each new token's position
        positions = torch.cat([*(torch.arange(length) for length in lengths), decode_pos])
        rows = torch.arange(n)
        span = max(context_lens, default=0) + 1
        # [n, 1, 1, span]: row r sees keys 0..context_lens[r] (its cache plus the new token)
        mask = (torch.arange(span).unsqueeze(0) <= decode_pos.unsqueeze(1))[:, None, None, :]
        h = self.arch.embed(ids, positions)  # [packed + n, hidden]
        for i in range(len(self.arch.layers)):
            q, k, v = self.arch.qkv(i, h)  # q [tokens, heads, hd], k/v [tokens, kv_heads, hd]
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            parts = []
            if items:
                start = 0
                for item, length in zip(items, lengths, strict=True):
                    end = start + length
                    k_cache[item.slot, :, :length] = k[start:end].transpose(0, 1)
                    v_cache[item.slot, :, :length] = v[start:end].transpose(0, 1)
                    start = end
                scale = self.arch.attn_scale(i)
                parts.append(
                    causal_prefill_attention(
                        q[:packed], k[:packed], v[:packed], lengths, scale
                    ).flatten(1)
                )
            if n:
                k_cache[rows, :, decode_pos] = k[packed:]
                v_cache[rows, :, decode_pos] = v[packed:]
                out = scaled_dot_product_attention(
                    q[packed:].unsqueeze(2),  # [n, heads, 1, hd]
                    k_cache[:n, :, :span],
                    v_cache[:n, :, :span],
                    attn_mask=mask,
                    scale=self.arch.attn_scale(i),
                    enable_gqa=True,
                )
                parts.append(out.flatten(1))
            h = self.arch.finish_layer(i, h, parts[0] if len(parts) == 1 else torch.cat(parts))
        if items:  # an item's logits come from its last prompt token
            last = torch.tensor(lengths).cumsum(0) - 1
            h = torch.cat([h[last], h[packed:]])
        return self.arch.logits(h)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst, :, :length] = cache[src, :, :length]
