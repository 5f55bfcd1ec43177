"""FlashAttention-2 forward in Triton: ``flash_attn`` (fixed length) and ``flash_attn_varlen``.

One kernel body serves both layouts. A program owns one tile of ``BLOCK_M`` query rows of one
(sequence, query head) and streams the K/V tiles of that sequence's kv head (GQA: query head
``h`` reads kv head ``h // (heads_q // heads_kv)``; nothing is repeated) with the online softmax
of FlashAttention-2: the running max and sum live in registers, the exponentials are ``exp2``
with ``softmax_scale * log2(e)`` folded into one multiply-add, and the output is divided by the
sum once at the end. The key range of a tile is computed from the mask rules (bottom-right
aligned causal / sliding window, see ``ember.ops.attention``), so fully masked K/V tiles are
never loaded, and it is split into three loops: masked tiles at the window's left edge, unmasked
tiles in the middle (no mask, no bounds check: the hot loop), masked tiles at the right edge
(the causal diagonal, the window's right edge and the partial last tile). Rows that see no key
get zeros and ``lse = -inf``.

Inputs may have any token/head/batch strides with a contiguous head dim (q, k, v sliced out of
a fused QKV projection work as is). Head dims 64, 128, 256 run unpadded; 96 is padded to a
128-wide tile with masked loads.

Paged varlen (``block_table``): k/v are caches ``[num_blocks, page_size, heads_kv, d]`` and key
j of sequence b lives at slot ``j % page_size`` of block ``block_table[b, j // page_size]``. The
only difference is in the K/V tile loads: each tile reads its keys' block numbers (one int32
per key, from L1/L2 after the first program) and gathers rows, so one launch covers a batch of
prompt chunks over a paged cache. Any page size works; a tile may span several pages.

FLOPs (for TFLOP/s): ``4 * batch * heads_q * seqlen_q * seqlen_k * head_dim`` (QK^T and PV, two
multiply-adds per element each), halved for causal with ``seqlen_q == seqlen_k``; for varlen,
the sum of the per-sequence terms. The kernel skips exactly the fully masked tiles, so the
work done tracks these formulas up to the diagonal tiles.
"""

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, rows, num_rows, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile, masking only what can actually be out of range."""
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=(rows < num_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < num_rows)[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _tile_pages(keys, seqlen_k, bt_row, page_size, MASKED: tl.constexpr):
    """Paged caches: the block (int64) and slot of each key of a tile; keys past the sequence
    read block 0 and are masked out by the tile loads."""
    if MASKED:
        blocks = tl.load(bt_row + keys // page_size, mask=keys < seqlen_k, other=0)
    else:
        blocks = tl.load(bt_row + keys // page_size)
    return blocks.to(tl.int64), keys % page_size


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kb, stride_kn, stride_vb, stride_vn,
                 bt_row, page_size, start, end,
                 rows, cols, d_ok, seqlen_k, diag, window_left, window_right, qk_scale,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 EVEN_D: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold keys ``[start, end)`` (``start`` a multiple of BLOCK_N) into the running state.

    ``m_i`` is the running row max of the scores in log2 units (already scaled), ``l_i`` the
    running sum of ``exp2(score - m_i)``, ``acc`` the unnormalised output. ``k_ptrs``/``v_ptrs``
    address the tile's first key (contiguous) or the head's base (paged).
    """
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + cols
        # 64-bit offsets of the tile's rows: they may pass 2**31 on long sequences or caches.
        if PAGED:
            blocks, slots = _tile_pages(keys, seqlen_k, bt_row, page_size, MASKED)
            k_offsets = (blocks * stride_kb + slots * stride_kn)[:, None]
            v_offsets = (blocks * stride_vb + slots * stride_vn)[:, None]
        else:
            k_offsets = tl.cast(start_n, tl.int64) * stride_kn
            v_offsets = tl.cast(start_n, tl.int64) * stride_vn
        k = _load_tile(k_ptrs + k_offsets, keys, seqlen_k, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            visible = keys[None, :] < seqlen_k
            if HAS_LEFT:
                visible = visible & (keys[None, :] >= rows[:, None] + (diag - window_left))
            if HAS_RIGHT:
                visible = visible & (keys[None, :] <= rows[:, None] + (diag + window_right))
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet still has m = -inf: shift it by 0 instead, so its
            # exponentials are exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - shift[:, None])
        else:
            # Every score here is finite, so the new max is finite and needs no guard.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            shift = m_new
            p = tl.math.exp2(qk * qk_scale - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + v_offsets, keys, seqlen_k, d_ok, MASKED, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# Strides and sizes that vary between calls are not specialised (no recompile per length);
# head/token strides keep Triton's divisible-by-16 specialisation, which vectorises the loads.
@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "group",
                               "window_left", "window_right", "len_bucket_q", "len_bucket_k",
                               "stride_btb"])
def _flash_attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, BlockTable, stride_btb, page_size,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, window_left, window_right,
    len_bucket_q, len_bucket_k,  # autotuning keys only (length buckets), unused in the body
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, PAGED: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Query tiles launch last-first: with a causal mask the last tiles of a sequence are the
    # longest, and starting them first shortens the tail of the grid.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    if VARLEN:
        q_first = tl.load(cu_seqlens_q + batch)
        k_first = tl.load(cu_seqlens_k + batch)
        seqlen_q = tl.load(cu_seqlens_q + batch + 1) - q_first
        seqlen_k = tl.load(cu_seqlens_k + batch + 1) - k_first
        # 64-bit row offsets: total_tokens * row stride may exceed 2**31 elements.
        q_seq = q_first.to(tl.int64) * stride_qm
        if PAGED:  # keys are found through the block table, tile by tile
            k_seq = 0
            v_seq = 0
        else:
            k_seq = k_first.to(tl.int64) * stride_kn
            v_seq = k_first.to(tl.int64) * stride_vn
        o_seq = q_first.to(tl.int64) * stride_om
        l_seq = q_first.to(tl.int64)
    else:
        b = batch.to(tl.int64)
        q_seq = b * stride_qb
        k_seq = b * stride_kb
        v_seq = b * stride_vb
        o_seq = b * stride_ob
        l_seq = b * stride_lb
    m_first = start_m * BLOCK_M
    if m_first >= seqlen_q:  # varlen: this sequence is shorter than max_seqlen_q
        return
    kv_head = head // group

    # Key range of this tile from the mask rules; row i sees keys
    # [i + diag - window_left, i + diag + window_right] (each side only if bounded).
    diag = seqlen_k - seqlen_q
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m_first + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m_last + diag - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(m_last + diag + window_right + 1, seqlen_k)
        full_hi = tl.maximum(tl.minimum(m_first + diag + window_right + 1, seqlen_k), 0)
        full_hi = full_hi // BLOCK_N * BLOCK_N
    # Tiles in [mid_lo, mid_hi) are visible to every row of the tile and lie inside the
    # sequence; the rest of [lo, hi) needs the mask. hi >= lo makes an empty range stay empty.
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(full_lo, hi)
    mid_hi = tl.maximum(full_hi, mid_lo)

    # Pointers: 64-bit offsets of the tile's first row, then small 32-bit offsets within it.
    tile_rows = tl.arange(0, BLOCK_M)
    rows = m_first + tile_rows
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    q_seq += m_first.to(tl.int64) * stride_qm
    o_seq += m_first.to(tl.int64) * stride_om
    q_ptrs = Q + q_seq + head * stride_qh + tile_rows[:, None] * stride_qm + offs_d[None, :]
    q = _load_tile(q_ptrs, rows, seqlen_q, d_ok, True, EVEN_D)
    if PAGED:
        k_ptrs = K + kv_head * stride_kh + offs_d[None, :]
        v_ptrs = V + kv_head * stride_vh + offs_d[None, :]
        bt_row = BlockTable + batch.to(tl.int64) * stride_btb
    else:
        k_ptrs = K + k_seq + kv_head * stride_kh + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + v_seq + kv_head * stride_vh + cols[:, None] * stride_vn + offs_d[None, :]
        bt_row = BlockTable

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kb, stride_kn,
                                 stride_vb, stride_vn, bt_row, page_size, lo, mid_lo, rows, cols,
                                 d_ok, seqlen_k, diag, window_left, window_right, qk_scale,
                                 True, HAS_LEFT, HAS_RIGHT, EVEN_D, PAGED, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kb, stride_kn,
                                 stride_vb, stride_vn, bt_row, page_size, mid_lo, mid_hi, rows,
                                 cols, d_ok, seqlen_k, diag, window_left, window_right, qk_scale,
                                 False, HAS_LEFT, HAS_RIGHT, EVEN_D, PAGED, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kb, stride_kn,
                                 stride_vb, stride_vn, bt_row, page_size, mid_hi, hi, rows, cols,
                                 d_ok, seqlen_k, diag, window_left, window_right, qk_scale,
                                 True, HAS_LEFT, HAS_RIGHT, EVEN_D, PAGED, BLOCK_N)

    # A row that saw no key has l = 0 and acc = 0: output 0 and lse = log(0) = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    row_ok = rows < seqlen_q
    o_ptrs = Out + o_seq + head * stride_oh + tile_rows[:, None] * stride_om + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + l_seq + head.to(tl.int64) * stride_lh + rows, lse, mask=row_ok)


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages)


# Small per-head-dim config sets (each config is one compile per kernel variant), chosen from
# ptxas reports for sm_90a under Triton 3.6: none spills more than a few bytes of registers (a
# 4-warp BLOCK_M=128 tile at d >= 96 spills ~1 KB), and shared memory fits 227 KB. Configs that
# do not fit the GPU at hand (sm_80 has 163 KB) are dropped by the autotuner.
_GPU_CONFIGS = {
    64: [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 8, 3)],
    96: [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(64, 64, 4, 3)],
    128: [_config(128, 128, 8, 3), _config(128, 64, 8, 3), _config(128, 64, 8, 4),
          _config(64, 64, 4, 3)],
    256: [_config(128, 32, 8, 2), _config(128, 32, 8, 3), _config(64, 32, 4, 2)],
}
# The CPU interpreter runs one small config: autotuning there would only cost time, and small
# tiles exercise the multi-tile paths on small test shapes.
_INTERPRETER_CONFIGS = [_config(16, 16, 1, 1)]


@functools.cache
def _kernel(head_dim: int):
    """The autotuned kernel for one head dim (its own config set and tuning cache)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = _INTERPRETER_CONFIGS
    else:
        configs = _GPU_CONFIGS[head_dim]
    return triton.autotune(
        configs=configs,
        key=["VARLEN", "PAGED", "HAS_LEFT", "HAS_RIGHT", "len_bucket_q", "len_bucket_k"],
    )(_flash_attn_fwd_kernel)


def _len_bucket(n: int) -> int:
    """Coarse length classes for autotuning: <=256, <=1024, <=4096, longer."""
    return sum(n > bound for bound in (256, 1024, 4096))


def _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, window_left, window_right, block_table=None):
    """Write attention into ``out`` and ``lse`` (both fully overwritten).

    Fixed length: q/out ``[b, sq, hq, d]``, k/v ``[b, sk, hkv, d]``, lse ``[b, hq, sq]``,
    cu_seqlens None. Varlen: q/out ``[total_q, hq, d]``, k/v ``[total_k, hkv, d]``,
    lse ``[hq, total_q]``, int32 cu_seqlens ``[batch + 1]``; paged varlen: k/v
    ``[num_blocks, page_size, hkv, d]`` and int32 ``block_table [batch, max_blocks]``.
    """
    varlen = cu_seqlens_q is not None
    paged = block_table is not None
    heads_q, head_dim = q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    if causal:  # the public functions already pass window_right = 0; direct callers may not
        window_right = 0
    # A side wider than any sequence is unbounded: dropping it saves the mask work.
    # (Row i sees key j >= i + sk - sq - left, always true once left >= sk - 1; and
    # j <= i + sk - sq + right, always true once right >= sq - 1.)
    if window_left >= max_seqlen_k:
        window_left = -1
    if window_right >= max_seqlen_q:
        window_right = -1

    if varlen:
        strides_q = (0, *q.stride()[:2])
        strides_o = (0, *out.stride()[:2])
        strides_l = (0, lse.stride(0))
        if paged:  # (block, slot, head) strides of the caches
            strides_k, strides_v = k.stride()[:3], v.stride()[:3]
        else:
            strides_k, strides_v = (0, *k.stride()[:2]), (0, *v.stride()[:2])
    else:
        strides_q, strides_k, strides_v = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        strides_o = out.stride()[:3]
        strides_l = lse.stride()[:2]

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads_q, batch)

    _kernel(head_dim)[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_table,
        block_table.stride(0) if paged else 0, k.shape[1] if paged else 1,
        *strides_q, *strides_k, *strides_v, *strides_o, *strides_l,
        max_seqlen_q, max_seqlen_k, heads_q // heads_kv, softmax_scale * LOG2E,
        window_left, window_right, _len_bucket(max_seqlen_q), _len_bucket(max_seqlen_k),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), VARLEN=varlen,
        PAGED=paged, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
    )


def flash_attn(q, k, v, softmax_scale: float, causal: bool, window_left: int,
               window_right: int):
    """Fixed-length attention (inputs validated by ``ember.ops.flash_attn_func``).

    q ``[b, sq, hq, d]``, k/v ``[b, sk, hkv, d]`` fp16/bf16 with a contiguous head dim.
    Returns ``out`` ``[b, sq, hq, d]`` (q's dtype, contiguous) and float32 ``lse`` ``[b, hq, sq]``.
    """
    batch, seqlen_q, heads_q, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    _launch(q, k, v, out, lse, None, None, batch, seqlen_q, k.shape[1], softmax_scale, causal,
            window_left, window_right)
    return out, lse


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      softmax_scale: float, causal: bool, window_left: int, window_right: int,
                      block_table=None):
    """Varlen attention (inputs validated by ``ember.ops.flash_attn_varlen_func``).

    q ``[total_q, hq, d]``, k/v ``[total_k, hkv, d]`` (or, with int32 ``block_table [batch,
    max_blocks]``, paged caches ``[num_blocks, page_size, hkv, d]``: only the differences of
    cu_seqlens_k are read, as lengths), int32 cu_seqlens ``[batch + 1]``; ``max_seqlen_q/k``
    must be at least the longest sequence. Returns ``out`` ``[total_q, hq, d]`` and float32
    ``lse`` ``[hq, total_q]``.
    """
    total_q, heads_q, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.numel() - 1,
            max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
            block_table)
    return out, lse
