"""store_kvcache in Triton: one program per (token, head) row, scattered by slot index.

Bytes per token: 2 * heads * head_dim * (in_bytes + cache_bytes) + 8; no FLOPs.
"""

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def store_to_cache(ptrs, x, scale_ptr, mask, FP8: tl.constexpr):
    """Store x at the cache elements ``ptrs``: as it is, or into an fp8 cache as ``x / scale``
    saturated to the e4m3 range (±448) and rounded to nearest even, as the torch reference does.
    Shared with rotary_embedding_and_store_kvcache (rotary.py), so both quantise alike."""
    if FP8:
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    block_size, head_dim,
    BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        cols = tl.arange(0, BLOCK_D)
        mask = cols < head_dim
        k = tl.load(k_ptr + token * stride_kt + head * stride_kh + cols, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + head * stride_vh + cols, mask=mask)
        kc = kc_ptr + block * stride_kcb + offset * stride_kcs + head * stride_kch + cols
        vc = vc_ptr + block * stride_vcb + offset * stride_vcs + head * stride_vch + cols
        store_to_cache(kc, k, k_scale_ptr, mask, FP8)
        store_to_cache(vc, v, v_scale_ptr, mask, FP8)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    num_tokens, heads, head_dim = k.shape
    if num_tokens == 0:
        return
    fp8 = k_scale is not None
    _store_kvcache_kernel[(num_tokens, heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        k_cache.shape[1], head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), FP8=fp8,
    )
