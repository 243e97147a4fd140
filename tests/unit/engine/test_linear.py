"""Fused and prepacked projections compute the same products as the separate Linear layers."""

import pytest
import torch

from engine.models.linear import FusedLinear


def _parts(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, 48, generator=gen) * 0.1).to(dtype) for n in (48, 16, 16)]
    biases = [torch.randn(48, generator=gen).to(dtype), None, torch.randn(16).to(dtype)]
    return weights, biases


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_fused_float32_projection_is_exactly_the_separate_ones(rows):
    weights, biases = _parts(torch.float32)
    fused = FusedLinear(weights, biases)
    x = torch.randn(rows, 48)
    for got, w, b in zip(fused.split(x), weights, biases, strict=True):
        assert torch.equal(got, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_bf16_projection_is_prepacked_and_matches_linear(rows):
    weights, biases = _parts(torch.bfloat16)
    fused = FusedLinear(weights, biases)
    assert fused.packed == torch.backends.mkldnn.is_available()
    x = torch.randn(rows, 48).to(torch.bfloat16)
    for got, w, b in zip(fused.split(x), weights, biases, strict=True):
        want = torch.nn.functional.linear(x, w, b).float()
        # the same products; a blocked kernel may round the bf16 result one unit differently
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    logits = fused.widened(x)  # as the LM head's logits: the bf16 results, in float32
    assert logits.dtype == torch.float32 and torch.equal(logits, fused(x).float())


def test_mismatched_biases_are_refused():
    weights, _ = _parts(torch.float32)
    with pytest.raises(ValueError, match="one bias"):
        FusedLinear(weights, [None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_ops_match_the_separate_ones(dtype):
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(32, 48, generator=gen) * 0.1).to(dtype)
    proj = FusedLinear([weight], [None])
    x = torch.randn(7, 48, generator=gen).to(dtype)
    other = torch.randn(7, 32, generator=gen).to(dtype)
    plain = torch.nn.functional.linear(x, weight)
    cases = [
        (proj.silu(x), torch.nn.functional.silu(plain)),
        (proj.mul(x, other), other * plain),
        (proj.add(x, other), other + plain),
    ]
    for got, want in cases:
        if dtype == torch.float32:  # unpacked: Hugging Face's operations, bit for bit
            assert torch.equal(got, want)
        else:  # post-ops round once from float32 instead of twice
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
