"""CUDA backend of ``flash_attn_func`` / ``flash_attn_varlen_func``: launches ``ember._C``.

The hand-written FlashAttention-2 forward kernel lives in ``csrc/attention/``. Inputs arrive
validated and with defaults resolved (``ember.ops.attention``); this module turns tensors into
pointers, (batch, row, head) strides and sizes, allocates ``out`` and ``lse`` and launches on
the current stream of the inputs' device. Both functions return ``(out, lse)``.
"""

import torch

from ember.ops import _ext
from ember.ops._validation import with_16b_aligned_rows


def flash_attn(q, k, v, softmax_scale: float, causal: bool, window_left: int, window_right: int):
    """Batch mode.

    q: ``[batch, seqlen_q, heads_q, head_dim]``; k, v: ``[batch, seqlen_k, heads_kv, head_dim]``;
    fp16/bf16 CUDA tensors with a contiguous last dim, head_dim in (64, 96, 128, 256).
    Returns out ``[batch, seqlen_q, heads_q, head_dim]`` (q's dtype) and lse float32
    ``[batch, heads_q, seqlen_q]``.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    q, k, v = with_16b_aligned_rows(q), with_16b_aligned_rows(k), with_16b_aligned_rows(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    left, right = _window(window_left, window_right, seqlen_q, seqlen_k)
    _launch(q, k, v, out, lse, None, None, batch=batch, heads_q=heads_q, heads_kv=heads_kv,
            seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
            strides=[t.stride()[:3] for t in (q, k, v, out)],
            lse_strides=(heads_q * seqlen_q, seqlen_q),
            softmax_scale=softmax_scale, window=(left, right))
    return out, lse


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      softmax_scale: float, causal: bool, window_left: int, window_right: int):
    """Varlen mode: sequences packed along the token axis, no padding.

    q: ``[total_q, heads_q, head_dim]``; k, v: ``[total_k, heads_kv, head_dim]``;
    cu_seqlens_q/k: contiguous int32 ``[batch + 1]`` cumulative lengths (0 first, ``total``
    last, non-decreasing); max_seqlen_q/k: at least the longest sequence (they size the grid).
    Returns out ``[total_q, heads_q, head_dim]`` and lse float32 ``[heads_q, total_q]``.
    """
    total_q, heads_q, head_dim = q.shape
    total_k, heads_kv = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    q, k, v = with_16b_aligned_rows(q), with_16b_aligned_rows(k), with_16b_aligned_rows(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    # Window bounds as wide as the packed tensors are as good as none.
    left, right = _window(window_left, window_right, total_q, total_k)
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch=batch, heads_q=heads_q,
            heads_kv=heads_kv, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, head_dim=head_dim,
            strides=[(0, *t.stride()[:2]) for t in (q, k, v, out)],
            lse_strides=(0, total_q), softmax_scale=softmax_scale, window=(left, right))
    return out, lse


def _window(left, right, seqlen_q, seqlen_k):
    """Kernel window bounds, -1 for a bound that cuts nothing.

    ``causal`` needs no handling of its own: it arrives as window_right == 0. Query row i sits
    at key position i + seqlen_k - seqlen_q, so every key is less than seqlen_k positions left
    of it and less than seqlen_q positions right of it: wider bounds are dropped, which also
    keeps the kernel's int32 index arithmetic far from overflow.
    """
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_q:
        right = -1
    return left, right


def _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, batch, heads_q, heads_kv,
            seqlen_q, seqlen_k, head_dim, strides, lse_strides, softmax_scale, window):
    q_strides, k_strides, v_strides, o_strides = strides
    # The kernel launches on the current device: make it the inputs' device.
    with torch.cuda.device(q.device):
        _ext.load_extension().flash_attn_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            _ext.ptr(cu_seqlens_q), _ext.ptr(cu_seqlens_k), batch, heads_q, heads_kv,
            seqlen_q, seqlen_k, head_dim, q_strides, k_strides, v_strides, o_strides,
            lse_strides, float(softmax_scale), window[0], window[1], _ext.dtype_code(q),
            _ext.stream_of(q))
