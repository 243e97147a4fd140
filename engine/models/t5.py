"""Encoder-decoder (T5) execution: the encoder runs once per query, its cross-attention
keys and values are kept in the query's slot, and the decoder steps over a slot KV cache.

Encoding a query = running the Hugging Face encoder on its prompt (no padding), projecting
the encoder output into every decoder layer's cross-attention K/V, then one decoder step on
the start token, which yields the first output token (as `generate` does). That step is the
running rows' decoding step too when an encoding phase carries one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem


class T5Executor:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_len: int) -> None:
        model: Any = loaded.model  # a transformers T5ForConditionalGeneration
        cfg = model.config
        self.encoder: Any = model.encoder
        self.decoder: Any = model.decoder
        self.lm_head: Any = model.lm_head
        self.blocks: list[Any] = list(self.decoder.block)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
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
        for item in items:
            n = len(item.token_ids)
            enc = self.encoder(input_ids=torch.tensor([item.token_ids])).last_hidden_state[0]
            for i, block in enumerate(self.blocks):
                cross = block.layer[1].EncDecAttention
                self.cross_k[i][item.slot, :, :n] = self._heads(cross.k(enc)).transpose(0, 1)
                self.cross_v[i][item.slot, :, :n] = self._heads(cross.v(enc)).transpose(0, 1)
            self.enc_lens[item.slot] = n
        # one decoder step: the new queries on the start token, then the running rows
        slots = torch.tensor([item.slot for item in items] + list(range(len(token_ids))))
        starts = [self.start_id] * len(items)
        return self._step(slots, starts + token_ids, [0] * len(items) + context_lens)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.self_k, *self.self_v):
            cache[dst, :, :length] = cache[src, :, :length]
        enc_len = int(self.enc_lens[src])
        for cache in (*self.cross_k, *self.cross_v):
            cache[dst, :, :enc_len] = cache[src, :, :enc_len]
        self.enc_lens[dst] = enc_len

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, self.num_heads, self.head_dim)  # [tokens, heads, d_kv]

    def _step(
        self, slots: torch.Tensor, token_ids: list[int], positions: list[int]
    ) -> torch.Tensor:
        pos = torch.tensor(positions)
        span = max(positions) + 1
        enc_lens = self.enc_lens[slots]
        enc_span = int(enc_lens.max())
        h = self.decoder.embed_tokens(torch.tensor(token_ids))  # [n, d_model]
        neg = torch.finfo(h.dtype).min
        # T5's relative position bias depends only on key - query: take each row's query line
        rel = self.blocks[0].layer[0].SelfAttention.compute_bias(span, span)[0]  # [H, span, span]
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
        h = self.decoder.final_layer_norm(h) * self.logit_scale
        return self.lm_head(h).float()
