"""Encoder-decoder (T5) execution: the encoder runs once per query, its cross-attention
keys and values are kept in the query's slot, and the decoder steps over a slot KV cache.

Encoding a query = running the Hugging Face encoder on its prompt (no padding), projecting
the encoder output into every decoder layer's cross-attention K/V, then one decoder step on
the start token, which yields the first output token (as `generate` does). That step is the
running rows' decoding step too when an encoding phase carries one.

A pipeline stage (engine/parallel.py) holds a contiguous range of the encoder blocks and
one of the decoder blocks, with the caches of its decoder blocks only; the pieces below
(encoder embedding, blocks, final norm; cross-attention K/V; decoder embedding, blocks,
logits) are what the stages run in turn. T5's relative position bias belongs to block 0 of
each stack, so every stage computes it from its own copy of that block's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem


@dataclass(frozen=True)
class DecodeBatch:
    """One decoder step: the new queries on the start token, then the running rows."""

    slots: torch.Tensor  # [rows]
    token_ids: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows]


class T5Executor:
    """The forward over `encoder_layers` and `decoder_layers` (default: all of each)."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int,
        max_len: int,
        encoder_layers: range | None = None,
        decoder_layers: range | None = None,
    ) -> None:
        model: Any = loaded.model  # a transformers T5ForConditionalGeneration
        cfg = model.config
        self.encoder: Any = model.encoder
        self.decoder: Any = model.decoder
        self.lm_head: Any = model.lm_head
        if encoder_layers is None:
            encoder_layers = range(len(self.encoder.block))
        if decoder_layers is None:
            decoder_layers = range(len(self.decoder.block))
        self.encoder_blocks: list[Any] = [self.encoder.block[i] for i in encoder_layers]
        self.blocks: list[Any] = [self.decoder.block[i] for i in decoder_layers]
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        self.hidden_size = cfg.d_model
        self.dtype = loaded.dtype
        self.start_id = cfg.decoder_start_token_id
        # tied input/output embeddings are rescaled before the head (as in T5's own forward)
        self.logit_scale = cfg.d_model**-0.5 if cfg.tie_word_embeddings else 1.0
        shape = (num_slots, self.num_heads, max_len, self.head_dim)
        dtype = loaded.dtype
        # per layer [slots, heads, max_len, d_kv]: decoder self-attention, then cross-attention
        self.self_k = [torch.zeros(shape, dtype=dtype) for _ in self.blocks]
        self.self_v = [torch.zeros(shape, dtype=dtype) for _ in self.blocks]
        self.cross_k = [torch.zeros(shape, dtype=dtype) for _ in self.blocks]
        self.cross_v = [torch.zeros(shape, dtype=dtype) for _ in self.blocks]
        self.enc_lens = torch.zeros(num_slots, dtype=torch.long)

    @torch.inference_mode()
    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        if items:
            h = self.encoder_layers(items, self.encoder_embed(items))
            self.store_cross(items, self.encoder_finish(h))
        batch = self.decode_batch(items, token_ids, context_lens)
        return self.logits(self.decoder_layers(batch, self.decoder_embed(batch)))

    def drop_model_layers(self) -> None:
        """Free the blocks of other stages (block 0 of each stack stays: it holds the
        relative position bias). Only for a model nothing else uses: a worker's own copy."""
        self.encoder.block = torch.nn.ModuleList(self.encoder.block[:1])
        self.decoder.block = torch.nn.ModuleList(self.decoder.block[:1])

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.self_k, *self.self_v):
            cache[dst, :, :length] = cache[src, :, :length]
        enc_len = int(self.enc_lens[src])
        for cache in (*self.cross_k, *self.cross_v):
            cache[dst, :, :enc_len] = cache[src, :, :enc_len]
        self.enc_lens[dst] = enc_len

    def prompt_cache(self, slot: int, prompt_len: int) -> list[list[torch.Tensor]]:
        """Per decoder block of this executor, views of what encoding a prompt of
        `prompt_len` tokens into `slot` cached: the start token's self-attention keys and
        values [heads, 1, d_kv], then the cross-attention ones [heads, prompt_len, d_kv].
        WAA hands them from the encode to the decode workers (engine/handover.py)."""
        start, cross = slice(0, 1), slice(0, prompt_len)
        return [
            [sk[slot, :, start], sv[slot, :, start], ck[slot, :, cross], cv[slot, :, cross]]
            for sk, sv, ck, cv in zip(
                self.self_k, self.self_v, self.cross_k, self.cross_v, strict=True
            )
        ]

    def receive_prompt(self, slot: int, prompt_len: int) -> list[list[torch.Tensor]]:
        """prompt_cache's views of `slot`, for a hand-over to fill; records the slot's
        encoder length."""
        self.enc_lens[slot] = prompt_len
        return self.prompt_cache(slot, prompt_len)

    # -- encoder: each query on its own (no padding), its tokens packed after the last's --

    def encoder_embed(self, items: list[EncodeItem]) -> torch.Tensor:
        ids = torch.tensor([t for item in items for t in item.token_ids])
        return self.encoder.embed_tokens(ids)  # [packed, d_model]

    def encoder_layers(self, items: list[EncodeItem], h: torch.Tensor) -> torch.Tensor:
        """This executor's encoder blocks over h [packed, d_model]."""
        rel = self.encoder.block[0].layer[0].SelfAttention
        out = []
        for x in h.split([len(item.token_ids) for item in items]):
            bias = rel.compute_bias(len(x), len(x))  # [1, H, n, n]
            x = x.unsqueeze(0)
            for block in self.encoder_blocks:
                x = block(x, None, bias)[0]
            out.append(x[0])
        return torch.cat(out)

    def encoder_finish(self, h: torch.Tensor) -> torch.Tensor:
        return self.encoder.final_layer_norm(h)

    def store_cross(self, items: list[EncodeItem], enc: torch.Tensor) -> None:
        """Project the encoder output [packed, d_model] into this executor's decoder blocks'
        cross-attention keys and values, in each query's slot."""
        start = 0
        for item in items:
            n = len(item.token_ids)
            part = enc[start : start + n]
            for i, block in enumerate(self.blocks):
                cross = block.layer[1].EncDecAttention
                self.cross_k[i][item.slot, :, :n] = self._heads(cross.k(part)).transpose(0, 1)
                self.cross_v[i][item.slot, :, :n] = self._heads(cross.v(part)).transpose(0, 1)
            self.enc_lens[item.slot] = n
            start += n

    # -- decoder: one step over the slot caches ---------------------------------------------

    def decode_batch(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        first_row: int = 0,
    ) -> DecodeBatch:
        """The new queries' first decoder step, in their slots, and one step of the running
        rows, cache rows [first_row, first_row + n)."""
        rows = range(first_row, first_row + len(token_ids))
        return DecodeBatch(
            slots=torch.tensor([item.slot for item in items] + list(rows)),
            token_ids=torch.tensor([self.start_id] * len(items) + token_ids),
            positions=torch.tensor([0] * len(items) + context_lens),
        )

    def decoder_embed(self, batch: DecodeBatch) -> torch.Tensor:
        return self.decoder.embed_tokens(batch.token_ids)  # [rows, d_model]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, self.num_heads, self.head_dim)  # [tokens, heads, d_kv]

    def decoder_layers(self, batch: DecodeBatch, h: torch.Tensor) -> torch.Tensor:
        """This executor's decoder blocks over h [rows, d_model], caching self-attention."""
        slots, pos = batch.slots, batch.positions
        span = int(pos.max()) + 1
        enc_lens = self.enc_lens[slots]
        enc_span = int(enc_lens.max())
        neg = torch.finfo(h.dtype).min
        # T5's relative position bias depends only on key - query: take each row's query line
        rel = self.decoder.block[0].layer[0].SelfAttention.compute_bias(span, span)[0]
        self_bias = rel[:, pos, :].transpose(0, 1).unsqueeze(2)  # [n, H, 1, span]
        future = torch.arange(span).unsqueeze(0) > pos.unsqueeze(1)  # [n, span]
        self_bias = self_bias.masked_fill(future[:, None, None, :], neg)
        cross_mask = (torch.arange(enc_span).unsqueeze(0) < enc_lens.unsqueeze(1))[:, None, None]
        for i, block in enumerate(self.blocks):
            sa = block.layer[0].SelfAttention
            x = block.layer[0].layer_norm(h)
            self.self_k[i][slots, :, pos] = self._heads(sa.k(x))
            self.self_v[i][slots, :, pos] = self._heads(sa.v(x))
            out = scaled_dot_product_attention(
                self._heads(sa.q(x)).unsqueeze(2),  # [n, H, 1, d_kv]
                self.self_k[i][slots, :, :span],
                self.self_v[i][slots, :, :span],
                attn_mask=self_bias,
                scale=1.0,  # T5 folds the 1/sqrt(d) scaling into its weights
            )
            h = h + sa.o(out.flatten(1))
            ca = block.layer[1].EncDecAttention
            x = block.layer[1].layer_norm(h)
            out = scaled_dot_product_attention(
                self._heads(ca.q(x)).unsqueeze(2),
                self.cross_k[i][slots, :, :enc_span],
                self.cross_v[i][slots, :, :enc_span],
                attn_mask=cross_mask,
                scale=1.0,
            )
            h = h + ca.o(out.flatten(1))
            h = block.layer[2](h)  # feed-forward block, residual included
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.decoder.final_layer_norm(h) * self.logit_scale
        return self.lm_head(h).float()
