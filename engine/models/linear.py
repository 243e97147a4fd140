"""Projections with fused weights, prepacked for the CPU's matrix engine where it has one.

A decode step multiplies a few rows by every weight matrix of the model, so its time is
mostly per-call cost and weight traffic, not arithmetic. Two things cut both:

- fusing projections that read the same input (Q, K and V; gate and up) into one matrix,
  so each layer makes two calls fewer;
- bf16/fp16 weights packed once: for bf16 on CPUs with AVX512-BF16 into exegpt's own
  projection kernel's panels (`engine.kernels.projection`), elsewhere into oneDNN's blocked
  layout (what inductor's freezing does for CPU linears), so no call re-packs its weight.
  oneDNN's packing halves the time of a small-batch projection against plain `linear`;
  exegpt's kernel takes another third off a decoding iteration's projections. The results
  are the same products, summed in another order.

With packed weights the elementwise work around a projection also runs inside it, on the
float32 sums (oneDNN's post-ops, or exegpt's kernel's): SiLU of the gate, times the gate
for the up projection, plus the residual, saving a pass over the activations each: a third
of the time of a long prompt's MLP here. Unpacked (float32, or no oneDNN) the same results come
from separate operations in Hugging Face's order, bit for bit.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear, silu

from engine import kernels

_PACKED_DTYPES = (torch.bfloat16, torch.float16)


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class FusedLinear:
    """x @ cat(weights).T + cat(biases), returned whole or split into the parts' widths."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        if len(weights) != len(biases) or not weights:
            raise ValueError("FusedLinear needs one bias (or None) per weight")
        self.widths = [w.shape[0] for w in weights]
        weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0]
        weight = weight.detach().contiguous()
        if all(b is None for b in biases):
            self.bias: torch.Tensor | None = None
        else:
            self.bias = torch.cat(
                [
                    b.detach() if b is not None else weight.new_zeros(w.shape[0])
                    for w, b in zip(weights, biases, strict=True)
                ]
            )
        self.out_features = weight.shape[0]
        self.kernel = kernels.projection(weight.dtype, weight.device)
        self.packed = self.kernel is not None or _can_pack(weight)
        if self.kernel is not None:
            self.weight = self.kernel.pack(weight)
        elif self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self._compiled(x, "none", None)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return linear(x, self.weight, self.bias)

    def widened(self, x: torch.Tensor) -> torch.Tensor:
        """(x @ W.T + b) in the weights' dtype, as float32 (logits): in one pass where
        exegpt's kernel runs."""
        if self.kernel is not None:
            return self._compiled(x, "none", None, widen=True)
        return self(x).float()

    def _compiled(
        self, x: torch.Tensor, post: str, other: torch.Tensor | None, widen: bool = False
    ) -> torch.Tensor:
        """exegpt's kernel over x's rows (any leading dimensions)."""
        assert self.kernel is not None
        rows = x.reshape(-1, x.shape[-1])
        flat_other = None if other is None else other.reshape(-1, self.out_features)
        out = self.kernel.apply(
            rows, self.weight, self.bias, self.out_features, post, flat_other, widen
        )
        return out.view(*x.shape[:-1], self.out_features)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self(x).split(self.widths, dim=-1))

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ W.T + b)."""
        if self.kernel is not None:
            return self._compiled(x, "silu", None)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish", [], "")
        return silu(self(x))

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ W.T + b) * other."""
        if self.kernel is not None:
            return self._compiled(x, "mul", other)
        if self.packed:
            return _binary(x, other, self.weight, self.bias, "mul")
        return other * self(x)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """other + (x @ W.T + b)."""
        if self.kernel is not None:
            return self._compiled(x, "add", other)
        if self.packed:
            return _binary(x, other, self.weight, self.bias, "add")
        return other + self(x)


def _binary(
    x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), weight, bias, op)
