"""The attention references against an independent naive formulation.

The naive side works in float64 with explicit loops over sequence, head and query row: each row
collects its visible keys one by one from the masking rules as the contract states them, then
takes a plain softmax. Paged caches are filled here by loops from "logical" per-sequence keys
that the naive side reads directly, so the reference's own indexing is checked, not reused.
"""

import math

import pytest
import torch

from ember.ops import reference

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------
# The naive formulation
# ----------------------------------------------------------------------------------------------

def contract_rule(seqlen_q, seqlen_k, causal=False, window=(-1, -1)):
    """Predicate sees(i, j), written from the contract: bottom-right alignment."""
    left, right = window

    def sees(i, j):
        position = i + seqlen_k - seqlen_q
        if causal and j > position:
            return False
        if left >= 0 and j < position - left:
            return False
        return not (right >= 0 and j > position + right)

    return sees


def naive_attention(q, keys, values, scale, sees):
    """q ``[sq, hq, d]``, keys/values ``[sk, hkv, d]``; float64 loops.

    Returns out ``[sq, hq, d]`` and lse ``[hq, sq]``; rows with no visible key stay 0 / -inf.
    """
    q, keys, values = q.double(), keys.double(), values.double()
    seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv, _ = keys.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((heads_q, seqlen_q), -math.inf, dtype=torch.float64)
    for h in range(heads_q):
        kv_head = h * heads_kv // heads_q  # which kv head this query head shares
        for i in range(seqlen_q):
            seen = [j for j in range(seqlen_k) if sees(i, j)]
            if not seen:
                continue
            logits = torch.stack([scale * torch.dot(q[i, h], keys[j, kv_head]) for j in seen])
            peak = logits.max()
            weights = torch.exp(logits - peak)
            lse[h, i] = peak + torch.log(weights.sum())
            probs = weights / weights.sum()
            out[i, h] = sum(p * values[j, kv_head] for p, j in zip(probs, seen, strict=True))
    return out, lse


def assert_lse_equal(got, want, atol):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "lse -inf rows differ"
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=0)


def assert_out_equal(got, want, atol):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=atol, rtol=0)


# float64 inputs must match the naive float64 loops to rounding; float32 inputs to float32's.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# flash_attn_func
# ----------------------------------------------------------------------------------------------

MASKS = [
    (False, (-1, -1)), (True, (-1, -1)), (False, (4, 0)), (False, (2, 3)), (True, (3, -1)),
    (False, (-1, 2)), (False, (0, 0)),
]


@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads_q,heads_kv,head_dim", [
    (2, 5, 17, 9, 3, 16),   # sq < sk, GQA 9:3
    (2, 17, 5, 8, 1, 8),    # sq > sk: early rows see nothing when causal; MQA 8:1
    (1, 1, 33, 4, 4, 32),   # decode-like
    (3, 13, 13, 6, 2, 16),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_attn_func_matches_naive(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
                                       causal, window, dtype):
    q = randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype)
    k = randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    v = randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    scale = 0.3 if causal else None
    out, lse = reference.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                         window_size=window, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (batch, heads_q, seqlen_q)
    sees = contract_rule(seqlen_q, seqlen_k, causal, window)
    for b in range(batch):
        want_out, want_lse = naive_attention(q[b], k[b], v[b], scale or head_dim ** -0.5, sees)
        assert_out_equal(out[b], want_out, ATOL[dtype])
        assert_lse_equal(lse[b], want_lse, 2e-5)  # lse is float32 by contract


def test_rows_that_see_nothing_are_zero_with_neg_inf_lse():
    # Causal with sq=8 > sk=3: row i sits at key i - 5, so rows 0..4 see no key at all.
    q, k, v = randn(1, 8, 2, 16), randn(1, 3, 2, 16), randn(1, 3, 2, 16)
    out, lse = reference.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isneginf(lse[..., :5]).all()
    assert torch.isfinite(lse[..., 5:]).all() and not torch.isnan(out).any()
    # A window that excludes the diagonal's only key: left=0, right=0 with sk < sq.
    out, lse = reference.flash_attn_func(q, k, v, window_size=(0, 0), return_lse=True)
    assert torch.isneginf(lse[..., :5]).all() and torch.isfinite(lse[..., 5:]).all()


def test_causal_equals_right_window_zero():
    q, k, v = randn(2, 6, 4, 16), randn(2, 11, 2, 16), randn(2, 11, 2, 16)
    for left in (-1, 3):
        a = reference.flash_attn_func(q, k, v, causal=True, window_size=(left, -1))
        b = reference.flash_attn_func(q, k, v, window_size=(left, 0))
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# flash_attn_varlen_func (packed and paged)
# ----------------------------------------------------------------------------------------------

def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def paged_from_logical(logical, block_size, dtype=None, reserve=0, capacity=None):
    """Scatter per-sequence ``[len, h, d]`` tensors into a paged cache with a shuffled table.

    Each row gets real blocks for its tokens plus ``reserve`` more (room to append); rows hold
    ``capacity`` tokens (default: the longest sequence plus a spare block). Unused slots hold
    random values and unused table entries an out-of-range block id, so reading either shows.
    Returns (cache, block_table).
    """
    heads, head_dim = logical[0].shape[1:]
    longest = max(t.shape[0] for t in logical) + reserve
    max_blocks = math.ceil((capacity or longest + block_size) / block_size)
    num_blocks = len(logical) * max_blocks + 3
    cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype or logical[0].dtype)
    order = torch.randperm(num_blocks).tolist()
    table = torch.full((len(logical), max_blocks), 10**6, dtype=torch.int32)
    for b, seq in enumerate(logical):
        for i in range(math.ceil((seq.shape[0] + reserve) / block_size)):
            table[b, i] = order.pop()
        for p in range(seq.shape[0]):
            cache[table[b, p // block_size], p % block_size] = seq[p].to(cache.dtype)
    return cache, table


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (False, (3, 1)), (True, (5, -1))])
@pytest.mark.parametrize("heads_q,heads_kv", [(9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [None, 16, 32])
def test_varlen_matches_naive(causal, window, heads_q, heads_kv, block_size):
    # Lengths include 1, 0 queries, 0 keys (rows that see nothing) and sq > sk / sq < sk.
    lens_q = [1, 0, 17, 5, 3, 6]
    lens_k = [1, 4, 17, 40, 0, 2]
    head_dim = 16
    q = randn(sum(lens_q), heads_q, head_dim)
    keys = [randn(n, heads_kv, head_dim) for n in lens_k]
    values = [randn(n, heads_kv, head_dim) for n in lens_k]
    cu_q, cu_k = cumulative(lens_q), cumulative(lens_k)
    if block_size is None:
        k, v, table = torch.cat(keys), torch.cat(values), None
    else:
        k, table = paged_from_logical(keys, block_size)
        # Same table for v: scatter values through it by hand.
        v = torch.randn(k.shape, dtype=k.dtype)
        for b, seq in enumerate(values):
            for p in range(seq.shape[0]):
                v[table[b, p // block_size], p % block_size] = seq[p]
    out, lse = reference.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window,
        return_lse=True, block_table=table)
    assert out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
    for b, (sq, sk) in enumerate(zip(lens_q, lens_k, strict=True)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        want_out, want_lse = naive_attention(q[rows], keys[b], values[b], head_dim ** -0.5,
                                             contract_rule(sq, sk, causal, window))
        assert_out_equal(out[rows], want_out, 1e-10)
        assert_lse_equal(lse[:, rows], want_lse, 2e-5)


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ----------------------------------------------------------------------------------------------

def random_tree_mask(size):
    """Ancestor-or-self mask of a random tree whose node i has a parent among 0..i-1."""
    parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, size)]
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        node = i
        while node >= 0:
            mask[i, node] = True
            node = parents[node]
    return mask


def tree_rule(seqlen_q, seqlen_k, tree, window):
    """Predicate from the tree-mask contract: the prefix is visible, the tree decides among the
    last seqlen_q keys, the window applies by position."""
    by_position = contract_rule(seqlen_q, seqlen_k, False, window)
    prefix = seqlen_k - seqlen_q

    def sees(i, j):
        return by_position(i, j) and (j < prefix or bool(tree[i, j - prefix]))

    return sees


def build_cache(logical, layout, capacity, dtype, reserve):
    """A cache holding ``logical[b]`` as sequence b's first tokens, with room for ``reserve``
    more: contiguous ``[b, capacity, h, d]`` (layout "contiguous") or paged with block size
    ``layout`` and rows of ``capacity`` tokens. Returns (cache, block_table or None)."""
    if layout != "contiguous":
        return paged_from_logical(logical, layout, dtype, reserve, capacity)
    heads, head_dim = logical[0].shape[1:]
    cache = torch.randn(len(logical), capacity, heads, head_dim).to(dtype)
    for b, seq in enumerate(logical):
        cache[b, :seq.shape[0]] = seq.to(dtype)
    return cache, None


def cache_location(b, position, table, block_size):
    if table is None:
        return b, position
    return int(table[b, position // block_size]), position % block_size


@pytest.mark.parametrize("layout", ["contiguous", 16, 32])
@pytest.mark.parametrize("num_new", [0, 1, 4])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "tree", "tree+window"])
@pytest.mark.parametrize("heads_q,heads_kv", [(9, 3), (4, 1)])
def test_kvcache_matches_naive(layout, num_new, mask, heads_q, heads_kv):
    batch, head_dim, capacity = 3, 16, 32
    seqlen_q = num_new if num_new else 3
    cached = [0 if num_new else 4, 7, 21]
    logical_k = [randn(n, heads_kv, head_dim) for n in cached]
    logical_v = [randn(n, heads_kv, head_dim) for n in cached]
    k_cache, table = build_cache(logical_k, layout, capacity, torch.float64, num_new)
    v_cache = torch.randn(k_cache.shape, dtype=torch.float64)
    block_size = k_cache.shape[1]
    for b, seq in enumerate(logical_v):
        for p in range(seq.shape[0]):
            v_cache[cache_location(b, p, table, block_size)] = seq[p]
    q = randn(batch, seqlen_q, heads_q, head_dim)
    k_new = randn(batch, num_new, heads_kv, head_dim) if num_new else None
    v_new = randn(batch, num_new, heads_kv, head_dim) if num_new else None
    tree = torch.stack([random_tree_mask(seqlen_q) for _ in range(batch)])
    causal = mask == "causal"
    window = {"window": (5, 0), "tree+window": (2, -1)}.get(mask, (-1, -1))
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out, lse = reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(cached, dtype=torch.int32),
        block_table=table, causal=causal, window_size=window, return_lse=True,
        tree_mask=tree if mask.startswith("tree") else None)

    for b in range(batch):
        keys = torch.cat([logical_k[b], k_new[b]]) if num_new else logical_k[b]
        values = torch.cat([logical_v[b], v_new[b]]) if num_new else logical_v[b]
        total = keys.shape[0]
        if mask.startswith("tree"):
            sees = tree_rule(seqlen_q, total, tree[b], window)
        else:
            sees = contract_rule(seqlen_q, total, causal, window)
        want_out, want_lse = naive_attention(q[b], keys, values, head_dim ** -0.5, sees)
        assert_out_equal(out[b], want_out, 1e-10)
        assert_lse_equal(lse[b], want_lse, 2e-5)
        # The new tokens went to positions cached..cached+num_new-1, and nothing else changed.
        for t in range(num_new):
            where = cache_location(b, cached[b] + t, table, block_size)
            k_before[where], v_before[where] = k_new[b, t], v_new[b, t]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@pytest.mark.parametrize("layout", ["contiguous", 16])
def test_kvcache_int_and_none_seqlens(layout):
    batch, heads, head_dim, capacity = 2, 2, 16, 32
    logical = [randn(capacity, heads, head_dim) for _ in range(batch)]
    k_cache, table = build_cache(logical, layout, capacity, torch.float64, 0)
    v_cache = randn(*k_cache.shape)
    q = randn(batch, 2, heads, head_dim)
    # None: every cached token is valid (the full capacity).
    got = reference.flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table, causal=True)
    as_tensor = reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.full((batch,), capacity, dtype=torch.int32),
        block_table=table, causal=True)
    assert torch.equal(got, as_tensor)
    # An int is the same length for every sequence.
    got = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=11,
                                            block_table=table)
    for b in range(batch):
        keys = torch.stack([k_cache[cache_location(b, p, table, k_cache.shape[1])]
                            for p in range(11)])
        values = torch.stack([v_cache[cache_location(b, p, table, k_cache.shape[1])]
                              for p in range(11)])
        want, _ = naive_attention(q[b], keys, values, head_dim ** -0.5, contract_rule(2, 11))
        assert_out_equal(got[b], want, 1e-10)


def quantize_e4m3(x, scale):
    return (x / scale).clamp(-448, 448).to(FP8)


@pytest.mark.parametrize("layout", ["contiguous", 16])
@pytest.mark.parametrize("num_new", [0, 3])
def test_kvcache_fp8_matches_naive(layout, num_new):
    batch, heads_q, heads_kv, head_dim, capacity = 2, 4, 2, 16, 48
    cached = [5, 30]
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.5])
    # Values well beyond ±448 * scale so that the append saturates some of them.
    logical_k = [quantize_e4m3(randn(n, heads_kv, head_dim, dtype=torch.float32) * 5, k_scale)
                 for n in cached]
    logical_v = [quantize_e4m3(randn(n, heads_kv, head_dim, dtype=torch.float32), v_scale)
                 for n in cached]
    k_cache, table = build_cache(logical_k, layout, capacity, FP8, num_new)
    v_cache = torch.randn(k_cache.shape).to(FP8)
    block_size = k_cache.shape[1]
    for b, seq in enumerate(logical_v):
        for p in range(seq.shape[0]):
            v_cache[cache_location(b, p, table, block_size)] = seq[p]
    q = randn(batch, max(num_new, 1), heads_q, head_dim, dtype=torch.float32)
    k_new = randn(batch, num_new, heads_kv, head_dim, dtype=torch.float32) * 5 if num_new else None
    v_new = randn(batch, num_new, heads_kv, head_dim, dtype=torch.float32) if num_new else None

    out, lse = reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(cached, dtype=torch.int32),
        block_table=table, causal=True, return_lse=True, k_scale=k_scale, v_scale=v_scale)

    for b in range(batch):
        stored_k, stored_v = logical_k[b], logical_v[b]
        if num_new:
            stored_k = torch.cat([stored_k, quantize_e4m3(k_new[b], k_scale)])
            stored_v = torch.cat([stored_v, quantize_e4m3(v_new[b], v_scale)])
            for t in range(num_new):
                where = cache_location(b, cached[b] + t, table, block_size)
                assert torch.equal(k_cache[where].view(torch.uint8),
                                   stored_k[cached[b] + t].view(torch.uint8))
        keys = stored_k.double() * k_scale.double()
        values = stored_v.double() * v_scale.double()
        want_out, want_lse = naive_attention(q[b], keys, values, head_dim ** -0.5,
                                             contract_rule(q.shape[1], keys.shape[0], True))
        assert_out_equal(out[b], want_out, 2e-5)
        assert_lse_equal(lse[b], want_lse, 2e-5)


def test_random_tree_mask_is_a_tree():
    """The test's own tree generator: every row contains itself and the root, and only earlier
    nodes (a topological order), so the tree rule never looks at later tokens."""
    mask = random_tree_mask(9)
    assert mask.diagonal().all() and mask[:, 0].all()
    assert not torch.triu(mask, diagonal=1).any()


# ----------------------------------------------------------------------------------------------
# merge_attn_states
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_equals_attention_over_the_union(dtype):
    seqlen_q, seqlen_k, heads, head_dim = 7, 12, 3, 16
    q, k, v = randn(seqlen_q, heads, head_dim), randn(seqlen_k, heads, head_dim), \
        randn(seqlen_k, heads, head_dim)
    in_a = torch.rand(seqlen_q, seqlen_k) < 0.4
    in_b = (torch.rand(seqlen_q, seqlen_k) < 0.5) & ~in_a
    in_a[0], in_b[0] = False, False           # row 0: no key on either side
    in_a[1], in_b[1, 0] = False, True         # row 1: B only
    in_b[2], in_a[2, 0] = False, True         # row 2: A only
    scale = head_dim ** -0.5
    out_a, lse_a = naive_attention(q, k, v, scale, lambda i, j: bool(in_a[i, j]))
    out_b, lse_b = naive_attention(q, k, v, scale, lambda i, j: bool(in_b[i, j]))
    want_out, want_lse = naive_attention(q, k, v, scale, lambda i, j: bool(in_a[i, j] | in_b[i, j]))
    out, lse = reference.merge_attn_states(out_a.to(dtype), lse_a.float(), out_b.to(dtype),
                                           lse_b.float())
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads, seqlen_q)
    assert_out_equal(out, want_out, 2e-6)  # the lse inputs are float32
    assert_lse_equal(lse, want_lse, 2e-6)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


# ----------------------------------------------------------------------------------------------
# upcast=False: the same math in the input dtype
# ----------------------------------------------------------------------------------------------

# Unit roundoff of each dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def assert_within_rounding(lowp, upcast, dtype, magnitude, ulps=4):
    """``lowp`` differs from the upcast result by rounding in ``dtype``, but it does differ:
    it really ran in low precision."""
    err = (lowp.double() - upcast.double()).abs().max().item()
    assert err <= ulps * UNIT_ROUNDOFF[dtype] * magnitude, (err, magnitude)
    assert not torch.equal(lowp, upcast.to(dtype)), "upcast=False should round like the dtype"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_false_is_within_rounding(dtype):
    q, k, v = (randn(2, 33, 4, 32).to(dtype), randn(2, 65, 2, 32).to(dtype),
               randn(2, 65, 2, 32).to(dtype))
    magnitude = v.abs().max().item()
    for causal in (False, True):
        up, up_lse = reference.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        low, low_lse = reference.flash_attn_func(q, k, v, causal=causal, return_lse=True,
                                                 upcast=False)
        assert low.dtype == dtype
        assert_within_rounding(low, up, dtype, magnitude)
        # lse magnitude is a few units: its rounding error scales with it.
        assert (low_lse - up_lse).abs().max() <= 4 * UNIT_ROUNDOFF[dtype] * up_lse.abs().max()

    cu = cumulative([5, 28])
    up = reference.flash_attn_varlen_func(q[0], k[0], v[0], cu, cumulative([20, 45]), 28, 45,
                                          causal=True)
    low = reference.flash_attn_varlen_func(q[0], k[0], v[0], cu, cumulative([20, 45]), 28, 45,
                                           causal=True, upcast=False)
    assert_within_rounding(low, up, dtype, magnitude)

    k_cache, v_cache = k.clone(), v.clone()
    up = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=40, causal=True)
    low = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=40, causal=True,
                                            upcast=False)
    assert_within_rounding(low, up, dtype, magnitude)

    out_a, lse_a = reference.flash_attn_func(q, k[:, :30], v[:, :30], return_lse=True)
    out_b, lse_b = reference.flash_attn_func(q, k[:, 30:], v[:, 30:], return_lse=True)
    merge_args = (out_a[0], lse_a[0], out_b[0], lse_b[0])
    up, _ = reference.merge_attn_states(*merge_args)
    low, _ = reference.merge_attn_states(*merge_args, upcast=False)
    assert_within_rounding(low, up, dtype, magnitude)
