"""NKI kernels (run by the simulator on CPU) against ``ember.ops.reference``.

Tolerance: flash-attn's rule (``helpers.assert_within_lowp_error``): error against the float32
(or float64) reference at most 2x the error of torch doing the same in the input dtype, plus a
small absolute term; for float32 inputs torch's "low precision" is the reference itself, so the
absolute term (1e-5 for attention, 1e-4 x the output scale for GEMMs) is the whole budget.
bfloat16 rounding happens where the simulator applies it: on every engine write. Outputs need
no poisoning: the simulator fills new buffers with NaN and refuses to return an output with an
unwritten element. Unused KV-cache memory is filled with NaN so that reading it would show.
"""

import math

import pytest
import torch
from helpers import assert_within_lowp_error

# The simulator's bf16/fp8 NumPy types; a machine without them (the GPU box) skips these tests.
pytest.importorskip("ml_dtypes")

import ember  # noqa: E402
from ember.neuron_kernels import attention, decode_attention, matmul, moe  # noqa: E402
from ember.neuron_kernels import simulator as sim  # noqa: E402
from ember.ops import reference  # noqa: E402

DTYPES = [torch.bfloat16, torch.float32]


def check_lse(lse, ref_lse):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    assert torch.allclose(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-4)


def attention_atol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-3


# ----------------------------------------------------------------------------------------------
# flash_attn_func
# ----------------------------------------------------------------------------------------------

PREFILL_CASES = [
    # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window
    (1, 1, 1, 1, 1, 64, False, (-1, -1)),
    (2, 17, 17, 9, 3, 64, True, (-1, -1)),
    (2, 129, 257, 4, 2, 128, True, (-1, -1)),
    (1, 300, 100, 2, 1, 96, True, (-1, -1)),       # more queries than keys: empty rows
    (1, 200, 600, 2, 2, 64, False, (50, 10)),      # sliding window over two KV tiles
    (1, 64, 64, 2, 1, 256, True, (16, -1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
def test_flash_fwd(case, dtype):
    b, sq, sk, hq, hkv, d, causal, window = case
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    k, v = torch.randn(b, sk, hkv, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype)
    scale = 0.7 / math.sqrt(d)
    right = 0 if causal else window[1]
    out, lse = attention.flash_attn(q, k, v, scale, causal, window[0], right)
    ref, ref_lse = reference.flash_attn_func(q, k, v, scale, causal, window, return_lse=True)
    lowp = reference.flash_attn_func(q, k, v, scale, causal, window, upcast=False)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_lowp_error(out, ref, lowp, atol=attention_atol(dtype))
    check_lse(lse, ref_lse)


def test_flash_fwd_public_api_gqa_28_4():
    q = torch.randn(1, 33, 28, 64, dtype=torch.float16)
    k, v = torch.randn(2, 1, 33, 4, 64, dtype=torch.float16).unbind(0)
    out, lse = ember.ops.flash_attn_func(q, k, v, causal=True, return_lse=True, backend="nki")
    ref, ref_lse = reference.flash_attn_func(q, k, v, causal=True, return_lse=True)
    lowp = reference.flash_attn_func(q, k, v, causal=True, upcast=False)
    assert_within_lowp_error(out, ref, lowp, atol=1e-3)
    check_lse(lse, ref_lse)


def test_flash_fwd_no_keys():
    q = torch.randn(1, 5, 2, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 0, 2, 64, dtype=torch.bfloat16)
    out, lse = attention.flash_attn(q, k, k, 0.125, False, -1, -1)
    assert torch.equal(out, torch.zeros_like(q)) and bool(torch.isneginf(lse).all())


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache (decode / append, split-KV) and merge_attn_states
# ----------------------------------------------------------------------------------------------

def make_cache(batch, heads_kv, head_dim, block_size, max_blocks, paged, dtype, lengths):
    """A cache whose memory past each sequence (and in unused blocks) is NaN, and a block table
    whose unused entries are out of range."""
    if paged:
        num_blocks = batch * max_blocks + 2
        k = torch.full((num_blocks, block_size, heads_kv, head_dim), float("nan"))
        table = torch.randperm(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks)
        table = table.int().contiguous()
    else:
        k = torch.full((batch, block_size, heads_kv, head_dim), float("nan"))
        table = None
    v = k.clone()
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        if paged:
            where = (table[b, pos // block_size].long(), pos % block_size)
        else:
            where = (torch.full_like(pos, b), pos)
        k[where] = torch.randn(n, heads_kv, head_dim)
        v[where] = torch.randn(n, heads_kv, head_dim)
        if paged:
            used = -(-n // block_size)
            table[b, used:] = 10 ** 6 if b % 2 else -1
    return k.to(dtype), v.to(dtype), table


DECODE_CASES = [
    # batch, seqlen_q, heads_q, heads_kv, head_dim, block_size, max_blocks (paged) or 0, causal,
    # window, num_splits
    (3, 1, 32, 8, 128, 16, 9, True, (-1, -1), 0),
    (2, 3, 9, 3, 64, 48, 13, True, (-1, -1), 0),     # block size not a power of two, split-KV
    (2, 2, 2, 2, 64, 144, 3, False, (20, -1), 0),    # blocks longer than 128 tokens
    (2, 5, 4, 1, 96, 300, 0, True, (-1, -1), 1),     # contiguous cache, append of 5 tokens
    (7, 1, 2, 1, 64, 16, 4, True, (-1, -1), 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode(case, dtype):
    b, sq, hq, hkv, d, bs, max_blocks, causal, window, splits = case
    paged = max_blocks > 0
    capacity = bs * (max_blocks if paged else 1)
    lengths = torch.randint(0, capacity + 1, (b,), dtype=torch.int32)
    lengths[0] = capacity  # a full cache and (at random) short and empty ones
    k_cache, v_cache, table = make_cache(b, hkv, d, bs, max_blocks, paged, dtype, lengths)
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    scale = d ** -0.5
    right = 0 if causal else window[1]
    out, lse = decode_attention.flash_attn_with_kvcache(
        q, k_cache, v_cache, lengths, table, scale, causal, window[0], right, splits, capacity,
        None, None, None)
    kwargs = dict(cache_seqlens=lengths, block_table=table, softmax_scale=scale, causal=causal,
                  window_size=window)
    ref, ref_lse = reference.flash_attn_with_kvcache(q, k_cache, v_cache, return_lse=True,
                                                     **kwargs)
    lowp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, upcast=False, **kwargs)
    assert_within_lowp_error(out, ref, lowp, atol=attention_atol(dtype))
    check_lse(lse, ref_lse)


def test_decode_split_kv_runs_two_programs_and_merges():
    lengths = torch.tensor([700, 1000], dtype=torch.int32)
    k_cache, v_cache, table = make_cache(2, 2, 64, 32, 32, True, torch.bfloat16, lengths)
    q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
    with sim.trace() as launches:
        out, lse = ember.ops.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, causal=True,
            return_lse=True, backend="nki")
    assert [len(programs) for programs in launches] == [2, 1]  # decode[2], then the merge
    ref, ref_lse = reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, causal=True,
        return_lse=True)
    lowp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                             block_table=table, causal=True, upcast=False)
    assert_within_lowp_error(out, ref, lowp, atol=1e-3)
    check_lse(lse, ref_lse)


def test_decode_tree_mask_new_tokens_and_fp8_cache():
    batch, sq, hkv, d, bs = 2, 4, 2, 64, 32
    lengths = torch.tensor([40, 100], dtype=torch.int32)
    cache, _, table = make_cache(batch, hkv, d, bs, 5, True, torch.float32, lengths)
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.05])
    k_cache = (cache / k_scale).to(torch.float8_e4m3fn)
    v_cache = (cache.flip(-1) / v_scale).to(torch.float8_e4m3fn)
    q = torch.randn(batch, sq, 4, d, dtype=torch.bfloat16)
    k_new, v_new = torch.randn(2, batch, sq, hkv, d, dtype=torch.bfloat16).unbind(0)
    tree = (torch.rand(batch, sq, sq) < 0.5) | torch.eye(sq, dtype=torch.bool)
    args = dict(k=k_new, v=v_new, cache_seqlens=lengths, block_table=table, tree_mask=tree,
                k_scale=k_scale, v_scale=v_scale, window_size=(60, -1), return_lse=True)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out, lse = ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, backend="nki", **args)
    ref, ref_lse = reference.flash_attn_with_kvcache(q, ref_k, ref_v, **args)
    lowp, _ = reference.flash_attn_with_kvcache(q, ref_k.clone(), ref_v.clone(), upcast=False,
                                                **args)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert_within_lowp_error(out, ref, lowp, atol=1e-3)
    check_lse(lse, ref_lse)


def test_decode_rejects_caches_past_fp32_exact_slots():
    huge = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(2 ** 20, 16, 1, 64)
    q = torch.randn(1, 1, 1, 64, dtype=torch.bfloat16)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 16777216 cache slots"):
        decode_attention.flash_attn_with_kvcache(q, huge, huge, torch.ones(1, dtype=torch.int32),
                                                 table, 0.125, True, -1, 0, 0, 16, None, None,
                                                 None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_attn_states(dtype):
    tokens, heads, d = 130, 3, 64
    out_a, out_b = torch.randn(2, tokens, heads, d, dtype=dtype).unbind(0)
    lse_a, lse_b = torch.randn(2, heads, tokens).unbind(0)
    lse_a[0, :10] = float("-inf")
    lse_b[0, 5:15] = float("-inf")  # rows 5..9 are empty on both sides
    out_b[0, 5:15] = 0.0
    out_a[:10, 0] = 0.0
    out, lse = ember.ops.merge_attn_states(out_a, lse_a, out_b, lse_b, backend="nki")
    ref, ref_lse = reference.merge_attn_states(out_a, lse_a, out_b, lse_b)
    lowp, _ = reference.merge_attn_states(out_a, lse_a, out_b, lse_b, upcast=False)
    assert_within_lowp_error(out, ref, lowp, atol=1e-3)
    check_lse(lse, ref_lse)


# ----------------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------------

def gemm_atol(ref):
    return 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 513), (130, 300, 96), (17, 128, 1030)])
def test_tiled_matmul(m, k, n, dtype):
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    out = matmul.matmul(x, w)
    ref = x.double() @ w.double().T
    assert_within_lowp_error(out, ref, x @ w.T, atol=gemm_atol(ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,ends", [(1, [0, 1]), (257, [40, 40, 200]), (700, [100, 650])])
def test_grouped_gemm(m, ends, dtype):
    k, n = 96, 130
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(len(ends), n, k, dtype=dtype)
    offsets = torch.tensor(ends, dtype=torch.int32)
    out = ember.ops.grouped_gemm(x, w, offsets, backend="nki")
    ref = reference.grouped_gemm(x.double(), w.double(), offsets)
    lowp = torch.zeros(m, n, dtype=dtype)
    start = 0
    for e, end in enumerate(ends):
        lowp[start:end] = x[start:end] @ w[e].T
        start = end
    assert_within_lowp_error(out, ref, lowp, atol=gemm_atol(ref))
    assert torch.equal(out[ends[-1]:], torch.zeros_like(out[ends[-1]:]))


def test_grouped_gemm_block_list_is_routing_independent():
    for ends in ([0, 0, 700], [1, 2, 3], [300, 300, 700]):
        blocks, end = moe.block_list(torch.tensor(ends, dtype=torch.int32), 700)
        assert blocks.shape == (2 + 3, 3) and end == ends[-1]
        rows = torch.zeros(700, dtype=torch.int64)
        for first, count, expert in blocks.tolist():
            rows[first:first + count] += 1
            assert count == 0 or ends[expert] >= first + count
        assert torch.equal(rows[:ends[-1]], torch.ones(ends[-1], dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 513), (130, 300, 96)])
def test_w8a16_gemm(m, k, n, dtype):
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k)
    qweight, scale = reference.quantize_int8(w)
    out = ember.ops.w8a16_gemm(x, qweight, scale, backend="nki")
    ref = reference.w8a16_gemm(x.double(), qweight, scale)
    lowp = x @ reference.dequantize_int8(qweight, scale).to(dtype).T
    assert_within_lowp_error(out, ref, lowp, atol=gemm_atol(ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 513), (130, 300, 96)])
def test_fp8_gemm(m, k, n, dtype):
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k)
    x[0, :7] *= 50.0  # a row with a wide range
    w_fp8, w_scale = reference.quantize_fp8(w)
    out = ember.ops.fp8_gemm(x, w_fp8, w_scale, backend="nki")
    # The float64 reference of the same quantised operands; torch's float32 path as baseline.
    x_fp8, x_scale = reference.quantize_fp8(x)
    ref = (x_fp8.double() @ w_fp8.double().T) * x_scale.double()[:, None] \
        * w_scale.double()[None, :]
    lowp = reference.fp8_gemm(x, w_fp8, w_scale)
    assert_within_lowp_error(out, ref, lowp, atol=gemm_atol(ref))


@pytest.mark.parametrize("op", ["flash_attn_func", "flash_attn_with_kvcache",
                                "merge_attn_states", "grouped_gemm", "w8a16_gemm", "fp8_gemm"])
def test_nki_backend_is_registered(op):
    assert "nki" in ember.ops.available_backends(op)
