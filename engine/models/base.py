"""What the runner needs from a model: encode new queries and decode the running rows.

Executors own the KV cache tensors. Rows of the cache are the slots of
`engine.kv_slots.SlotManager`: the running batch is rows [0, n), so decoding always works
on a contiguous prefix and `move_slot` implements compaction after early termination.
One `forward` both encodes new queries (in rows n and up) and decodes the running rows, so
an encoding phase can carry the running batch's next iteration: the projections then run
once over prompt tokens and decode rows together, and the running queries do not stall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class EncodeItem:
    slot: int
    token_ids: list[int]


class ModelExecutor(Protocol):
    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        """Encode `items` into their slots and decode rows 0..n-1 in the same pass.

        Row i of the running batch has context_lens[i] cached tokens and token_ids[i] as its
        new input. Returns float32 logits [len(items) + n, vocab]: each item's first output
        token, then each row's next token. Either part may be empty.
        """
        ...

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` cached positions into row dst (src is then free)."""
        ...


def causal_prefill_attention(
    q: torch.Tensor,  # [T, heads, head_dim], T = packed tokens of several sequences
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    lengths: list[int],
    scale: float | None,
) -> torch.Tensor:
    """Causal attention within each sequence of a packed (varlen) batch: [T, heads, head_dim].

    The projections run once over all T packed tokens (no padding); only attention is done
    per sequence, so a short prompt never pays for the longest one.
    """
    out = torch.empty_like(q)
    start = 0
    for length in lengths:
        end = start + length
        seq = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),
            k[start:end].transpose(0, 1).unsqueeze(0),
            v[start:end].transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )  # [1, heads, length, head_dim]
        out[start:end] = seq[0].transpose(0, 1)
        start = end
    return out
