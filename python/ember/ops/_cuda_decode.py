"""CUDA backend of ``flash_attn_with_kvcache`` and ``merge_attn_states``: launch wrappers for the
kernels in ``csrc/decode/`` (through ``ember._C``).

The public functions in ``ember.ops.attention`` have validated the inputs and resolved the
defaults (see that module's docstring for what a backend may assume); this module turns tensors
into pointers, strides, dtype codes and the current stream, allocates the outputs and the
split-KV workspace (partials; arrival counters are kept across calls), and plans the split count
with the rule every backend shares (``ember.ops._split_kv``), from shapes only: nothing here
waits for the GPU, so the ops can be captured in CUDA graphs. The launch path is kept short:
at batch 1 a decode kernel runs for a few microseconds, about what a Python launch costs.
"""

import functools
import math

import torch

from ember.ops import _ext
from ember.ops._split_kv import MAX_UNSPLIT_KEYS, plan_splits, sm_count, unsplit_tiles
from ember.ops._validation import with_16b_aligned_rows


def flash_attn_with_kvcache_append(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                   rotary_interleaved, cache_seqlens, block_table, softmax_scale,
                                   window_left, window_right, num_splits, max_seqlen_k, k_scale,
                                   v_scale):
    """CUDA backend of ``flash_attn_with_kvcache`` with one new token per sequence (the fused
    path, ``ember.ops.attention.FUSED_APPEND``): q ``[batch, 1, heads_q, d]``, k/v ``[batch, 1,
    heads_kv, d]`` and a cache in q's dtype, or fp8 with its ``k_scale``/``v_scale``;
    ``cache_seqlens`` counts the keys before the new one. One kernel rotates q and k (when
    rotary_cos is given), writes k and v into the cache (quantised, for fp8) and attends over
    ``cache_seqlens + 1`` keys. Returns ``(out, lse)``."""
    k, v = with_16b_aligned_rows(k), with_16b_aligned_rows(v)
    rotary = None
    if rotary_cos is not None:
        rotary = (rotary_cos.data_ptr(), rotary_sin.data_ptr(),
                  (rotary_cos.stride(0), rotary_sin.stride(0)), 2 * rotary_cos.shape[1],
                  rotary_cos.shape[0], rotary_interleaved, rotary_cos.dtype == torch.float32)
    new_token = (k.data_ptr(), v.data_ptr(),
                 (k.stride(0), k.stride(2), v.stride(0), v.stride(2)),
                 *(rotary or (0, 0, (0, 0), 0, 0, False, False)))
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table,
                                   softmax_scale, True, window_left, window_right, num_splits,
                                   max_seqlen_k, None, k_scale, v_scale, new_token=new_token)


def flash_attn_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal,
                            window_left, window_right, num_splits, max_seqlen_k, tree_mask,
                            k_scale, v_scale, new_token=None):
    """CUDA backend of ``ember.ops.flash_attn_with_kvcache``. Without ``new_token`` the new
    tokens are already in the cache and the caches are only read.

    Args:
        q: ``[batch, seqlen_q, heads_q, d]`` float16/bfloat16, d in (64, 96, 128, 256).
        k_cache, v_cache: ``[batch, capacity, heads_kv, d]``, or paged ``[num_blocks,
            page_size, heads_kv, d]`` with ``block_table``; q's dtype or float8_e4m3fn.
        seqlens_k: int32 ``[batch]``, keys to attend per sequence (read on the device).
        block_table: int32 ``[batch, max_blocks]`` (contiguous) or None.
        softmax_scale, window_left, window_right: resolved; ``causal`` arrives folded into
            ``window_right == 0`` and is not used again.
        num_splits: 0 plans the split-KV count, > 0 is honoured.
        max_seqlen_k: a bound on seqlens_k (at most the capacity); it picks the tile width.
        tree_mask: bool ``[batch, seqlen_q, seqlen_q]`` (contiguous) or None.
        k_scale, v_scale: float32 one-element tensors for fp8 caches, else None.
        new_token: the launch arguments of a new token the kernel writes and attends to, as
            ``flash_attn_with_kvcache_append`` builds them; seqlens_k then excludes it.

    Returns:
        ``(out [batch, seqlen_q, heads_q, d] in q's dtype, lse float32 [batch, heads_q,
        seqlen_q])``.
    """
    del causal
    ext = _ext.load_extension()
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    splits, m_blocks, wide, unsplit = _launch_plan(
        sm_count(q.device), batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, num_splits,
        k_cache.dtype == torch.float8_e4m3fn, max_seqlen_k)

    q, k_cache, v_cache = (with_16b_aligned_rows(t) for t in (q, k_cache, v_cache))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    stream = _ext.stream_of(q)
    out_part = lse_part = counters = None
    if splits > 1:
        # One float32 workspace: the partial outputs, then their LSEs.
        rows = batch * heads_q * seqlen_q
        part = torch.empty(splits * rows * (head_dim + 1), dtype=torch.float32, device=q.device)
        out_part = part[:splits * rows * head_dim].view(splits, *q.shape)
        lse_part = part[splits * rows * head_dim:].view(splits, batch, heads_q, seqlen_q)
        counters = _split_counters(q.device, stream, batch * heads_kv * m_blocks)
    ext.flash_attn_with_kvcache(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), seqlens_k.data_ptr(),
        _ext.ptr(block_table), _ext.ptr(tree_mask), _ext.ptr(k_scale), _ext.ptr(v_scale),
        out.data_ptr(), lse.data_ptr(), _ext.ptr(out_part), _ext.ptr(lse_part), _ext.ptr(counters),
        batch, seqlen_q, heads_q, heads_kv, head_dim, splits, unsplit,
        k_cache.shape[1] if paged else 0, block_table.shape[1] if paged else 0, capacity,
        q.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3], out.stride()[:3],
        lse.stride()[:2],
        out_part.stride()[:4] if out_part is not None else (0, 0, 0, 0),
        lse_part.stride()[:3] if lse_part is not None else (0, 0, 0),
        softmax_scale, window_left, window_right,
        _ext.dtype_code(q), _ext.dtype_code(k_cache), wide, new_token, stream)
    return out, lse


# Wide KV tiles when each split streams at least this many keys of the longest sequence:
# {bytes per cache element: (when the KV range is split, when it is not)}. From the H100 decode
# suite (bench/results, GB/s of the CUDA kernel, narrow -> wide) and graph-timed probes:
# - 16-bit, split: 9:3 d=64 32 x 4096 (5 splits of 820 keys) 2034 -> 2331, 32:8 d=64 1 x 32768
#   (1024 keys a split) 2034 -> 2163, 8 x 8192 (2048) 2380 -> 2609;
# - 16-bit, unsplit (a full grid of sequences): 2048 keys gain (32:8 d=64 64 x 2048 2454 ->
#   2761, 9:3 2301 -> 2627), 1024 keys lose (9:3 d=64 128 x 1024 2678 -> 2382, paged 2568 ->
#   2141): the narrow kernel is already near copy speed there;
# - fp8 (64- against 256-key tiles at d=64): wide from 128 keys a split. The Llama-3.2-1B decode
#   call (batch 1, 32 splits) took 9.06 us narrow and 9.70 wide at 32 keys a split, 12.13 and
#   10.31 at 128; 9:3 d=64 fp8 1 x 32768 (400 keys a split) streamed 606 GB/s narrow (suite
#   run of e0f04ca) and 682 wide (359c1f6).
WIDE_TILE_MIN_KEYS = {2: (512, 2048), 1: (128, 128)}
# Besides, 16-bit caches take wide tiles in a latency-bound launch: every sequence unsplit and
# short (max_seqlen_k <= MAX_UNSPLIT_KEYS, the split count planned or 1) on fewer CTAs than
# SMs, so a CTA's time is its chain of tiles, which wide tiles halve. H100, Llama-3.2-1B shape,
# batch 1 at 128-384 keys, attention alone: 7.68 -> 6.36 us at 384 keys (session 20); in the
# decode step, with the projections on ember's streaming GEMV, 833 -> 871 tok/s (session 22).
# fp8 caches stay narrow there: wide, the 1B fp8 step fell from 830 to 742 tok/s (session 20).


@functools.lru_cache(maxsize=1024)
def _launch_plan(num_sms, batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, num_splits,
                 fp8, max_seqlen_k):
    """``(split count, row blocks per (sequence, kv head), wide tiles, the tiles up to which a
    sequence runs unsplit)`` of a decode launch.

    The split count comes from the capacity, in narrow tiles, whatever the lengths: a CUDA
    graph captured for one length bound replays the same plan as any other, and a split
    without keys leaves at once. Wide tiles are taken when, with that split count, the longest
    sequence (``max_seqlen_k``) gives each split WIDE_TILE_MIN_KEYS keys or more (the split
    count's share, whatever MAX_UNSPLIT_KEYS does to shorter sequences), and for 16-bit caches
    when the launch is latency-bound (see above)."""
    ext = _ext.load_extension()
    packed_rows = heads_q // heads_kv * seqlen_q
    block_m, block_n = ext.decode_tile_shape(head_dim, packed_rows, fp8, False)
    m_blocks = math.ceil(packed_rows / block_m)
    plan = plan_splits(num_sms, batch, heads_kv, capacity, block_n, num_splits=num_splits,
                       m_blocks=m_blocks)
    wide_n = ext.decode_tile_shape(head_dim, packed_rows, fp8, True)[1]
    split_min, unsplit_min = WIDE_TILE_MIN_KEYS[1 if fp8 else 2]
    latency_bound = (not fp8 and num_splits <= 1 and max_seqlen_k <= MAX_UNSPLIT_KEYS
                     and batch * heads_kv * m_blocks < num_sms)
    wide = wide_n != block_n and (latency_bound or math.ceil(max_seqlen_k / plan.num_splits)
                                  >= (split_min if plan.num_splits > 1 else unsplit_min))
    return (plan.num_splits, m_blocks, wide,
            unsplit_tiles(wide_n if wide else block_n, num_splits))


# Split-KV arrival counters (one per (sequence, kv head, row block)), per (device, stream).
# They are zeroed once: the kernel leaves every counter it used at zero again (the last split
# of a row block resets it), so later calls and graph replays need no memset. One set per
# stream, since kernels on different streams may run at once; a CUDA graph captures its
# capture stream's set, so two replays of graphs on different streams at the same time would
# share it. An outgrown set is kept, never freed: a captured graph may still point at it.
_counters: dict = {}
_outgrown: list = []


def _split_counters(device: torch.device, stream: int, count: int) -> torch.Tensor:
    key = (device, stream)
    counters = _counters.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _outgrown.append(counters)
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _counters[key] = counters
    return counters


def merge_attn_states(out_a, lse_a, out_b, lse_b):
    """CUDA backend of ``ember.ops.merge_attn_states``.

    out_a, out_b ``[tokens, heads, d]`` float16/bfloat16 (any token/head strides, contiguous
    d); lse_a, lse_b contiguous float32 ``[heads, tokens]``. Returns ``(out [tokens, heads, d]
    in out_a's dtype, lse float32 [heads, tokens])``.
    """
    tokens, heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(heads, tokens, dtype=torch.float32, device=out_a.device)
    _ext.load_extension().merge_attn_states(
        out_a.data_ptr(), lse_a.data_ptr(), out_b.data_ptr(), lse_b.data_ptr(),
        out.data_ptr(), lse.data_ptr(), tokens, heads, head_dim,
        out_a.stride()[:2], out_b.stride()[:2], out.stride()[:2],
        lse_a.stride(0), lse_b.stride(0), lse.stride(0),
        _ext.dtype_code(out_a), _ext.stream_of(out_a))
    return out, lse
