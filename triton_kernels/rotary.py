"""Rotary position embedding in Triton: ``rotary_embedding`` (neox and gpt-j pairings, partial
rotary), one program per (token, block of heads) writing new q and k; and
``rotary_embedding_and_store_kvcache``, whose k programs write their rotated heads (rounded to
k's dtype) and the v heads beside them into the token's slot of a paged KV cache instead, with
store_kvcache's fp8 quantisation (``store_to_cache``), skipping tokens of slot -1.

Feature pair ``(a, b)`` of angle i becomes ``(a cos_i - b sin_i, b cos_i + a sin_i)`` in float32,
with ``cos_i, sin_i`` from row ``clip(position, 0, max_pos - 1)`` of ``cos_sin_cache``. The pairs
are ``(i, i + rotary_dim/2)`` (neox) or ``(2i, 2i + 1)`` (gpt-j); features past ``rotary_dim``
are copied unchanged.

Each feature is computed from itself and its partner, ``out[c] = x[c] cos + x[partner(c)]
(+/-)sin``, so one code path serves both pairings, any even rotary_dim (e.g. 20) and any head
dim (e.g. 80): a head block is loaded once contiguously and once in partner order (the second
load hits L1).

Per token, with heads H = heads_q + heads_kv, head dim D, rotary dim R and s-byte elements
(the token's cache row of R elements is read by each of its programs, from L2 after the first):
    FLOPs  3HR (two multiplies and an add per rotated feature)
    bytes  2HDs (read q and k, write the new q and k) + 4 or 8 for the position
Memory-bound: about 0.75 FLOP per byte in fp16 at full rotary. The fused op reads v too and
writes k and v as c-byte cache elements: bytes (Hq + 2 Hkv) D s + Hq D s + 2 Hkv D c + 8 for the
slot, where the two ops in sequence also write and read back the rotated k (2 Hkv D s).
"""

import torch
import triton
import triton.language as tl

from ember.triton_kernels.store_kvcache import store_to_cache

# Elements of one program's [heads, head_dim] tile: 8 per thread at 4 warps (one 16-byte load
# of fp16), and several programs per token so a small decode batch still spreads over the SMs.
TILE_ELEMENTS = 1024
NUM_WARPS = 4


@triton.jit
def _rotation(positions_ptr, cache_ptr, positions_stride, token, rotary_dim, max_pos,
              IS_NEOX: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rotation of one token, per feature: ``cols`` (the feature indices), ``partner`` (each
    feature's pair mate), ``rotated`` (whether it is in the rotary part) and its float32 ``cos``
    and ``signed_sin`` (sin negated for the first feature of a pair). cache: contiguous
    ``[max_pos, rotary_dim]``."""
    position = tl.load(positions_ptr + token * positions_stride).to(tl.int64)
    # Positions are not checked on the host on a GPU (no sync): clip, never read out of bounds.
    position = tl.minimum(tl.maximum(position, 0), max_pos - 1)

    cols = tl.arange(0, BLOCK_D)
    half = rotary_dim // 2
    rotated = cols < rotary_dim
    if IS_NEOX:  # pairs (i, i + half)
        first_of_pair = cols < half
        angle = tl.where(first_of_pair, cols, cols - half)
        partner = tl.where(first_of_pair, cols + half, cols - half)
    else:  # gpt-j: pairs (2i, 2i + 1)
        first_of_pair = cols % 2 == 0
        angle = cols // 2
        partner = cols ^ 1
    cache_row = cache_ptr + position * rotary_dim
    cos = tl.load(cache_row + angle, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + half + angle, mask=rotated, other=0.0).to(tl.float32)
    # (a, b) -> (a cos - b sin, b cos + a sin): the first of a pair subtracts its mate's term.
    signed_sin = tl.where(first_of_pair, -sin, sin)
    return cols, partner, rotated, cos, signed_sin


@triton.jit
def _rotated_heads(src_ptr, src_token_stride, src_head_stride, token, heads, mask,
                   cols, partner, rotated, cos, signed_sin):
    """Heads ``heads`` of one token of src, rotated (see _rotation): float32
    ``[len(heads), BLOCK_D]``, valid where ``mask``."""
    src = src_ptr + token * src_token_stride + heads[:, None] * src_head_stride
    x = tl.load(src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(src + partner[None, :], mask=mask & rotated[None, :], other=0.0)
    out = x * cos[None, :] + x_partner.to(tl.float32) * signed_sin[None, :]
    # tl.where, not cos = 1 / sin = 0 past rotary_dim, so the copied features keep their exact
    # bits (x * 1 + 0 would turn -0.0 into +0.0).
    return tl.where(rotated[None, :], out, x)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_token_stride, src_head_stride, dst_token_stride,
                  dst_head_stride, token, first_head, num_heads, head_dim,
                  cols, partner, rotated, cos, signed_sin, BLOCK_H: tl.constexpr):
    """Rotate heads ``[first_head, first_head + BLOCK_H)`` (those below num_heads) of one token
    from src into dst (see _rotation for the other arguments)."""
    heads = first_head + tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & (cols < head_dim)[None, :]
    out = _rotated_heads(src_ptr, src_token_stride, src_head_stride, token, heads, mask,
                         cols, partner, rotated, cos, signed_sin)
    dst = dst_ptr + token * dst_token_stride + heads[:, None] * dst_head_stride + cols[None, :]
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
    positions_stride, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
    q_out_token_stride, q_out_head_stride, k_out_token_stride, k_out_head_stride,
    heads_q, heads_kv, head_dim, rotary_dim, max_pos, num_q_blocks,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token ``program_id(0)``; head block ``program_id(1)``: the first ``num_q_blocks`` blocks
    are q's heads, the rest k's. cache: contiguous ``[max_pos, rotary_dim]``."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cols, partner, rotated, cos, signed_sin = _rotation(
        positions_ptr, cache_ptr, positions_stride, token, rotary_dim, max_pos, IS_NEOX, BLOCK_D)
    if head_block < num_q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, q_token_stride, q_head_stride, q_out_token_stride,
                      q_out_head_stride, token, head_block * BLOCK_H, heads_q, head_dim,
                      cols, partner, rotated, cos, signed_sin, BLOCK_H)
    else:
        _rotate_heads(k_ptr, k_out_ptr, k_token_stride, k_head_stride, k_out_token_stride,
                      k_out_head_stride, token, (head_block - num_q_blocks) * BLOCK_H, heads_kv,
                      head_dim, cols, partner, rotated, cos, signed_sin, BLOCK_H)


@triton.jit
def _rotary_store_kvcache_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr,
    positions_stride, slot_stride, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
    v_token_stride, v_head_stride, q_out_token_stride, q_out_head_stride,
    kc_block_stride, kc_slot_stride, kc_head_stride,
    vc_block_stride, vc_slot_stride, vc_head_stride,
    heads_q, heads_kv, head_dim, rotary_dim, max_pos, num_slots, block_size, num_q_blocks,
    IS_NEOX: tl.constexpr, FP8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_rotary_kernel whose k programs store into a paged cache: token ``program_id(0)``; head
    block ``program_id(1)``: the first ``num_q_blocks`` blocks are q's heads, rotated into
    q_out; the rest are k's and v's heads, written (k rotated) into the token's slot
    ``block * block_size + offset`` of ``[num_blocks, block_size, heads_kv, head_dim]`` caches.
    Slot -1 skips the token's k and v; so does a slot past ``num_slots`` (values go unchecked
    inside a CUDA graph), rather than a write out of bounds."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cols, partner, rotated, cos, signed_sin = _rotation(
        positions_ptr, cache_ptr, positions_stride, token, rotary_dim, max_pos, IS_NEOX, BLOCK_D)
    if head_block < num_q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, q_token_stride, q_head_stride, q_out_token_stride,
                      q_out_head_stride, token, head_block * BLOCK_H, heads_q, head_dim,
                      cols, partner, rotated, cos, signed_sin, BLOCK_H)
    else:
        slot = tl.load(slot_ptr + token * slot_stride)
        if (slot >= 0) & (slot < num_slots):
            heads = (head_block - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < heads_kv)[:, None] & (cols < head_dim)[None, :]
            block = slot // block_size
            offset = slot % block_size
            k = _rotated_heads(k_ptr, k_token_stride, k_head_stride, token, heads, mask,
                               cols, partner, rotated, cos, signed_sin)
            kc = (kc_ptr + block * kc_block_stride + offset * kc_slot_stride
                  + heads[:, None] * kc_head_stride + cols[None, :])
            # Rounded to k's dtype first: the tensor rotary_embedding would hand store_kvcache.
            store_to_cache(kc, k.to(k_ptr.dtype.element_ty), k_scale_ptr, mask, FP8)
            v = tl.load(v_ptr + token * v_token_stride + heads[:, None] * v_head_stride
                        + cols[None, :], mask=mask)
            vc = (vc_ptr + block * vc_block_stride + offset * vc_slot_stride
                  + heads[:, None] * vc_head_stride + cols[None, :])
            store_to_cache(vc, v, v_scale_ptr, mask, FP8)


def _tiles(head_dim, heads_q, heads_kv):
    """``(BLOCK_H, BLOCK_D)``: a program's heads and (padded) features."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(max(heads_q, heads_kv)),
                  max(1, TILE_ELEMENTS // block_d))
    return block_h, block_d


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions; returns new contiguous ``(q, k)``.

    positions: int32/int64 ``[T]`` (clipped to ``[0, max_pos)``); q: ``[T, heads_q, D]`` and
    k: ``[T, heads_kv, D]`` fp16/bf16/fp32 with contiguous last dims (any token and head
    strides, e.g. slices of a fused qkv tensor); cos_sin_cache: contiguous ``[max_pos,
    rotary_dim]`` float32 or q's dtype, cos half then sin half. Inputs are not modified.
    """
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    tokens, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    if tokens == 0 or heads_q + heads_kv == 0:
        return q_out, k_out
    max_pos, rotary_dim = cos_sin_cache.shape
    block_h, block_d = _tiles(head_dim, heads_q, heads_kv)
    num_q_blocks = triton.cdiv(heads_q, block_h)
    grid = (tokens, num_q_blocks + triton.cdiv(heads_kv, block_h))
    _rotary_kernel[grid](
        positions, q, k, cos_sin_cache, q_out, k_out,
        positions.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        heads_q, heads_kv, head_dim, rotary_dim, max_pos, num_q_blocks,
        IS_NEOX=is_neox, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return q_out, k_out


def rotary_embedding_and_store_kvcache(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                       slot_mapping, is_neox=True, k_scale=None, v_scale=None):
    """``rotary_embedding`` of q and k with the rotated k and v written into a paged cache;
    returns the new contiguous q.

    positions, q, k, cos_sin_cache: as for ``rotary_embedding``; v: like k; k_cache, v_cache:
    ``[num_blocks, block_size, heads_kv, D]`` with contiguous last dims, q's dtype or
    float8_e4m3fn (then with float32 one-element k_scale, v_scale); slot_mapping: int64 ``[T]``,
    ``block * block_size + offset`` or -1 to skip the token's k and v.
    """
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tokens, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    if tokens == 0 or heads_q + heads_kv == 0:
        return q_out
    max_pos, rotary_dim = cos_sin_cache.shape
    num_blocks, block_size = k_cache.shape[:2]
    block_h, block_d = _tiles(head_dim, heads_q, heads_kv)
    num_q_blocks = triton.cdiv(heads_q, block_h)
    grid = (tokens, num_q_blocks + triton.cdiv(heads_kv, block_h))
    fp8 = k_scale is not None
    _rotary_store_kvcache_kernel[grid](
        positions, q, k, v, cos_sin_cache, q_out, k_cache, v_cache, slot_mapping,
        # Any pointer stands in for the scales of a cache that has none; it is never read.
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        positions.stride(0), slot_mapping.stride(0), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        heads_q, heads_kv, head_dim, rotary_dim, max_pos, num_blocks * block_size, block_size,
        num_q_blocks,
        IS_NEOX=is_neox, FP8=fp8, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return q_out
