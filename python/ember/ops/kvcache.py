"""KV-cache data movement: ``store_kvcache``."""

import torch

from ember.ops import _ext, _registry, reference
from ember.ops._validation import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_fp8_scales,
    check_tensor,
    rows_16b_aligned,
    values_readable,
)

FP8_CACHE_DTYPE = torch.float8_e4m3fn


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *,
                  backend="auto"):
    """Scatter new K/V rows into a paged KV cache, in place.

    Args:
        k, v: ``[num_tokens, heads_kv, head_dim]`` fp16/bf16 (float32 on the torch backend);
            any token/head strides, contiguous head_dim (slices of a fused QKV projection are
            fine).
        k_cache, v_cache: ``[num_blocks, block_size, heads_kv, head_dim]``, the dtype of ``k`` or
            ``torch.float8_e4m3fn``; contiguous head_dim.
        slot_mapping: int64 ``[num_tokens]``; ``block * block_size + offset`` per token, ``-1``
            skips the token (padding).
        k_scale, v_scale: float32 scalar tensors, required for fp8 caches: the cache holds
            ``value / scale`` saturated to the e4m3 range (±448), rounded to nearest even.
        backend: "auto", "cuda", "triton" or "torch".

    Slots must be distinct (two tokens writing one slot is a race). Returns ``None``.
    """
    op = "store_kvcache"
    _check_store_kvcache(op, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    # float32 only on the torch reference ("auto" picks it).
    unsupported = None if k.dtype in HALF_DTYPES else f"dtype {k.dtype} (kernels take fp16/bf16)"
    chosen = _registry.resolve_supported(op, op, backend, k.device, unsupported)
    # The kernels index slot_mapping by token: hand them unit-stride slots.
    torch.ops.ember.store_kvcache(k, v, k_cache, v_cache, slot_mapping.contiguous(), k_scale,
                                  v_scale, chosen)


def _check_store_kvcache(op, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    """store_kvcache's checks, in errors that name ``op`` (also
    rotary_embedding_and_store_kvcache, which stores its rotated k through them)."""
    check_tensor(op, "k", k, dtypes=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    num_tokens, heads, head_dim = k.shape
    dev = k.device
    check_tensor(op, "v", v, dtypes=(k.dtype,), shape=k.shape, device=dev, last_dim_contiguous=True)
    if head_dim % 8 != 0:
        raise ValueError(f"{op}: head_dim must be a multiple of 8, got {head_dim}")
    cache_dtypes = (k.dtype, FP8_CACHE_DTYPE)
    check_tensor(op, "k_cache", k_cache, dtypes=cache_dtypes, ndim=4, device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "k_cache", k_cache, shape=(None, None, heads, head_dim))
    check_tensor(op, "v_cache", v_cache, dtypes=(k_cache.dtype,), shape=k_cache.shape, device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(num_tokens,),
                 device=dev)
    check_fp8_scales(op, k_cache, k_scale, v_scale)
    # The kernels' vector loads need 16-byte aligned rows.
    for name, t in (("k", k), ("v", v)):
        if k.dtype in HALF_DTYPES and not rows_16b_aligned(t):
            raise ValueError(f"{op}: {name} rows must be 16-byte aligned (strides multiple of 8)")
    # Host-side bounds check of the slots: ONE small device->host copy (both ends together),
    # cheaper than a fault.
    if num_tokens and values_readable(dev):
        capacity = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = torch.stack(torch.aminmax(slot_mapping)).tolist()
        if lo < -1 or hi >= capacity:
            raise ValueError(f"{op}: slot_mapping values must be -1 or in [0, {capacity}), "
                             f"got range [{lo}, {hi}]")


@torch.library.custom_op("ember::store_kvcache", mutates_args=("k_cache", "v_cache"))
def _store_kvcache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                      backend: str) -> None:
    _registry.implementation("store_kvcache", backend)(
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_store_kvcache_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend):
    return None


def _store_kvcache_cuda(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    _ext.load_extension().store_kvcache(
        k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slot_mapping.data_ptr(), _ext.ptr(k_scale), _ext.ptr(v_scale),
        k.shape[0], k.shape[1], k.shape[2], k_cache.shape[1],
        k.stride()[:2], v.stride()[:2], k_cache.stride()[:3], v_cache.stride()[:3],
        _ext.dtype_code(k), _ext.dtype_code(k_cache), _ext.stream_of(k))


_registry.register(
    "store_kvcache",
    cuda=_store_kvcache_cuda,
    triton="ember.triton_kernels.store_kvcache:store_kvcache",
    torch=reference.store_kvcache,
)
