"""exegpt's compiled bf16 kernels: decode attention is masked SDPA reading only each row's
own context, prefill attention is causal attention within each packed prompt, RMSNorm and
rotary round as the torch operations do, projections are the float32 products rounded once,
and the executor's bf16 steps through them agree with its torch-only path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from engine import kernels
from engine.models import EncodeItem, decoder_only
from engine.models.base import causal_prefill_attention
from engine.models.decoder_only import DecoderOnlyExecutor

BF16 = torch.bfloat16
CPU = torch.device("cpu")


# the prefill kernel is built in where the CPU has AVX512-BF16, and must be there
HAS_BF16_DOT = "avx512_bf16" in kernels._cpu_signature()
needs_bf16_dot = pytest.mark.skipif(not HAS_BF16_DOT, reason="no AVX512-BF16: no prefill kernel")


@pytest.fixture
def fresh_load():
    """kernels._load runs again for the test and is reset after it."""
    kernels._load.cache_clear()
    yield
    kernels._load.cache_clear()


def _op() -> kernels.DecodeAttention:
    op = kernels.decode_attention(BF16, CPU, 64, 4, 2)
    assert op is not None, "the kernels did not build (is a C++ compiler installed?)"
    return op


def _case(heads: int, kv_heads: int, head_dim: int, lengths: list[int], first: int = 2):
    """A bf16 cache of 8 rows x 40 positions; the batch is rows first.. first + n."""
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    k_cache, v_cache = (
        torch.randn(8, kv_heads, 40, head_dim, generator=gen).to(BF16) for _ in range(2)
    )
    n = len(lengths)
    q = torch.randn(n, heads, head_dim, generator=gen).to(BF16)
    span = max(lengths)
    rows = slice(first, first + n)
    return q, k_cache[rows, :, :span], v_cache[rows, :, :span], torch.tensor(lengths)


def _reference(q, k, v, num_keys, scale):
    """Masked SDPA in float32 over the same bf16 values."""
    mask = (torch.arange(k.shape[2]) < num_keys.unsqueeze(1))[:, None, None, :]
    out = scaled_dot_product_attention(
        q.float().unsqueeze(2), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[:, :, 0]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (16, 1, 32), (4, 2, 16)],
    ids=["gqa3-64", "mha-128", "gqa16-32", "gqa2-16"],
)
def test_decode_attention_equals_masked_sdpa(heads, kv_heads, head_dim):
    q, k, v, num_keys = _case(heads, kv_heads, head_dim, [1, 17, 40, 5])
    got = _op()(q, k, v, num_keys, head_dim**-0.5)
    assert got.dtype == BF16 and got.shape == q.shape
    want = _reference(q, k, v, num_keys, head_dim**-0.5)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_decode_attention_is_as_accurate_as_torch_s_own_bf16_attention():
    """Scores as bf16 dot products and weights rounded to bf16 (as torch rounds them):
    no further from exact attention than torch's bf16 SDPA over the same values."""
    q, k, v, num_keys = _case(9, 3, 64, [1, 17, 40, 5, 33, 2])
    exact = _reference(q, k, v, num_keys, 0.125)
    mask = (torch.arange(k.shape[2]) < num_keys.unsqueeze(1))[:, None, None, :]
    torch_bf16 = scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=0.125, enable_gqa=True
    )[:, :, 0]
    ours = (_op()(q, k, v, num_keys, 0.125).float() - exact).abs().mean()
    theirs = (torch_bf16.float() - exact).abs().mean()
    assert ours <= 1.5 * theirs


def test_a_row_reads_nothing_past_its_context():
    q, k, v, num_keys = _case(9, 3, 64, [3, 30, 12])
    clean = _op()(q, k, v, num_keys, 0.125)
    for row, length in enumerate(num_keys.tolist()):
        k[row, :, length:] = float("nan")
        v[row, :, length:] = float("nan")
    assert torch.equal(_op()(q, k, v, num_keys, 0.125), clean)


def test_bad_inputs_are_refused_with_a_message():
    q, k, v, num_keys = _case(4, 2, 64, [4, 9])
    with pytest.raises(RuntimeError, match=r"row 0 context 0 outside 1\.\.9"):
        _op()(q, k, v, torch.tensor([0, 9]), 0.125)
    with pytest.raises(RuntimeError, match=r"row 1 context 10 outside 1\.\.9"):
        _op()(q, k, v, torch.tensor([4, 10]), 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        _op()(q.float(), k.float(), v.float(), num_keys, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        _op()(q[:, :3], k, v, num_keys, 0.125)


def _prefill_op() -> kernels.PrefillAttention:
    op = kernels.prefill_attention(BF16, CPU, 64, 4, 2)
    assert op is not None, "the CPU has AVX512-BF16, yet the prefill kernel is not built in"
    return op


def _packed(heads: int, kv_heads: int, head_dim: int, tokens: int, seed: int = 0):
    """q, k, v as the executor has them: strided views into one fused QKV output."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(BF16)
    return qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]


@needs_bf16_dot
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (16, 1, 32), (4, 2, 16), (10, 2, 64)],
    ids=["gqa3-64", "mha-128", "gqa16-32", "gqa2-16", "gqa5-64"],
)
def test_prefill_attention_equals_causal_sdpa(heads, kv_heads, head_dim):
    """Prompts of 1 to 100 tokens, packed, on either side of the 16-position and 32-key
    blocks, with tokens after the last prompt (an encoding step's padding): the kernel is
    exact causal attention within each prompt up to bf16 rounding, as close to it as
    torch's own bf16 flash attention."""
    lengths = [1, 17, 40, 5, 33, 16, 100]
    packed = sum(lengths)
    q, k, v = _packed(heads, kv_heads, head_dim, packed + 7)
    scale = head_dim**-0.5
    got = _prefill_op()(q, k, v, torch.tensor(lengths), scale)
    assert got.dtype == BF16 and got.shape == (packed, heads, head_dim)
    exact = causal_prefill_attention(
        q[:packed].float(), k[:packed].float(), v[:packed].float(), lengths, scale
    )
    torch_bf16 = causal_prefill_attention(q[:packed], k[:packed], v[:packed], lengths, scale)
    error = (got.float() - exact).abs()
    torch_error = (torch_bf16.float() - exact).abs()
    assert error.max() < 2e-2 and error.mean() < 1.5 * torch_error.mean() + 1e-4


@needs_bf16_dot
def test_a_prompt_sees_only_its_own_earlier_tokens():
    """Changing a prompt's later tokens, another prompt or the padding after the last
    prompt leaves every earlier output of a prompt bit for bit the same."""
    lengths = [20, 37, 9]
    q, k, v = _packed(9, 3, 64, 70, seed=1)
    clean = _prefill_op()(q, k, v, torch.tensor(lengths), 0.125)
    for tensor in (q, k, v):  # the second prompt's positions 21.. and everything after it
        tensor[20 + 21 :] = torch.randn_like(tensor[20 + 21 :])
    changed = _prefill_op()(q, k, v, torch.tensor(lengths), 0.125)
    assert torch.equal(changed[: 20 + 21], clean[: 20 + 21])
    assert not torch.equal(changed[20 + 21 :], clean[20 + 21 :])


@needs_bf16_dot
def test_prefill_attention_refuses_bad_inputs_with_a_message():
    q, k, v = _packed(4, 2, 64, 10)
    with pytest.raises(RuntimeError, match="lengths must be positive"):
        _prefill_op()(q, k, v, torch.tensor([4, 0]), 0.125)
    with pytest.raises(RuntimeError, match="add up to 11 tokens; q has 10"):
        _prefill_op()(q, k, v, torch.tensor([4, 7]), 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        _prefill_op()(q.float(), k.float(), v.float(), torch.tensor([4]), 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        _prefill_op()(q[:, :3], k, v, torch.tensor([4]), 0.125)
    with pytest.raises(RuntimeError, match="head_dim 16, 32, 64, 128"):
        _prefill_op()(q[..., :48], k[..., :48], v[..., :48], torch.tensor([4]), 0.125)


def _projection() -> kernels.Projection:
    proj = kernels.projection(BF16, CPU)
    assert proj is not None, "the CPU has AVX512-BF16, yet the projection is not built in"
    return proj


@needs_bf16_dot
@pytest.mark.parametrize("rows", [1, 13, 200, 400, 1000])
@pytest.mark.parametrize(
    ("n", "k"), [(64, 576), (40, 33), (100, 1536)], ids=["panels", "tails", "long-rows"]
)
def test_projection_is_the_float32_products_rounded_once(rows, n, k):
    """Rows on either side of the 12-row micro-kernel and the 192-row groups, columns past
    a 32-column panel, an odd K and a long one: every post-op, with a bias, is the float32
    result rounded to bf16 once, up to the order of the float32 sums; a row's values do not
    depend on the rows computed with it (a query's tokens do not depend on its batch)."""
    gen = torch.Generator().manual_seed(rows + n)
    w = (torch.randn(n, k, generator=gen) * 0.2).to(BF16)
    bias = torch.randn(n, generator=gen).to(BF16)
    x = torch.randn(rows, k, generator=gen).to(BF16)
    other = torch.randn(rows, n, generator=gen).to(BF16)
    proj = _projection()
    packed = proj.pack(w)
    exact = x.float() @ w.float().T + bias.float()
    posts = {
        "none": exact,
        "silu": torch.nn.functional.silu(exact),
        "mul": exact * other.float(),
        "add": exact + other.float(),
    }
    for post, want in posts.items():
        takes_other = post in ("mul", "add")
        got = proj.apply(x, packed, bias, n, post, other if takes_other else None, False)
        assert got.dtype == BF16 and got.shape == (rows, n)
        torch.testing.assert_close(got.float(), want.to(BF16).float(), rtol=2**-7, atol=1e-3)
        widened = proj.apply(x, packed, bias, n, post, other if takes_other else None, True)
        assert widened.dtype == torch.float32 and torch.equal(widened, got.float())
        last = proj.apply(x[-1:], packed, bias, n, post, other[-1:] if takes_other else None, False)
        assert torch.equal(last, got[-1:])
    unbiased = proj.apply(x, packed, None, n, "none", None, False)
    torch.testing.assert_close(
        unbiased.float(), (exact - bias.float()).to(BF16).float(), rtol=2**-7, atol=1e-3
    )


@needs_bf16_dot
def test_projection_refuses_bad_inputs_with_a_message():
    proj = _projection()
    w = torch.randn(40, 32).to(BF16)
    packed, x = proj.pack(w), torch.randn(3, 32).to(BF16)
    with pytest.raises(RuntimeError, match="post must be none, silu, mul or add"):
        proj.apply(x, packed, None, 40, "gelu", None, False)
    with pytest.raises(RuntimeError, match="x has 30 columns; the weight was packed for 32"):
        proj.apply(x[:, :30], packed, None, 40, "none", None, False)
    with pytest.raises(RuntimeError, match="post add takes a bf16 other"):
        proj.apply(x, packed, None, 40, "add", None, False)
    with pytest.raises(RuntimeError, match="n = 80 does not fit"):
        proj.apply(x, packed, None, 80, "none", None, False)


def test_only_bf16_on_the_cpu_and_compiled_head_sizes_get_the_kernel():
    assert kernels.decode_attention(torch.float32, CPU, 64, 4, 2) is None  # fp32 stays exact
    gpu = torch.device("cuda")  # CPU ops: a GPU executor keeps torch's operations
    assert kernels.decode_attention(BF16, gpu, 64, 4, 2) is None
    assert kernels.prefill_attention(BF16, gpu, 64, 4, 2) is None
    assert kernels.rms_norm(BF16, gpu) is None and kernels.rotary(BF16, gpu) is None
    assert kernels.projection(BF16, gpu) is None and kernels.projection(torch.float16, CPU) is None
    assert kernels.signature(BF16, gpu) == "torch"
    assert kernels.decode_attention(BF16, CPU, 80, 4, 2) is None
    assert kernels.decode_attention(BF16, CPU, 64, 6, 4) is None  # not whole GQA groups
    assert kernels.decode_attention(BF16, CPU, 64, 64, 2) is None  # 32 query heads per KV head
    assert kernels.prefill_attention(torch.float32, CPU, 64, 4, 2) is None
    assert kernels.prefill_attention(BF16, CPU, 80, 4, 2) is None


def test_bf16_executor_steps_agree_with_the_torch_path(load_cached, fresh_load, monkeypatch):
    """Prompts packed with running rows of different lengths: the kernels' logits are the
    torch operations' within bf16 rounding (logits here spread ~1.6; rounding moves them
    ~0.01 on average, attending one key short moves them ~0.17 and up to ~3)."""
    loaded = load_cached("random:llama", "bfloat16")
    with_kernels = DecoderOnlyExecutor(loaded, num_slots=6, max_len=64)
    assert with_kernels.decode_kernel is not None
    assert (with_kernels.prefill_kernel is not None) == HAS_BF16_DOT
    monkeypatch.setenv("EXEGPT_KERNELS", "off")
    kernels._load.cache_clear()
    with_torch = DecoderOnlyExecutor(loaded, num_slots=6, max_len=64)
    assert with_torch.decode_kernel is None and with_torch.prefill_kernel is None
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 1000, (n,), generator=gen).tolist() for n in (5, 40, 11)]
    first = [EncodeItem(slot=i, token_ids=p) for i, p in enumerate(prompts)]
    joining = [EncodeItem(slot=3, token_ids=prompts[0][:4])]
    steps = [
        (first, [], []),
        (joining, [7, 8, 9], [5, 40, 11]),  # an encoding that carries the running rows
        ([], [10, 11, 12, 13], [6, 41, 12, 4]),
    ]
    for items, tokens, contexts in steps:
        got = with_kernels.forward(items, tokens, contexts)
        want = with_torch.forward(items, tokens, contexts)
        diff = (got - want).abs()
        assert diff.mean() < 0.03 and diff.max() < 0.25, (diff.mean(), diff.max())


def _rms_norm_module(width: int, gen: torch.Generator) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(width, generator=gen)).to(BF16))
    module.variance_epsilon = 1e-5
    return module


def test_rms_norm_rounds_as_the_torch_operations():
    gen = torch.Generator().manual_seed(5)
    module = _rms_norm_module(576, gen)
    x = (3 * torch.randn(300, 576, generator=gen)).to(BF16)
    fused = kernels.rms_norm(BF16, CPU)
    assert fused is not None
    got = decoder_only._RMSNorm(module, fused)(x)
    want = decoder_only._RMSNorm(module, None)(x)
    assert got.dtype == BF16
    # the squares are summed in another order: a float32 scale one unit off can move a
    # normalised value to the neighbouring bf16 on a rounding boundary, rarely; times the
    # weight, that is under two bf16 steps (2 * 2^-7 relative)
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * 2**-7, atol=0)
    with pytest.raises(RuntimeError, match="bf16"):
        fused(x.float(), module.weight, 1e-5)


def test_rotary_is_the_torch_operations_bit_for_bit():
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, tokens = 9, 3, 64, 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(BF16)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)  # strided
    angles = torch.randn(tokens, 1, dim, generator=gen)
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    fused = kernels.rotary(BF16, CPU)
    assert fused is not None
    assert torch.equal(fused(qk, cos, sin), decoder_only._rotate(qk, cos, sin))
    with pytest.raises(RuntimeError, match="even head size"):
        fused(qk[..., :63], cos[..., :63], sin[..., :63])


def test_kernels_can_be_switched_off(fresh_load, monkeypatch):
    monkeypatch.setenv("EXEGPT_KERNELS", "off")
    assert kernels.decode_attention(BF16, CPU, 64, 4, 2) is None


def test_a_failed_build_leaves_the_sdpa_path(
    fresh_load, monkeypatch, tmp_path, caplog, load_cached
):
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert kernels.decode_attention(BF16, CPU, 64, 4, 2) is None
    assert kernels.prefill_attention(BF16, CPU, 64, 4, 2) is None
    assert "torch operations run" in caplog.text
    executor = DecoderOnlyExecutor(load_cached("random:llama", "bfloat16"), 2, 16)
    assert executor.decode_kernel is None
    assert executor.forward([EncodeItem(0, [5, 6, 7])], [], []).shape[0] == 1


@pytest.mark.timeout(240)
def test_a_build_killed_halfway_does_not_hold_the_next_start(tmp_path):
    """torch's loader leaves its lock file behind when killed mid-build and would wait on
    it forever; the next start builds. In a fresh process: this one has the ops loaded."""
    env = os.environ | {"EXEGPT_CACHE": str(tmp_path), "EXEGPT_KERNELS": "on"}
    probe = "from engine import kernels; print(kernels.build_dir())"
    build = Path(subprocess.check_output([sys.executable, "-c", probe], env=env, text=True).strip())
    build.mkdir(parents=True)
    (build / "lock").touch()
    check = (
        "import torch; from engine import kernels; "
        "assert kernels.enabled_for(torch.bfloat16, torch.device('cpu'))"
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=200)
    assert (build / "ready").exists() and not (build / "lock").exists()
