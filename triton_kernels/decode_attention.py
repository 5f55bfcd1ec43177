"""flash_attn_with_kvcache in Triton: Flash-Decoding over contiguous and paged KV caches.

One program per (query-row block, batch * kv head, KV split). The program owns every query head
of its KV head (GQA packing): the ``group = heads_q / heads_kv`` heads times ``seqlen_q``
positions are the rows of one ``tl.dot`` tile (row ``r`` is query position ``r // group`` of
head ``kv_head * group + r % group``), so each K/V tile is read from memory once per KV head.
It streams its share of the sequence's KV tiles with an online softmax and writes either the
final output and LSE (one split) or a float32 partial output and LSE to a workspace that
``_merge_splits_kernel`` folds together with the math of ``merge_attn_states``.

Contiguous caches ``[batch, max_len, heads_kv, d]`` and paged caches ``[num_blocks, block_size,
heads_kv, d]`` share the kernel: ``PAGED`` only changes where key ``j`` lives (row ``j`` of the
sequence's slab, or row ``j % block_size`` of block ``block_table[b, j // block_size]``), so a
tile may span several pages. fp8 caches are widened to the query dtype in registers; their
scalar scales are folded into the softmax scale (K) and the final normalisation (V).

Traffic per call: K+V bytes of the attended keys, plus, with S > 1 splits, S float32 partial
outputs per query row written and read once more.
"""

import math

import torch
import triton
import triton.language as tl

from ember.ops._split_kv import plan_splits, sm_count
from ember.triton_kernels.merge_attn_states import finish_states, fold_states

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Split states merged per step: 32 x d float32 per program stays in registers.
MERGE_BLOCK_S = 32


@triton.jit
def _kvcache_attn_kernel(
    Q, K_CACHE, V_CACHE, SEQLENS, BLOCK_TABLE, TREE_MASK, K_SCALE, V_SCALE, OUT, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb, stride_tmb, stride_tmq, stride_tmk,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lh,
    heads_kv, seqlen_q, group, capacity,
    softmax_scale, window_left, window_right, num_splits, unsplit_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, TREE: tl.constexpr, FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // heads_kv
    kv_head = pid_bh % heads_kv
    b64 = b.to(tl.int64)

    # Lengths past the cache are clamped: unchecked inside CUDA graphs, they must not become
    # reads past the cache.
    seqlen_k = tl.minimum(tl.load(SEQLENS + b), capacity)
    # Query row i sits on key i + diag (bottom-right alignment of causal masks and windows).
    diag = seqlen_k - seqlen_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qpos = rows // group
    head = kv_head * group + rows % group
    row_ok = qpos < seqlen_q
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + qpos[:, None] * stride_qs + head[:, None] * stride_qh
                + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    # Keys any row of this block may see; tiles outside are never loaded.
    first_q = pid_m * BLOCK_M // group
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, seqlen_q - 1)
    lo = 0
    hi = seqlen_k
    if WINDOW_LEFT:
        lo = tl.maximum(first_q + diag - window_left, 0)
    if WINDOW_RIGHT:
        hi = tl.minimum(last_q + diag + window_right + 1, seqlen_k)
    tile_lo = lo // BLOCK_N
    num_tiles = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N - tile_lo, 0)
    # The partition rule of ember.ops._split_kv, applied to this sequence's own tiles.
    per_split = tl.where(num_tiles <= unsplit_tiles, num_tiles,
                         (num_tiles + num_splits - 1) // num_splits)
    t_begin = tile_lo + split * per_split
    t_end = tl.minimum(t_begin + per_split, tile_lo + num_tiles)

    # Scores in log2 units: exp2 is the native instruction. An fp8 K scale is a common factor.
    qk_scale = softmax_scale * LOG2E
    if FP8:
        qk_scale = qk_scale * tl.load(K_SCALE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = K_CACHE + kv_head * stride_kh
    v_head = V_CACHE + kv_head * stride_vh
    table_row = BLOCK_TABLE + b64 * stride_btb
    if PAGED:
        first_keys = t_begin * BLOCK_N + tl.arange(0, BLOCK_N)
        page = tl.load(table_row + first_keys // PAGE_SIZE, mask=first_keys < seqlen_k, other=0)
    for t in range(t_begin, t_end):
        keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < seqlen_k
        if PAGED:
            k_rows = page.to(tl.int64) * stride_kb + (keys % PAGE_SIZE) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (keys % PAGE_SIZE) * stride_vs
            next_keys = keys + BLOCK_N
            page = tl.load(table_row + next_keys // PAGE_SIZE, mask=next_keys < seqlen_k,
                           other=0)
        else:
            k_rows = b64 * stride_kb + keys.to(tl.int64) * stride_ks
            v_rows = b64 * stride_vb + keys.to(tl.int64) * stride_vs
        kv_ok = key_ok[:, None] & col_ok[None, :]
        k = tl.load(k_head + k_rows[:, None] + cols[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + cols[None, :], mask=kv_ok, other=0.0)
        if FP8:
            k = k.to(Q.dtype.element_ty)
            v = v.to(Q.dtype.element_ty)

        s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = key_ok[None, :] & row_ok[:, None]
        if WINDOW_LEFT:
            visible &= keys[None, :] >= qpos[:, None] + diag - window_left
        if WINDOW_RIGHT:
            visible &= keys[None, :] <= qpos[:, None] + diag + window_right
        if TREE:
            # The last seqlen_q keys are the new (tree) tokens; the cached prefix is always seen.
            node = keys - diag
            in_tree = (node >= 0) & key_ok
            allowed = tl.load(TREE_MASK + b64 * stride_tmb + qpos[:, None] * stride_tmq
                              + node[None, :] * stride_tmk,
                              mask=row_ok[:, None] & in_tree[None, :], other=1)
            visible &= allowed != 0
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no key its max is -inf; 0 stands in so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(seen, (m_ref + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                   float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(V_SCALE)
    split64 = split.to(tl.int64)
    tl.store(OUT + split64 * stride_os + b64 * stride_ob + qpos[:, None] * stride_oq
             + head[:, None] * stride_oh + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(LSE + split64 * stride_ls + b64 * stride_lb + head * stride_lh + qpos, lse,
             mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    OUT_PART, LSE_PART, OUT, LSE,
    stride_ps, stride_pb, stride_pq, stride_ph,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_oq, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (batch * query position, query head). The splits' partial states are
    # loaded BLOCK_S at a time, so their loads overlap instead of queueing one after another.
    row = tl.program_id(0)
    head = tl.program_id(1)
    b = (row // seqlen_q).to(tl.int64)
    qpos = row % seqlen_q
    cols = tl.arange(0, BLOCK_D)
    ok = cols < HEAD_DIM
    part = OUT_PART + b * stride_pb + qpos * stride_pq + head * stride_ph
    part_lse = LSE_PART + b * stride_qb + head * stride_qh + qpos
    m, s, acc = float("-inf"), 0.0, tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        split = first + tl.arange(0, BLOCK_S)
        valid = split < num_splits
        lse = tl.load(part_lse + split * stride_qs, mask=valid, other=float("-inf"))
        o = tl.load(part + split[:, None].to(tl.int64) * stride_ps + cols[None, :],
                    mask=valid[:, None] & ok[None, :], other=0.0)
        m, s, acc = fold_states(m, s, acc, lse, o)
    out, lse = finish_states(m, s, acc)
    tl.store(OUT + b * stride_ob + qpos * stride_oq + head * stride_oh + cols,
             out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + b * stride_lb + head * stride_lh + qpos, lse)


def _tile_config(head_dim: int, packed_rows: int,
                 cache_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a head dim, group * seqlen_q rows and the
    cache's element size (2, or 1 for fp8)."""
    block_d = triton.next_power_of_2(head_dim)
    # tl.dot needs at least 16 rows; more than 64 packed rows go to further row blocks.
    block_m = min(64, max(16, triton.next_power_of_2(packed_rows)))
    # A K and a V tile (per pipeline stage) of 16 KB each: fp8 caches take twice the keys, at
    # most 128. (sm_90 SASS, Triton 3.9, d = 128: a paged fp8 tile of 64 keys took 2256
    # instructions, one of 128 keys 2768, 39% fewer per key; at 256 keys, d = 64 spilled.)
    block_n = min(16384 // (block_d * cache_bytes), 128)
    num_warps = 4 if block_d <= 128 else 8
    return block_m, block_n, block_d, num_warps


def flash_attn_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal,
                            window_left, window_right, num_splits, max_seqlen_k, tree_mask,
                            k_scale, v_scale):
    """Triton backend of ``ember.ops.flash_attn_with_kvcache`` (see ember.ops.attention for
    what the public function has already checked and resolved; new tokens are already in the
    cache, so this only reads it).

    q ``[batch, seqlen_q, heads_q, d]`` fp16/bf16; caches ``[batch, max_len, heads_kv, d]`` or
    ``[num_blocks, block_size, heads_kv, d]`` (with int32 ``block_table [batch, max_blocks]``)
    in q's dtype or float8_e4m3fn (with float32 one-element ``k_scale``/``v_scale``); int32
    ``seqlens_k [batch]`` keys per sequence; bool ``tree_mask [batch, seqlen_q, seqlen_q]`` or
    None; ``causal`` arrives as ``window_right == 0``; ``num_splits`` 0 for the shared
    heuristic. Returns ``(out [batch, seqlen_q, heads_q, d], lse float32 [batch, heads_q,
    seqlen_q])``.
    """
    del causal  # already folded into window_right by the public function
    del max_seqlen_k  # one tile shape per configuration here
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    group = heads_q // heads_kv
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]

    block_m, block_n, block_d, num_warps = _tile_config(head_dim, group * seqlen_q,
                                                        k_cache.element_size())
    m_blocks = math.ceil(group * seqlen_q / block_m)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    # Programs on fp8 caches measured slower one to an SM than two (see ONE_PER_SM_FILL; why
    # was not traced).
    plan = plan_splits(sm_count(q.device), batch, heads_kv, capacity, block_n,
                       num_splits=num_splits, m_blocks=m_blocks, alone_streams=not fp8)
    splits = plan.num_splits

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    if splits == 1:
        out_part, lse_part = out, lse
        part_strides = (0, *out.stride()[:3]), (0, *lse.stride()[:2])
    else:
        out_part = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, batch, heads_q, seqlen_q, dtype=torch.float32,
                               device=q.device)
        part_strides = out_part.stride()[:4], lse_part.stride()[:3]

    # Unused pointer arguments still need a tensor; the constexpr switches never read them.
    tree = tree_mask.view(torch.uint8) if tree_mask is not None else seqlens_k
    table = block_table if paged else seqlens_k
    _kvcache_attn_kernel[(m_blocks, batch * heads_kv, splits)](
        q, k_cache, v_cache, seqlens_k, table, tree,
        k_scale if fp8 else q, v_scale if fp8 else q, out_part, lse_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.stride(0) if paged else 0,
        *(tree_mask.stride() if tree_mask is not None else (0, 0, 0)),
        *part_strides[0], *part_strides[1],
        heads_kv, seqlen_q, group, capacity,
        softmax_scale, window_left, window_right, splits, plan.unsplit_tiles,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # A constant page size turns key // page and key % page into shifts (or a multiply)
        # instead of an integer division per key: the sm_90 SASS of the paged kernel (Triton
        # 3.9, d = 128, 64-key tiles) shrank from 2096 to 1704 instructions in bf16 and from
        # 2856 to 2256 in fp8 (contiguous: 1216 and 1664).
        PAGE_SIZE=k_cache.shape[1] if paged else 1, PAGED=paged,
        WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0,
        TREE=tree_mask is not None, FP8=fp8,
        num_warps=num_warps, num_stages=3,
    )
    if splits > 1:
        _merge_splits_kernel[(batch * seqlen_q, heads_q)](
            out_part, lse_part, out, lse,
            *out_part.stride()[:4], *lse_part.stride()[:3],
            *out.stride()[:3], *lse.stride()[:2],
            seqlen_q, splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=min(MERGE_BLOCK_S, max(2, triton.next_power_of_2(splits))),
        )
    return out, lse
