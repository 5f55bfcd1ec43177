"""CUDA backends of the engine glue ops ``rms_norm``, ``fused_add_rms_norm``,
``rotary_embedding``, ``rotary_embedding_and_store_kvcache`` and ``silu_and_mul``: launch
wrappers for the kernels in ``csrc/norm/``, ``csrc/rotary/`` and ``csrc/activation/`` (through
``ember._C``).

The public functions in ``ember.ops.norm``, ``.rotary`` and ``.activation`` have validated the
inputs (dtypes, shapes, devices, contiguous last dims), and each wrapper here has the signature
of its torch reference. A wrapper allocates dense outputs with ``torch.empty`` (the custom ops
return new tensors, never their inputs; only the KV caches are written in place) and passes
pointers, sizes, strides in elements, dtype codes and the current stream. Nothing here reads a
tensor back to the host, so the ops can be captured in CUDA graphs. The kernels choose between
16-byte vector and scalar access from the pointers and strides themselves, so any layout these
functions accept is safe.
"""

import torch

from ember.ops import _ext


def _rows(t):
    """``t [..., n]`` as ``[rows, n]`` with a single row stride: a view when the leading dims
    merge (contiguous tensors, row slices of a fused projection), else a copy."""
    return t.reshape(-1, t.shape[-1])


def rms_norm(x, weight, eps=1e-6):
    """CUDA backend of ``ember.ops.rms_norm``: x ``[..., H]``, weight ``[H]`` (contiguous)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        rows = _rows(x)
        _ext.load_extension().rms_norm(
            rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1],
            rows.stride(0), eps, _ext.dtype_code(x), _ext.stream_of(x))
    return out


def fused_add_rms_norm(x, residual, weight, eps=1e-6):
    """CUDA backend of ``ember.ops.fused_add_rms_norm``; returns new ``(out, residual)``."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        x_rows, residual_rows = _rows(x), _rows(residual)
        _ext.load_extension().fused_add_rms_norm(
            x_rows.data_ptr(), residual_rows.data_ptr(), weight.data_ptr(), out.data_ptr(),
            new_residual.data_ptr(), x_rows.shape[0], x_rows.shape[1], x_rows.stride(0),
            residual_rows.stride(0), eps, _ext.dtype_code(x), _ext.stream_of(x))
    return out, new_residual


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    """CUDA backend of ``ember.ops.rotary_embedding``: positions int32/int64 ``[T]`` (any
    stride, clipped on the device), q ``[T, heads_q, D]`` and k ``[T, heads_k, D]`` with any
    token/head strides, cos_sin_cache contiguous ``[max_pos, rotary_dim]``."""
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if out_q.numel() or out_k.numel():
        max_positions, rotary_dim = cos_sin_cache.shape
        _ext.load_extension().rotary_embedding(
            positions.data_ptr(), q.data_ptr(), k.data_ptr(), cos_sin_cache.data_ptr(),
            out_q.data_ptr(), out_k.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2],
            rotary_dim, max_positions, positions.stride(0), q.stride()[:2], k.stride()[:2],
            is_neox, positions.dtype == torch.int64, _ext.dtype_code(q),
            _ext.dtype_code(cos_sin_cache), _ext.stream_of(q))
    return out_q, out_k


def rotary_embedding_and_store_kvcache(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                       slot_mapping, is_neox=True, k_scale=None, v_scale=None):
    """CUDA backend of ``ember.ops.rotary_embedding_and_store_kvcache``: positions and q, k as
    for ``rotary_embedding``, v like k; k_cache, v_cache ``[num_blocks, block_size, heads_kv,
    D]`` with any strides but the last, slot_mapping int64 ``[T]`` (any stride; slots outside
    the cache are skipped on the device), k_scale/v_scale float32 for fp8 caches. Returns the
    new q; writes the caches."""
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] and q.shape[1] + k.shape[1]:
        max_positions, rotary_dim = cos_sin_cache.shape
        _ext.load_extension().rotary_embedding_and_store_kvcache(
            positions.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
            cos_sin_cache.data_ptr(), slot_mapping.data_ptr(), _ext.ptr(k_scale),
            _ext.ptr(v_scale), out_q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            q.shape[0], q.shape[1], k.shape[1], q.shape[2], rotary_dim, max_positions,
            k_cache.shape[0], k_cache.shape[1], positions.stride(0), slot_mapping.stride(0),
            q.stride()[:2], k.stride()[:2], v.stride()[:2], k_cache.stride()[:3],
            v_cache.stride()[:3], is_neox, positions.dtype == torch.int64, _ext.dtype_code(q),
            _ext.dtype_code(cos_sin_cache), _ext.dtype_code(k_cache), _ext.stream_of(q))
    return out_q


def silu_and_mul(x):
    """CUDA backend of ``ember.ops.silu_and_mul``: x ``[..., 2I]`` -> ``[..., I]``."""
    inner = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inner, dtype=x.dtype, device=x.device)
    if out.numel():
        rows = _rows(x)
        _ext.load_extension().silu_and_mul(
            rows.data_ptr(), out.data_ptr(), rows.shape[0], inner, rows.stride(0),
            _ext.dtype_code(x), _ext.stream_of(x))
    return out
