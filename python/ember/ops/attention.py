"""Attention (forward): ``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache`` and ``merge_attn_states``, with flash-attn 2.x names and semantics.

Contract shared by ``reference.py``, the public functions below and every backend:

- NHD layout: q ``[batch, seqlen_q, heads_q, d]``, k/v ``[batch, seqlen_k, heads_kv, d]``;
  varlen tensors are ``[total_tokens, heads, d]`` with int32 ``cu_seqlens [batch + 1]``.
- GQA/MQA: query head h reads kv head ``h // (heads_q // heads_kv)``; kernels index it, they
  never materialise repeated K/V.
- Masks align bottom-right: for lengths (sq, sk), query row i sits at key position
  ``i + sk - sq``. causal: ``j <= i + sk - sq``; window ``(left, right)`` (-1 unbounded):
  ``i + sk - sq - left <= j <= i + sk - sq + right``. A row that sees no key outputs zeros and
  has lse = -inf.
- lse: float32 natural log of ``sum_j exp(scale * q.k_j)``, ``[batch, heads_q, seqlen_q]``
  (varlen and merge: ``[heads_q, total_q]``).

Backend implementations (registered at the bottom of this file) receive inputs that the public
functions have validated, with defaults resolved, and always return ``(out, lse)``: ``out`` a
new contiguous tensor shaped and typed like q, ``lse`` a new contiguous float32 tensor.

- ``"flash_attn_func"``: ``f(q, k, v, softmax_scale, causal, window_left, window_right)``
- ``"flash_attn_varlen_func"``: ``f(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, softmax_scale, causal, window_left, window_right)``
- ``"flash_attn_varlen_func.paged"``: the same arguments followed by ``block_table``; k/v are
  then paged caches ``[num_blocks, block_size, heads_kv, d]``.
- ``"flash_attn_with_kvcache"``: ``f(q, k_cache, v_cache, seqlens_k, block_table,
  softmax_scale, causal, window_left, window_right, num_splits, max_seqlen_k, tree_mask,
  k_scale, v_scale)``. New k/v are already in the cache (the public function writes them
  through ``store_kvcache``), so this is read-only; ``seqlens_k`` (int32 ``[batch]``) counts all
  keys to attend to; ``max_seqlen_k`` (int, at most the capacity) bounds them for choosing a
  tile shape, never for correctness: split plans come from the capacity, so that a CUDA graph
  captured once serves every length; ``block_table``, ``tree_mask``, ``k_scale``, ``v_scale``
  may be None.
- ``"merge_attn_states"``: ``f(out_a, lse_a, out_b, lse_b)``.

What a kernel backend may assume (anything else goes to the torch backend under "auto", or is
refused with a ValueError under an explicit backend): q/k/v/out dtypes float16 or bfloat16
(caches may be float8_e4m3fn), head_dim in ``KERNEL_HEAD_DIMS``, page sizes a multiple of
``KERNEL_BLOCK_SIZE_MULTIPLE``, unit stride on head_dim (other strides arbitrary), index
tensors (cu_seqlens, block_table, seqlens_k, tree_mask, merge lse) contiguous and within
bounds, ``causal`` implies ``window_right == 0``, tree_mask implies ``causal`` is False, and at
least one query row (empty queries return before any backend runs). Kernels must still handle
zero-length sequences and rows that see no key.
"""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_bool,
    check_fp8_scales,
    check_positive_int,
    check_softmax_scale,
    check_tensor,
    check_window,
    values_readable,
    with_16b_aligned_rows,
)
from ember.ops.kvcache import FP8_CACHE_DTYPE

# The torch backend also takes float32; the kernels take KERNEL_DTYPES.
ATTN_DTYPES = FLOAT_DTYPES
KERNEL_DTYPES = HALF_DTYPES
KERNEL_HEAD_DIMS = (64, 96, 128, 256)
KERNEL_BLOCK_SIZE_MULTIPLE = 16


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, *, backend="auto"):
    """Scaled dot-product attention over padded batches (flash-attn's ``flash_attn_func``).

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]`` float16/bfloat16 (float32 on the torch
            backend); unit stride on head_dim.
        k, v: ``[batch, seqlen_k, heads_kv, head_dim]``, q's dtype; ``heads_q % heads_kv == 0``
            (GQA/MQA).
        softmax_scale: scale of ``q.k``; default ``1 / sqrt(head_dim)``.
        causal: hide keys after each query's position, aligned bottom-right when
            ``seqlen_q != seqlen_k`` (query row i sits at key position ``i + seqlen_k - seqlen_q``).
        window_size: ``(left, right)`` sliding window around that position; -1 is unbounded.
        return_lse: also return the float32 log-sum-exp ``[batch, heads_q, seqlen_q]``.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        out ``[batch, seqlen_q, heads_q, head_dim]`` in q's dtype, or ``(out, lse)``. Rows that
        see no key are zeros with lse = -inf.

    Example::

        q = torch.randn(2, 128, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(2, 128, 8, 128, device="cuda", dtype=torch.bfloat16)
        out = ember.ops.flash_attn_func(q, k, v, causal=True)
    """
    op = "flash_attn_func"
    check_tensor(op, "q", q, dtypes=ATTN_DTYPES, ndim=4, last_dim_contiguous=True)
    batch, seqlen_q, heads_q, head_dim = q.shape
    check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=4, device=q.device,
                 last_dim_contiguous=True)
    check_tensor(op, "k", k, shape=(batch, None, None, head_dim))
    check_tensor(op, "v", v, dtypes=(q.dtype,), shape=k.shape, device=q.device,
                 last_dim_contiguous=True)
    _check_heads(op, heads_q, k.shape[2], head_dim)
    scale, causal, left, right = _check_options(op, softmax_scale, causal, window_size, head_dim)
    check_bool(op, "return_lse", return_lse)

    chosen = _registry.resolve_supported(op, op, backend, q.device,
                                         kernel_unsupported(q.dtype, head_dim))
    if q.numel() == 0:
        out, lse = _flash_attn_fake(q, k, v, scale, causal, left, right, chosen)
    else:
        out, lse = torch.ops.ember.flash_attn_func(q, k, v, scale, causal, left, right, chosen)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1),
                           return_lse=False, block_table=None, *, backend="auto"):
    """Attention over packed variable-length sequences (flash-attn's ``flash_attn_varlen_func``).

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16/bfloat16 (float32 on the torch backend):
            the queries of every sequence back to back; unit stride on head_dim.
        k, v: ``[total_k, heads_kv, head_dim]`` in q's dtype; or, with ``block_table``, paged
            caches ``[num_blocks, block_size, heads_kv, head_dim]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]``, contiguous: sequence b owns rows
            ``cu[b]:cu[b+1]``; start at 0, non-decreasing, ``cu_seqlens_q[-1] == total_q``
            (and ``cu_seqlens_k[-1] == total_k`` unless paged). Zero-length sequences are fine.
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence.
        softmax_scale, causal, window_size: as in ``flash_attn_func``, applied per sequence
            (bottom-right aligned with that sequence's own lengths).
        return_lse: also return the float32 log-sum-exp ``[heads_q, total_q]``.
        block_table: int32 ``[batch, max_blocks]``, contiguous: key j of sequence b lives in
            block ``block_table[b, j // block_size]`` at offset ``j % block_size``.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        out ``[total_q, heads_q, head_dim]`` in q's dtype, or ``(out, lse)``.

    Example::

        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device="cuda")
        q = torch.randn(12, 8, 64, device="cuda", dtype=torch.float16)
        out = ember.ops.flash_attn_varlen_func(q, q[:, :2], q[:, :2], cu, cu, 7, 7, causal=True)
    """
    op = "flash_attn_varlen_func"
    paged = block_table is not None
    check_tensor(op, "q", q, dtypes=ATTN_DTYPES, ndim=3, last_dim_contiguous=True)
    total_q, heads_q, head_dim = q.shape
    dev = q.device
    k_dims = (None, None, None, head_dim) if paged else (None, None, head_dim)
    check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=len(k_dims), device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "k", k, shape=k_dims)
    check_tensor(op, "v", v, dtypes=(q.dtype,), shape=k.shape, device=dev,
                 last_dim_contiguous=True)
    _check_heads(op, heads_q, k.shape[-2], head_dim)
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1, device=dev,
                 contiguous=True)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens_q must have batch + 1 >= 2 entries, "
                         f"got shape {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    check_tensor(op, "cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), shape=(batch + 1,),
                 device=dev, contiguous=True)
    check_positive_int(op, "max_seqlen_q", max_seqlen_q, allow_zero=True)
    check_positive_int(op, "max_seqlen_k", max_seqlen_k, allow_zero=True)
    if paged:
        check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2, device=dev,
                     contiguous=True)
        check_tensor(op, "block_table", block_table, shape=(batch, None))
    scale, causal, left, right = _check_options(op, softmax_scale, causal, window_size, head_dim)
    check_bool(op, "return_lse", return_lse)

    # Values are checked on the host: one small copy, cheaper than a fault in a kernel.
    block_size = k.shape[1] if paged else None
    if values_readable(dev):
        cu_host = torch.stack([cu_seqlens_q, cu_seqlens_k]).cpu()
        _check_cu_seqlens(op, "cu_seqlens_q", cu_host[0], total_q, max_seqlen_q, "max_seqlen_q")
        lengths_k = _check_cu_seqlens(op, "cu_seqlens_k", cu_host[1],
                                      None if paged else k.shape[0], max_seqlen_k, "max_seqlen_k")
        if paged:
            capacity = block_table.shape[1] * block_size
            if int(lengths_k.max()) > capacity:
                raise ValueError(f"{op}: cu_seqlens_k has a sequence of {int(lengths_k.max())} "
                                 f"keys; block_table rows hold at most {capacity} "
                                 f"({block_table.shape[1]} blocks of {block_size})")
            _check_block_table(op, block_table, lengths_k, block_size, k.shape[0])

    registry_op = "flash_attn_varlen_func.paged" if paged else op
    chosen = _registry.resolve_supported(op, registry_op, backend, dev,
                                         kernel_unsupported(q.dtype, head_dim, block_size))
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
            left, right, block_table, chosen)
    if total_q == 0:
        out, lse = _flash_attn_varlen_fake(*args)
    else:
        out, lse = torch.ops.ember.flash_attn_varlen_func(*args)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), num_splits=0, return_lse=False, tree_mask=None,
                            k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None,
                            rotary_interleaved=True, *, max_seqlen_k=None, backend="auto"):
    """Attention of new queries over a KV cache: decode, append and chunked prefill
    (flash-attn's ``flash_attn_with_kvcache``, plus tree masks and fp8 caches).

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]`` float16/bfloat16 (float32 on the torch
            backend); unit stride on head_dim.
        k_cache, v_cache: contiguous-per-sequence ``[batch, max_len, heads_kv, head_dim]``, or
            paged ``[num_blocks, block_size, heads_kv, head_dim]`` with ``block_table``; dtype
            q's or ``torch.float8_e4m3fn`` (values are ``cache * scale``).
        k, v: optional new tokens ``[batch, seqlen_new, heads_kv, head_dim]`` in q's dtype,
            written into the cache (in place) at positions ``cache_seqlens ..
            cache_seqlens + seqlen_new - 1`` before attending (fp8 caches store
            ``value / scale`` saturated to ±448, like ``store_kvcache``).
        cache_seqlens: int32 ``[batch]`` (or an int): valid cached tokens per sequence *before*
            the new ones; None means the full capacity (max_len, or max_blocks * block_size).
        block_table: int32 ``[batch, max_blocks]``: token j of sequence b lives in block
            ``block_table[b, j // block_size]`` at offset ``j % block_size``.
        softmax_scale, causal, window_size: as in ``flash_attn_func``; the query rows are the
            last seqlen_q of the ``cache_seqlens + seqlen_new`` keys (bottom-right alignment).
        num_splits: split-KV (Flash-Decoding) parts; 0 lets the kernel choose. Same result.
        return_lse: also return the float32 log-sum-exp ``[batch, heads_q, seqlen_q]``.
        tree_mask: bool ``[batch, seqlen_q, seqlen_q]`` for tree (speculative) verification:
            query i sees every key before the last seqlen_q plus last-seqlen_q key t where
            ``tree_mask[b, i, t]``; replaces ``causal`` (passing both is an error); the window
            still applies by position. Needs ``cache_seqlens + seqlen_new >= seqlen_q``.
        k_scale, v_scale: float32 one-element tensors, required exactly for fp8 caches.
        rotary_cos, rotary_sin: optional ``[seqlen_ro, rotary_dim / 2]`` in q's dtype or
            float32, unit stride on the last dim (e.g. the two halves of a ``cos_sin_cache``):
            rotary embedding applied to the new k at positions ``cache_seqlens + j`` and to q
            at ``cache_seqlens + i`` (causal or windowed) or ``cache_seqlens`` (otherwise),
            flash-attn's rule; needs k and v. Positions past seqlen_ro are clipped to its last
            row (checked on the host where the lengths are read). The first rotary_dim
            features of each head rotate, the rest pass through.
        rotary_interleaved: True pairs features ``(2i, 2i + 1)`` (GPT-J); False pairs ``i``
            with ``i + rotary_dim / 2`` (GPT-NeoX, Llama). flash-attn's default.
        max_seqlen_k: optional int >= 1, a bound on ``cache_seqlens + seqlen_new`` over the
            batch, for speed only (any value gives the same result): the CUDA kernel streams
            long splits in wide KV tiles, short ones in narrow tiles. None: the largest length
            where the host reads ``cache_seqlens`` (eager calls), else the cache capacity
            (e.g. inside CUDA-graph capture, where a caller that knows its lengths passes them).
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        out ``[batch, seqlen_q, heads_q, head_dim]`` in q's dtype, or ``(out, lse)``.

    A decode step (one query and one new token per sequence, 16-bit cache) with k/v runs as
    one CUDA kernel that rotates q and the new k, writes k and v into the cache and attends;
    other shapes and backends rotate and store first, then attend.

    Example (decode one token per sequence into a paged cache, Llama's rotary)::

        out = ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                                cache_seqlens=lens, block_table=table,
                                                causal=True, rotary_cos=cos, rotary_sin=sin,
                                                rotary_interleaved=False)
    """
    op = "flash_attn_with_kvcache"
    paged = block_table is not None
    check_tensor(op, "q", q, dtypes=ATTN_DTYPES, ndim=4, last_dim_contiguous=True)
    batch, seqlen_q, heads_q, head_dim = q.shape
    dev = q.device
    check_tensor(op, "k_cache", k_cache, dtypes=(q.dtype, FP8_CACHE_DTYPE), ndim=4, device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "k_cache", k_cache, shape=(None if paged else batch, None, None, head_dim))
    check_tensor(op, "v_cache", v_cache, dtypes=(k_cache.dtype,), shape=k_cache.shape,
                 device=dev, last_dim_contiguous=True)
    heads_kv = k_cache.shape[2]
    _check_heads(op, heads_q, heads_kv, head_dim)
    check_fp8_scales(op, k_cache, k_scale, v_scale)
    if paged:
        check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2, device=dev,
                     contiguous=True)
        check_tensor(op, "block_table", block_table, shape=(batch, None))
    block_size = k_cache.shape[1]
    capacity = block_size * (block_table.shape[1] if paged else 1)

    if (k is None) != (v is None):
        raise ValueError(f"{op}: k and v must be given together (got only "
                         f"{'k' if v is None else 'v'})")
    num_new = 0
    if k is not None:
        check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=4, device=dev, last_dim_contiguous=True)
        check_tensor(op, "k", k, shape=(batch, None, heads_kv, head_dim))
        check_tensor(op, "v", v, dtypes=(q.dtype,), shape=k.shape, device=dev,
                     last_dim_contiguous=True)
        num_new = k.shape[1]

    if cache_seqlens is None or isinstance(cache_seqlens, int):
        cached = capacity if cache_seqlens is None else check_positive_int(
            op, "cache_seqlens", cache_seqlens, allow_zero=True)
        seqlens = torch.full((batch,), cached, dtype=torch.int32, device=dev)
    else:
        check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(batch,),
                     device=dev, contiguous=True)
        seqlens = cache_seqlens
    # Every value check reduces on the device and comes back in ONE transfer: each read-back is
    # a full device sync, and at decode sizes a few of them cost more than the kernel itself.
    # Lengths the host already knows (an int or None) need no read-back of their own.
    readable = values_readable(dev)
    lengths_on_device = torch.is_tensor(cache_seqlens) and batch > 0 and readable
    reductions = []
    if lengths_on_device:
        reductions.append(torch.stack(torch.aminmax(seqlens)).long())
    if paged and batch and readable:
        reductions.append(_block_table_faults(block_table, seqlens + num_new, block_size,
                                              k_cache.shape[0]))
    values = torch.cat(reductions).tolist() if reductions else []
    if lengths_on_device:
        (cached_min, cached_max), values = values[:2], values[2:]
    elif torch.is_tensor(cache_seqlens):  # batch 0, or capturing: no lengths to check
        cached_min, cached_max = seqlen_q, 0
    else:
        cached_min = cached_max = cached
    if batch and cached_min < 0:
        raise ValueError(f"{op}: cache_seqlens must be >= 0, got {cached_min}")
    if batch and cached_max + num_new > capacity:
        where = "max_blocks * block_size" if paged else "k_cache.shape[1]"
        raise ValueError(f"{op}: cache_seqlens + new tokens ({cached_max + num_new}) exceeds the "
                         f"cache capacity {where} = {capacity}")
    if values:
        _raise_block_table_fault(op, values, k_cache.shape[0])

    scale, causal, left, right = _check_options(op, softmax_scale, causal, window_size, head_dim)
    check_positive_int(op, "num_splits", num_splits, allow_zero=True)
    check_bool(op, "return_lse", return_lse)
    if max_seqlen_k is None:
        lengths_known = lengths_on_device or not torch.is_tensor(cache_seqlens)
        max_seqlen_k = cached_max + num_new if lengths_known and batch else capacity
    else:
        check_positive_int(op, "max_seqlen_k", max_seqlen_k)
    max_seqlen_k = max(1, min(max_seqlen_k, capacity))
    if tree_mask is not None:
        check_tensor(op, "tree_mask", tree_mask, dtypes=(torch.bool,),
                     shape=(batch, seqlen_q, seqlen_q), device=dev, contiguous=True)
        if causal:
            raise ValueError(f"{op}: tree_mask replaces the causal mask; pass causal=False")
        if batch and cached_min + num_new < seqlen_q:
            raise ValueError(f"{op}: tree_mask needs cache_seqlens + new tokens >= seqlen_q "
                             f"({seqlen_q}) in every sequence, got {cached_min + num_new}")

    rotary = _check_rotary(op, rotary_cos, rotary_sin, rotary_interleaved, q, k)
    if rotary and batch and cached_max + num_new > rotary_cos.shape[0]:
        raise ValueError(f"{op}: rotary_cos/rotary_sin have {rotary_cos.shape[0]} rows "
                         f"(seqlen_ro), fewer than the positions cache_seqlens + new tokens "
                         f"reach ({cached_max + num_new})")

    chosen = _registry.resolve_supported(
        op, op, backend, dev, kernel_unsupported(q.dtype, head_dim, block_size if paged else None))
    if (k is not None and seqlen_q == 1 and num_new == 1 and tree_mask is None and q.numel()
            and chosen in _registry.available_backends(FUSED_APPEND)):
        # One kernel: rotate, store, attend (the cache is written in place).
        out, lse = torch.ops.ember.flash_attn_with_kvcache_append(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, bool(rotary_interleaved),
            seqlens, block_table, scale, left, right, num_splits, max_seqlen_k, k_scale, v_scale,
            chosen)
        return (out, lse) if return_lse else out
    if rotary:
        q, k = _rotate_new_tokens(q, k, rotary_cos, rotary_sin, rotary_interleaved, seqlens,
                                  causal or left >= 0 or right >= 0, chosen)
    if k is not None:
        _append_new_kv(k, v, k_cache, v_cache, seqlens, block_table, k_scale, v_scale, chosen)
        seqlens = seqlens + num_new
    args = (q, k_cache, v_cache, seqlens, block_table, scale, causal, left, right, num_splits,
            max_seqlen_k, tree_mask, k_scale, v_scale, chosen)
    if q.numel() == 0:
        out, lse = _flash_attn_kvcache_fake(*args)
    else:
        out, lse = torch.ops.ember.flash_attn_with_kvcache(*args)
    return (out, lse) if return_lse else out


def merge_attn_states(out_a, lse_a, out_b, lse_b, *, backend="auto"):
    """Combine two partial attentions of the same queries over disjoint key sets by their LSE
    (split-KV, or a cached prefix plus new tokens; vLLM's ``merge_attn_states``).

    Args:
        out_a, out_b: ``[tokens, heads, head_dim]`` float16/bfloat16 (float32 on the torch
            backend), same dtype; unit stride on head_dim.
        lse_a, lse_b: float32 ``[heads, tokens]``, contiguous (the lse layout of
            ``flash_attn_varlen_func``). -inf marks a side that saw no key.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        ``(out, lse)``: the attention over both key sets, out ``[tokens, heads, head_dim]`` in
        out_a's dtype and lse float32 ``[heads, tokens]``; rows empty on both sides are zeros
        with lse -inf (never NaN).

    Example::

        out_p, lse_p = ember.ops.flash_attn_varlen_func(q, k_p, v_p, ..., return_lse=True)
        out_s, lse_s = ember.ops.flash_attn_varlen_func(q, k_s, v_s, ..., return_lse=True)
        out, lse = ember.ops.merge_attn_states(out_p, lse_p, out_s, lse_s)
    """
    op = "merge_attn_states"
    check_tensor(op, "out_a", out_a, dtypes=ATTN_DTYPES, ndim=3, last_dim_contiguous=True)
    tokens, heads, head_dim = out_a.shape
    dev = out_a.device
    check_tensor(op, "out_b", out_b, dtypes=(out_a.dtype,), shape=out_a.shape, device=dev,
                 last_dim_contiguous=True)
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(op, name, lse, dtypes=(torch.float32,), shape=(heads, tokens), device=dev,
                     contiguous=True)

    chosen = _registry.resolve_supported(op, op, backend, dev,
                                         kernel_unsupported(out_a.dtype, head_dim))
    if out_a.numel() == 0:
        return _merge_fake(out_a, lse_a, out_b, lse_b, chosen)
    return torch.ops.ember.merge_attn_states(out_a, lse_a, out_b, lse_b, chosen)


# ----------------------------------------------------------------------------------------------
# Validation helpers (the public functions run them; backends get checked inputs)
# ----------------------------------------------------------------------------------------------

def kernel_unsupported(dtype: torch.dtype, head_dim: int, block_size: int | None = None):
    """Why the kernel backends cannot take these inputs, or None if they can."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (kernels take float16/bfloat16)"
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} (kernels take {KERNEL_HEAD_DIMS})"
    if block_size is not None and block_size % KERNEL_BLOCK_SIZE_MULTIPLE:
        return f"block_size {block_size} (kernels take multiples of {KERNEL_BLOCK_SIZE_MULTIPLE})"
    return None


def _check_heads(op, heads_q, heads_kv, head_dim):
    if heads_q == 0 or heads_kv == 0 or head_dim == 0:
        raise ValueError(f"{op}: heads and head_dim must be > 0, got heads_q={heads_q}, "
                         f"heads_kv={heads_kv}, head_dim={head_dim}")
    if heads_q % heads_kv:
        raise ValueError(f"{op}: heads of q ({heads_q}) must be a multiple of heads of k/v "
                         f"({heads_kv})")


def _check_options(op, softmax_scale, causal, window_size, head_dim):
    """Returns ``(scale, causal, window_left, window_right)`` with defaults resolved."""
    scale = check_softmax_scale(op, softmax_scale, head_dim)
    check_bool(op, "causal", causal)
    left, right = check_window(op, window_size)
    if causal:
        right = 0  # causal is the window's right edge at the diagonal (as in flash-attn)
    return scale, causal, left, right


def _check_cu_seqlens(op, name, cu, total, max_seqlen, max_name):
    """Check host copy ``cu`` of a cu_seqlens; returns the per-sequence lengths (int64)."""
    cu = cu.long()
    if int(cu[0]) != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {int(cu[0])}")
    lengths = cu.diff()
    if int(lengths.min()) < 0:
        raise ValueError(f"{op}: {name} must be non-decreasing, got {cu.tolist()}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"{op}: {name}[-1] ({int(cu[-1])}) must equal the number of tokens "
                         f"({total})")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(f"{op}: {max_name} ({max_seqlen}) is less than the longest sequence "
                         f"in {name} ({int(lengths.max())})")
    return lengths


def _check_block_table(op, block_table, lengths, block_size, num_blocks):
    """Block-table entries that sequences of ``lengths`` (already known to fit in a row) use
    must name real blocks; unused entries may hold anything. One device->host transfer."""
    fault = _block_table_faults(block_table, lengths, block_size, num_blocks).tolist()
    _raise_block_table_fault(op, fault, num_blocks)


def _block_table_faults(block_table, lengths, block_size, num_blocks):
    """On block_table's device, without a sync: int64 ``[4]`` = (1 if some entry in use by a
    sequence of ``lengths`` is not in ``[0, num_blocks)`` else 0, row and column of the first
    such entry, its value). Rows of a negative length use no entry."""
    dev = block_table.device
    if block_table.numel() == 0:
        return torch.zeros(4, dtype=torch.int64, device=dev)
    blocks_used = (lengths.to(dev, torch.int64) + block_size - 1) // block_size
    columns = torch.arange(block_table.shape[1], device=dev)
    used = columns[None, :] < blocks_used[:, None]
    bad = (used & ((block_table < 0) | (block_table >= num_blocks))).reshape(-1)
    first = bad.to(torch.int32).argmax().reshape(1)  # argmax gives the first maximal index
    width = block_table.shape[1]
    value = block_table.reshape(-1).gather(0, first)  # gather: indexing by a tensor may sync
    return torch.cat((bad.any().reshape(1).long(), first // width, first % width, value.long()))


def _raise_block_table_fault(op, fault, num_blocks):
    """Raise for a ``_block_table_faults`` result read back as a list."""
    any_bad, row, column, value = fault
    if any_bad:
        raise ValueError(f"{op}: block_table[{row}, {column}] = {value} is in use but "
                         f"not a block index in [0, {num_blocks})")


# ----------------------------------------------------------------------------------------------
# Appending new tokens (shared by every backend of flash_attn_with_kvcache)
# ----------------------------------------------------------------------------------------------

def _check_rotary(op, rotary_cos, rotary_sin, rotary_interleaved, q, k) -> bool:
    """flash_attn_with_kvcache's rotary arguments; whether rotary embedding is on."""
    if rotary_cos is None and rotary_sin is None:
        return False
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{op}: rotary_cos and rotary_sin must be given together (got only "
                         f"{'rotary_sin' if rotary_cos is None else 'rotary_cos'})")
    if k is None:
        raise ValueError(f"{op}: rotary_cos/rotary_sin rotate the new tokens: pass k and v too")
    check_tensor(op, "rotary_cos", rotary_cos, dtypes=(q.dtype, torch.float32), ndim=2,
                 device=q.device, last_dim_contiguous=True)
    check_tensor(op, "rotary_sin", rotary_sin, dtypes=(rotary_cos.dtype,),
                 shape=rotary_cos.shape, device=q.device, last_dim_contiguous=True)
    seqlen_ro, half = rotary_cos.shape
    head_dim = q.shape[3]
    if seqlen_ro == 0 or not 1 <= half <= head_dim // 2:
        raise ValueError(f"{op}: rotary_cos must be [seqlen_ro >= 1, rotary_dim / 2] with "
                         f"rotary_dim <= head_dim = {head_dim}, got shape "
                         f"{tuple(rotary_cos.shape)}")
    check_bool(op, "rotary_interleaved", rotary_interleaved)
    return True


def _rotate_new_tokens(q, k, rotary_cos, rotary_sin, interleaved, cache_seqlens, by_row,
                       backend):
    """flash_attn_with_kvcache's rotary through the ``rotary_embedding`` op of ``backend``
    (torch if it has none): k ``[b, sn, hkv, d]`` at ``cache_seqlens + j``; q ``[b, sq, hq, d]``
    at ``cache_seqlens + i`` if ``by_row`` (causal or windowed) else at ``cache_seqlens``.
    Returns the rotated ``(q, k)``."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    num_new, heads_kv = k.shape[1], k.shape[2]
    base = cache_seqlens.long()[:, None]
    k_positions = (base + torch.arange(num_new, device=q.device)).reshape(-1)
    q_positions = (base + torch.arange(seqlen_q, device=q.device) if by_row
                   else base.expand(batch, seqlen_q)).reshape(-1)
    if backend not in _registry.available_backends("rotary_embedding"):
        backend = "torch"

    def rotate(positions, x, partner):
        # The op takes one [max_pos, rotary_dim] table: hand it just the rows these positions
        # use (clipped, as the op clips), not a copy of the whole table per call.
        if positions.numel() == 0:
            return x, partner
        rows = positions.clamp(0, rotary_cos.shape[0] - 1)
        table = torch.cat([rotary_cos[rows], rotary_sin[rows]], dim=1)
        index = torch.arange(positions.shape[0], device=positions.device)
        return torch.ops.ember.rotary_embedding(index, x, partner, table, not interleaved,
                                                backend)

    q_rows, k_rows = q.reshape(-1, heads_q, head_dim), k.reshape(-1, heads_kv, head_dim)
    if by_row and seqlen_q == num_new:  # one position per row for both
        q_rows, k_rows = rotate(k_positions, q_rows, k_rows)
    else:  # the op pairs each q row with a k row: the unused partner is one head, discarded
        q_rows, _ = rotate(q_positions, q_rows, q_rows[:, :1])
        k_rows, _ = rotate(k_positions, k_rows, k_rows[:, :1])
    return q_rows.view(q.shape), k_rows.view(k.shape)


def _append_new_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale,
                   backend):
    """Write new tokens ``k, v [b, sn, hkv, d]`` at ``cache_seqlens + t`` of each sequence,
    through the ``store_kvcache`` op of ``backend`` (torch if it has none)."""
    batch, num_new, heads_kv, head_dim = k.shape
    block_size = k_cache.shape[1]
    positions = cache_seqlens.long()[:, None] + torch.arange(num_new, device=k.device)
    if block_table is None:
        # A contiguous cache [b, max_len, ...] is a paged cache of b blocks of max_len tokens.
        blocks = torch.arange(batch, device=k.device)[:, None].expand(-1, num_new)
    else:
        blocks = block_table.long().gather(1, positions // block_size)
    slots = (blocks * block_size + positions % block_size).reshape(-1)
    if backend not in _registry.available_backends("store_kvcache"):
        backend = "torch"
    torch.ops.ember.store_kvcache(_token_rows(k), _token_rows(v), k_cache, v_cache, slots,
                                  k_scale, v_scale, backend)


def _token_rows(t):
    """``[b, sn, h, d]`` -> ``[b * sn, h, d]`` rows as store_kvcache takes them."""
    # store_kvcache's CUDA kernel moves 16-byte vectors: realign rows that are not.
    return with_16b_aligned_rows(t.reshape(-1, t.shape[2], t.shape[3]))


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile, CUDA graphs) and their fake implementations
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("ember::flash_attn_func", mutates_args=())
def _flash_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                   causal: bool, window_left: int, window_right: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("flash_attn_func", backend)(
        q, k, v, softmax_scale, causal, window_left, window_right)


@_flash_attn_op.register_fake
def _flash_attn_fake(q, k, v, softmax_scale, causal, window_left, window_right, backend):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("ember::flash_attn_varlen_func", mutates_args=())
def _flash_attn_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                          causal: bool, window_left: int, window_right: int,
                          block_table: torch.Tensor | None,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            causal, window_left, window_right)
    if block_table is None:
        return _registry.implementation("flash_attn_varlen_func", backend)(*args)
    return _registry.implementation("flash_attn_varlen_func.paged", backend)(*args, block_table)


@_flash_attn_varlen_op.register_fake
def _flash_attn_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, causal, window_left, window_right, block_table,
                            backend):
    total_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads_q, total_q), dtype=torch.float32)


@torch.library.custom_op("ember::flash_attn_with_kvcache", mutates_args=())
def _flash_attn_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seqlens_k: torch.Tensor, block_table: torch.Tensor | None,
                           softmax_scale: float, causal: bool, window_left: int,
                           window_right: int, num_splits: int, max_seqlen_k: int,
                           tree_mask: torch.Tensor | None, k_scale: torch.Tensor | None,
                           v_scale: torch.Tensor | None,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("flash_attn_with_kvcache", backend)(
        q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal, window_left,
        window_right, num_splits, max_seqlen_k, tree_mask, k_scale, v_scale)


@_flash_attn_kvcache_op.register_fake
def _flash_attn_kvcache_fake(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal,
                             window_left, window_right, num_splits, max_seqlen_k, tree_mask,
                             k_scale, v_scale, backend):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


# Decode with new tokens in one kernel (rotate, store, attend): a backend registered under this
# name takes f(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved,
# cache_seqlens, block_table, softmax_scale, window_left, window_right, num_splits,
# max_seqlen_k, k_scale, v_scale) with seqlen_q = seqlen_new = 1 and a cache in q's dtype or
# fp8 (then quantised on write as store_kvcache does), writes k/v at cache_seqlens and returns
# (out, lse) over cache_seqlens + 1 keys; rotary_cos/rotary_sin, k_scale/v_scale (16-bit
# caches) may be None.
FUSED_APPEND = "flash_attn_with_kvcache.append"


@torch.library.custom_op("ember::flash_attn_with_kvcache_append",
                         mutates_args=("k_cache", "v_cache"))
def _flash_attn_kvcache_append_op(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
        rotary_interleaved: bool, cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
        softmax_scale: float, window_left: int, window_right: int, num_splits: int,
        max_seqlen_k: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation(FUSED_APPEND, backend)(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
        block_table, softmax_scale, window_left, window_right, num_splits, max_seqlen_k, k_scale,
        v_scale)


@_flash_attn_kvcache_append_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
      block_table, softmax_scale, window_left, window_right, num_splits, max_seqlen_k, k_scale,
      v_scale, backend):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("ember::merge_attn_states", mutates_args=())
def _merge_op(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("merge_attn_states", backend)(out_a, lse_a, out_b, lse_b)


@_merge_op.register_fake
def _merge_fake(out_a, lse_a, out_b, lse_b, backend):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


# ----------------------------------------------------------------------------------------------
# torch backend: adapters from the backend signatures to the references
# ----------------------------------------------------------------------------------------------

def _flash_attn_torch(q, k, v, softmax_scale, causal, window_left, window_right):
    return reference.flash_attn_func(q, k, v, softmax_scale, causal, (window_left, window_right),
                                     return_lse=True)


def _flash_attn_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             softmax_scale, causal, window_left, window_right, block_table=None):
    return reference.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        (window_left, window_right), return_lse=True, block_table=block_table)


def _flash_attn_kvcache_torch(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal,
                              window_left, window_right, num_splits, max_seqlen_k, tree_mask,
                              k_scale, v_scale):
    del max_seqlen_k  # a tile-shape hint; the reference has no tiles
    return reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens_k, block_table=block_table,
        softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
        num_splits=num_splits, return_lse=True, tree_mask=tree_mask, k_scale=k_scale,
        v_scale=v_scale)


# ----------------------------------------------------------------------------------------------
# Backend registrations
# ----------------------------------------------------------------------------------------------

_registry.register("flash_attn_func", torch=_flash_attn_torch)
_registry.register("flash_attn_varlen_func", torch=_flash_attn_varlen_torch)
_registry.register("flash_attn_varlen_func.paged", torch=_flash_attn_varlen_torch)
_registry.register("flash_attn_with_kvcache", torch=_flash_attn_kvcache_torch)
_registry.register("merge_attn_states", torch=reference.merge_attn_states)

# ---- Kernel backends: one `_registry.register(...)` line each, below this marker, e.g. ----
# _registry.register("flash_attn_func", triton="ember.triton_kernels.flash_attn:flash_attn_func")
# Register an op name only for what the kernel implements in full (see the module docstring).
_registry.register("flash_attn_with_kvcache",
                   triton="ember.triton_kernels.decode_attention:flash_attn_with_kvcache")
_registry.register("merge_attn_states",
                   triton="ember.triton_kernels.merge_attn_states:merge_attn_states")
_registry.register("flash_attn_func", triton="ember.triton_kernels.flash_attn:flash_attn")
_registry.register("flash_attn_varlen_func",
                   triton="ember.triton_kernels.flash_attn:flash_attn_varlen")
_registry.register("flash_attn_varlen_func.paged",
                   triton="ember.triton_kernels.flash_attn:flash_attn_varlen")
_registry.register("flash_attn_func", nki="ember.neuron_kernels.attention:flash_attn")
_registry.register("flash_attn_with_kvcache",
                   nki="ember.neuron_kernels.decode_attention:flash_attn_with_kvcache")
_registry.register("merge_attn_states",
                   nki="ember.neuron_kernels.decode_attention:merge_attn_states")
_registry.register("flash_attn_with_kvcache",
                   cuda="ember.ops._cuda_decode:flash_attn_with_kvcache")
_registry.register(FUSED_APPEND, cuda="ember.ops._cuda_decode:flash_attn_with_kvcache_append")
_registry.register("merge_attn_states", cuda="ember.ops._cuda_decode:merge_attn_states")
_registry.register("flash_attn_func", cuda="ember.ops._cuda_attention:flash_attn")
_registry.register("flash_attn_varlen_func", cuda="ember.ops._cuda_attention:flash_attn_varlen")
