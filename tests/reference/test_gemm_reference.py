"""The MoE, quantized-GEMM, 2:4 and dense linear references against naive float64 loops, plus
the exact layouts the quantize/compress functions promise (kernels rely on them)."""

import math

import pytest
import torch
from helpers import assert_matches_reference, assert_within_lowp_error

from ember.ops import reference

# ------------------------------------------------------------------------------------------------
# MoE
# ------------------------------------------------------------------------------------------------


def naive_moe_align(flat_ids, num_experts, block_m):
    """vLLM's layout built slot by slot in Python."""
    numel = len(flat_ids)
    rows, experts = [], []
    for e in range(num_experts):
        slots = [s for s, i in enumerate(flat_ids) if i == e]
        padded = math.ceil(len(slots) / block_m) * block_m
        rows += slots + [numel] * (padded - len(slots))
        experts += [e] * (padded // block_m)
    used = len(rows)
    max_rows = numel + num_experts * (block_m - 1)
    rows += [numel] * (max_rows - used)
    experts += [-1] * (math.ceil(max_rows / block_m) - len(experts))
    return rows, experts, used


@pytest.mark.parametrize("tokens,top_k,num_experts,block_m", [
    (1, 1, 1, 1), (7, 2, 8, 4), (17, 2, 8, 16), (33, 4, 5, 3), (0, 2, 4, 8), (64, 2, 64, 16),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_moe_align_matches_naive(tokens, top_k, num_experts, block_m, dtype):
    # Some ids fall outside [0, E) (-1 = expert held elsewhere, E = bad id): they are skipped.
    ids = torch.randint(-1, num_experts + 1, (tokens, top_k), dtype=dtype)
    sorted_ids, expert_ids, post = reference.moe_align(ids, num_experts, block_m)
    want_rows, want_experts, want_used = naive_moe_align(ids.flatten().tolist(), num_experts,
                                                         block_m)
    assert sorted_ids.dtype == expert_ids.dtype == post.dtype == torch.int32
    assert sorted_ids.tolist() == want_rows
    assert expert_ids.tolist() == want_experts
    assert post.tolist() == [want_used]


def test_moe_align_invariants():
    """The properties a grouped GEMM relies on, checked directly."""
    tokens, top_k, num_experts, block_m = 50, 2, 6, 8
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]).int()
    sorted_ids, expert_ids, post = reference.moe_align(ids, num_experts, block_m)
    used = int(post)
    assert used % block_m == 0
    flat = ids.flatten()
    real = sorted_ids[:used][sorted_ids[:used] < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every slot exactly once
    for b in range(used // block_m):
        block = sorted_ids[b * block_m:(b + 1) * block_m]
        block = block[block < flat.numel()].long()
        assert block.numel() > 0 and (flat[block] == expert_ids[b]).all()
    assert (expert_ids[:used // block_m].diff() >= 0).all()


def naive_grouped_gemm(x, w, ends):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for row in range(x.shape[0]):
        group = next((e for e, end in enumerate(ends) if row < end), None)
        if group is not None:
            out[row] = w[group].double() @ x[row].double()
    return out


def random_ends(rows, groups):
    """Sorted cumulative ends with empty groups and unused rows at the end."""
    cuts = torch.randint(0, rows + 1, (groups,)).sort().values
    cuts[0] = 0  # group 0 empty
    return cuts.int()


@pytest.mark.parametrize("rows,groups,n,k", [(1, 1, 8, 16), (17, 4, 24, 40), (130, 8, 32, 64)])
def test_grouped_gemm_matches_naive(rows, groups, n, k):
    x = torch.randn(rows, k, dtype=torch.float64)
    w = torch.randn(groups, n, k, dtype=torch.float64)
    ends = random_ends(rows, groups)
    out = reference.grouped_gemm(x, w, ends)
    torch.testing.assert_close(out, naive_grouped_gemm(x, w, ends.tolist()), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_gemm_low_precision(dtype):
    x = torch.randn(65, 48, dtype=dtype)
    w = torch.randn(5, 40, 48, dtype=dtype)
    ends = random_ends(65, 5)
    out = reference.grouped_gemm(x, w, ends)
    want = naive_grouped_gemm(x, w, ends.tolist())
    lowp = torch.zeros(65, 40, dtype=dtype)
    start = 0
    for e, end in enumerate(ends.tolist()):
        lowp[start:end] = x[start:end] @ w[e].T
        start = end
    assert out.dtype == dtype
    assert_within_lowp_error(out, want, lowp)


def test_grouped_gemm_unchecked_offsets_are_clipped():
    """Decreasing or too-large ends (not checked on a GPU) read as running max clipped to M."""
    x = torch.randn(10, 8, dtype=torch.float64)
    w = torch.randn(3, 4, 8, dtype=torch.float64)
    bad = torch.tensor([6, 2, 99], dtype=torch.int32)
    out = reference.grouped_gemm(x, w, bad)
    torch.testing.assert_close(out, naive_grouped_gemm(x, w, [6, 6, 10]))


def naive_fused_moe(hidden, w13, w2, logits, top_k, renormalize):
    hidden, w13, w2, logits = (t.double() for t in (hidden, w13, w2, logits))
    inter = w2.shape[2]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        probs = [math.exp(v) for v in logits[t].tolist()]
        probs = [p / sum(probs) for p in probs]
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:top_k]
        weights = [probs[e] for e in chosen]
        if renormalize:
            weights = [wt / sum(weights) for wt in weights]
        for e, weight in zip(chosen, weights, strict=True):
            a = w13[e] @ hidden[t]
            gate, up = a[:inter], a[inter:]
            act = gate / (1 + torch.exp(-gate)) * up
            out[t] += weight * (w2[e] @ act)
    return out


@pytest.mark.parametrize("tokens,hidden_size,inter,experts,top_k", [
    (1, 16, 8, 4, 1), (7, 32, 24, 8, 2), (33, 24, 40, 6, 3),
])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_matches_per_token_loop(tokens, hidden_size, inter, experts, top_k,
                                          renormalize):
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(tokens, hidden_size, **f64)
    w13 = torch.randn(experts, 2 * inter, hidden_size, **f64) / hidden_size ** 0.5
    w2 = torch.randn(experts, hidden_size, inter, **f64) / inter ** 0.5
    logits = torch.randn(tokens, experts, **f64)
    out = reference.fused_moe(hidden, w13, w2, logits, top_k, renormalize)
    want = naive_fused_moe(hidden, w13, w2, logits, top_k, renormalize)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_moe_route_weights():
    logits = torch.randn(9, 8)
    weights, ids = reference.moe_route(logits, 3, renormalize=False)
    probs = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(weights.double(), probs.gather(1, ids.long()))
    assert ids.dtype == torch.int32 and (weights.diff(dim=1) <= 0).all()
    renormed, same_ids = reference.moe_route(logits, 3, renormalize=True)
    assert torch.equal(ids, same_ids)
    torch.testing.assert_close(renormed.sum(1), torch.ones(9))


# ------------------------------------------------------------------------------------------------
# Quantized GEMMs
# ------------------------------------------------------------------------------------------------


def linear_case(dtype, m=17, n=24, k=256):
    return torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_int8_round_trip(dtype):
    _, w = linear_case(dtype)
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    wd = w.double()
    amax = wd.abs().amax(dim=1)
    torch.testing.assert_close(scale[amax > 0].double(), amax[amax > 0] / 127)
    assert q.abs().max() <= 127
    assert (q.abs().amax(dim=1)[amax > 0] == 127).all()
    err = (reference.dequantize_int8(q, scale).double() - wd).abs()
    # Half a step, plus the float32 rounding of w / scale (<= 127 * 2^-24 steps).
    assert (err <= scale.double()[:, None] * (0.5 + 1e-5)).all()
    assert (q[3] == 0).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w8a16_gemm_matches_naive(dtype):
    x, w = linear_case(dtype)
    q, scale = reference.quantize_int8(w)
    w_deq = q.double() * scale.double()[:, None]
    want = x.double() @ w_deq.T
    out = reference.w8a16_gemm(x, q, scale)
    assert out.dtype == dtype
    lowp = x @ w_deq.to(dtype).T
    assert_within_lowp_error(out, want, lowp)


def naive_int4_weight(packed, scales, zeros, group_size):
    """Dequantise element by element from the documented layout."""
    n, half = packed.shape
    out = torch.empty(n, 2 * half, dtype=torch.float64)
    p, s, z = packed.tolist(), scales.tolist(), zeros.tolist()
    for row in range(n):
        for col in range(2 * half):
            code = (p[row][col // 2] >> (4 * (col % 2))) & 0xF
            g = col // group_size
            out[row, col] = (code - z[row][g]) * s[row][g]
    return out


def test_int4_pack_unpack_exact():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = reference.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(reference.unpack_int4(packed), codes)
    # Byte j = column 2j (low nibble) + 16 * column 2j + 1; int32 word i, nibble n = column 8i + n.
    assert torch.equal(packed.int(), codes[:, 0::2].int() + 16 * codes[:, 1::2].int())
    words = packed.view(torch.int32).long() & 0xFFFFFFFF
    for nib in range(8):
        assert torch.equal((words >> (4 * nib)) & 0xF, codes[:, nib::8].long())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_int4_round_trip(group_size, dtype):
    _, w = linear_case(dtype, n=12)
    w[0, :group_size] = 0.0              # an all-zero group
    w[1, :group_size] = w[1, :group_size].abs() + 0.5  # an all-positive group: zero point 0
    w[2, 5] = 0.0                         # zero must dequantise exactly
    packed, scales, zeros = reference.quantize_int4(w, group_size)
    n, k = w.shape
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert scales.shape == zeros.shape == (n, k // group_size)
    assert scales.dtype == torch.float32 and zeros.dtype == torch.uint8
    assert zeros.max() <= 15 and torch.isfinite(scales).all()
    deq = reference.dequantize_int4(packed, scales, zeros, group_size)
    torch.testing.assert_close(deq.double(), naive_int4_weight(packed, scales, zeros, group_size))
    # The group range [min(w, 0), max(w, 0)] is split in 15 steps; rounding errs <= half a step.
    groups = w.double().reshape(n, -1, group_size)
    span = groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)
    torch.testing.assert_close(scales.double()[span > 0], (span / 15)[span > 0])
    err = (deq.double() - w.double()).reshape(n, -1, group_size).abs()
    assert (err <= scales.double()[..., None] * (0.5 + 1e-5)).all()
    assert deq[2, 5] == 0 and (deq[0, :group_size] == 0).all()


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w4a16_gemm_matches_naive(group_size, dtype):
    x, w = linear_case(dtype)
    packed, scales, zeros = reference.quantize_int4(w, group_size)
    w_deq = naive_int4_weight(packed, scales, zeros, group_size)
    out = reference.w4a16_gemm(x, packed, scales, zeros, group_size)
    assert out.dtype == dtype
    assert_within_lowp_error(out, x.double() @ w_deq.T, x @ w_deq.to(dtype).T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_fp8_round_trip(dtype):
    _, w = linear_case(dtype)
    w_fp8, scale = reference.quantize_fp8(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    wd = w.double()
    torch.testing.assert_close(scale.double(), wd.abs().amax(dim=1) / 448)
    assert (w_fp8.double().abs().amax(dim=1) == 448).all()
    deq = w_fp8.double() * scale.double()[:, None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4; subnormals (< 2^-6) <= 2^-10 absolute.
    bound = torch.maximum(wd.abs() * 2 ** -4, scale.double()[:, None] * 2 ** -10) * (1 + 1e-6)
    assert ((deq - wd).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_gemm_matches_naive(dtype):
    x, w = linear_case(dtype)
    x[4] = 0  # an all-zero activation row
    w_fp8, w_scale = reference.quantize_fp8(w)
    out = reference.fp8_gemm(x, w_fp8, w_scale)
    assert out.dtype == dtype
    # Per-token quantisation, written out row by row.
    want = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for row in range(x.shape[0]):
        amax = x[row].double().abs().max().item()
        x_scale = max(amax / 448, torch.finfo(torch.float32).tiny)
        x_q = (x[row].float() / x_scale).to(torch.float8_e4m3fn).double()
        want[row] = (w_fp8.double() @ x_q) * x_scale * w_scale.double()
    assert_within_lowp_error(out, want, want.to(dtype))
    # And the fp8 product stays close to the exact one.
    exact = x.double() @ w.double().T
    assert ((out.double() - exact).abs() <= 0.15 * (x.double().abs() @ w.double().abs().T)).all()


# ------------------------------------------------------------------------------------------------
# 2:4 sparsity
# ------------------------------------------------------------------------------------------------


def naive_prune_24(w, scores):
    out = torch.zeros_like(w)
    for row in range(w.shape[0]):
        for g in range(w.shape[1] // 4):
            cols = range(4 * g, 4 * g + 4)
            keep = sorted(cols, key=lambda c: (-scores[row][c], c))[:2]
            for c in keep:
                out[row, c] = w[row, c]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prune_24_magnitude(dtype):
    w = torch.randn(9, 36, dtype=dtype)
    pruned = reference.prune_24(w)
    assert pruned.dtype == dtype
    assert torch.equal(pruned, naive_prune_24(w, w.float().abs().tolist()))
    assert ((pruned != 0).reshape(9, -1, 4).sum(-1) == 2).all()


def test_prune_24_ties_keep_lower_columns():
    base = torch.rand(6, 8, 1) + 0.1
    signs = torch.randint(0, 2, (6, 8, 4)) * 2 - 1
    w = (base * signs).reshape(6, 32)  # all four magnitudes of a group tie
    pruned = reference.prune_24(w)
    kept = (pruned != 0).reshape(6, 8, 4)
    assert kept[..., :2].all() and not kept[..., 2:].any()


def test_prune_24_wanda_uses_activation_norm():
    w = torch.randn(16, 64)
    # Feature norms spanning orders of magnitude, so Wanda must disagree with magnitude.
    act_norm = torch.rand(64) * torch.logspace(-2, 2, 64)[torch.randperm(64)]
    pruned = reference.prune_24(w, "wanda", act_norm)
    scores = (w.abs() * act_norm[None, :]).tolist()
    assert torch.equal(pruned, naive_prune_24(w, scores))
    assert not torch.equal(pruned, reference.prune_24(w, "magnitude"))


def naive_compress_24(w):
    values, meta = [], []
    for row in w.tolist():
        row_values, row_meta = [], []
        for g in range(len(row) // 4):
            group = row[4 * g:4 * g + 4]
            nonzero = [i for i in range(4) if group[i] != 0]
            zero = [i for i in range(4) if group[i] == 0]
            i0, i1 = sorted((nonzero + zero)[:2])
            row_values += [group[i0], group[i1]]
            row_meta.append(i0 | i1 << 2)
        values.append(row_values)
        meta.append(row_meta)
    return torch.tensor(values, dtype=w.dtype), torch.tensor(meta, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compress_24_layout_and_round_trip(dtype):
    w = reference.prune_24(torch.randn(7, 40, dtype=dtype))
    # Groups with one and with no nonzero.
    w[0, 0:4] = torch.tensor([0, 0, 0, 1.5], dtype=dtype)
    w[1, 8:12] = 0
    values, metadata = reference.compress_24(w)
    want_values, want_meta = naive_compress_24(w)
    assert values.dtype == dtype and metadata.dtype == torch.uint8
    assert torch.equal(values, want_values) and torch.equal(metadata, want_meta)
    i0, i1 = metadata & 3, (metadata >> 2) & 3
    assert (i0 < i1).all() and (metadata >> 4 == 0).all()
    assert torch.equal(reference.decompress_24(values, metadata), w)


def test_decompress_24_equal_positions_add():
    """Malformed metadata is still in bounds, and behaves as the GEMM's sum would."""
    values = torch.randn(3, 4, dtype=torch.float64)
    metadata = torch.tensor([[1 | 1 << 2, 0 | 3 << 2]] * 3, dtype=torch.uint8)
    dense = reference.decompress_24(values, metadata)
    torch.testing.assert_close(dense[:, 1], values[:, 0] + values[:, 1])
    torch.testing.assert_close(dense[:, 4], values[:, 2])
    torch.testing.assert_close(dense[:, 7], values[:, 3])
    assert (dense[:, [0, 2, 3, 5, 6]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sparse24_gemm_matches_dense(dtype):
    x = torch.randn(17, 64, dtype=dtype)
    w = reference.prune_24(torch.randn(24, 64, dtype=dtype))
    values, metadata = reference.compress_24(w)
    out = reference.sparse24_gemm(x, values, metadata)
    assert out.dtype == dtype
    assert_within_lowp_error(out, x.double() @ w.double().T, x @ w.T)


# ------------------------------------------------------------------------------------------------
# Dense linear layers
# ------------------------------------------------------------------------------------------------


def naive_linear(x, w, b):
    """Each output a float64 dot product of one row of x and one row of w, plus its bias."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            out[i, j] = sum(float(a) * float(c) for a, c in zip(x[i], w[j], strict=True))
            out[i, j] += 0.0 if b is None else float(b[j])
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_naive(dtype, with_bias):
    x, w = torch.randn(3, 24, dtype=dtype), torch.randn(5, 24, dtype=dtype)
    b = torch.randn(5, dtype=dtype) if with_bias else None
    # One rounding of the float32 sum: the exact result rounded, but for float32 ties.
    assert_matches_reference(reference.skinny_linear(x, w, b), naive_linear(x, w, b).to(dtype))


def test_skinny_linear_silu_and_mul_rounds_the_hidden_input():
    """The fused activation is silu_and_mul's output, rounded to the dtype, then the GEMM."""
    gate_up, w = torch.randn(2, 32, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    hidden = (torch.nn.functional.silu(gate_up[:, :16].float()) * gate_up[:, 16:].float())
    hidden = hidden.to(torch.bfloat16)
    want = reference.skinny_linear(hidden, w)
    assert torch.equal(reference.skinny_linear(gate_up, w, activation="silu_and_mul"), want)
