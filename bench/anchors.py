"""Anchors: the best a user has today without ember, each a plain callable on torch tensors.

Every benchmark row is compared with these in the same run. Preparation that a user does once
(packing a weight, compressing a 2:4 matrix) is a separate function from the timed call.

- attention: torch SDPA restricted to its FlashAttention-2 backend or its cuDNN backend (with
  an explicit mask: cuDNN or memory-efficient, since flash takes no mask);
- dense GEMM: cuBLAS through ``torch.matmul``;
- MoE: ``torch._grouped_mm`` (CUTLASS grouped GEMM) and a per-expert loop of cuBLAS calls;
- fp8 GEMM: ``torch._scaled_mm`` with row-wise scales;
- int4 weight-only GEMM: torch's tinygemm kernel (``torch._weight_int4pack_mm``);
- 2:4 sparse GEMM: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, else CUTLASS).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------

def _sdpa_nhd(q, k, v, causal, softmax_scale, attn_mask=None):
    # SDPA wants [batch, heads, seq, dim]; transposing flash-attn's [batch, seq, heads, dim] is a
    # view, and both backends take those strides as they are (no copy).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
        is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def sdpa(q, k, v, *, causal=False, backend="flash", softmax_scale=None):
    """torch SDPA on one backend ("flash": FlashAttention-2, "cudnn": cuDNN), flash-attn layout.

    q ``[batch, seqlen_q, heads_q, d]``, k/v ``[batch, seqlen_k, heads_kv, d]``, fp16/bf16; GQA
    (``heads_q > heads_kv``) passes ``enable_gqa=True``. Returns ``[batch, seqlen_q, heads_q,
    d]`` (a strided view). SDPA aligns the causal mask top-left, so it matches flash-attn's
    bottom-right mask only when ``seqlen_q == seqlen_k``. Raises if the backend cannot run it.
    """
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return _sdpa_nhd(q, k, v, causal, softmax_scale)


def sdpa_masked(q, k, v, mask, *, backend="cudnn", softmax_scale=None):
    """torch SDPA with an explicit boolean mask, on one backend ("cudnn" or "efficient": the
    flash backend takes no mask), flash-attn layout.

    q ``[batch, seqlen_q, heads_q, d]``, k/v ``[batch, seqlen_k, heads_kv, d]``, fp16/bf16;
    mask bool ``[seqlen_q, seqlen_k]`` (True: attend), broadcast over batch and heads, e.g.
    ``ember.ops.reference.attention_mask(sq, sk, causal=True)`` for flash-attn's bottom-right
    causal mask. GQA passes ``enable_gqa=True``. Returns ``[batch, seqlen_q, heads_q, d]`` (a
    strided view). Raises if the backend cannot run it.
    """
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return _sdpa_nhd(q, k, v, False, softmax_scale, attn_mask=mask)


def sdpa_varlen_loop(q, k, v, seqlens: Sequence[int], *, causal=False, backend="flash",
                     softmax_scale=None) -> list[torch.Tensor]:
    """``flash_attn_varlen_func``'s work done the way torch offers it: SDPA once per sequence.

    q ``[total, heads_q, d]``, k/v ``[total, heads_kv, d]`` with the sequences packed back to
    back; ``seqlens`` their lengths (host ints, self-attention: the same for q and k). No padding,
    so no wasted FLOPs, but one launch per sequence. Returns the per-sequence outputs
    ``[1, len, heads_q, d]`` (not concatenated: a copy would add traffic the kernel does not do).
    """
    outs, start = [], 0
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        for length in seqlens:
            rows = slice(start, start + length)
            outs.append(_sdpa_nhd(q[rows].unsqueeze(0), k[rows].unsqueeze(0),
                                  v[rows].unsqueeze(0), causal, softmax_scale))
            start += length
    return outs


# ----------------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------------

def cublas_matmul(a, b, out=None):
    """``a [M, K] @ b [K, N]`` through cuBLAS (``torch.matmul``), optionally into ``out``."""
    return torch.matmul(a, b, out=out)


def grouped_mm(x, w, group_ends):
    """MoE expert GEMM through ``torch._grouped_mm`` (one CUTLASS grouped launch, sm90+).

    x bf16 ``[tokens, K]`` with rows sorted by group; w bf16 ``[E, N, K]`` (ember's layout:
    one ``nn.Linear`` weight per expert); group_ends int32 ``[E]`` cumulative row counts (group
    e is rows ``group_ends[e-1]:group_ends[e]``). Returns bf16 ``[tokens, N]``.
    """
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=group_ends)


def grouped_mm_loop(x, w, group_sizes: Sequence[int]):
    """The same product as ``grouped_mm`` as a per-expert loop of cuBLAS calls (host-side
    ``group_sizes``), as MoE code without a grouped kernel does it."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for expert, rows in enumerate(group_sizes):
        if rows:
            torch.matmul(x[start:start + rows], w[expert].t(), out=out[start:start + rows])
        start += rows
    return out


def fp8_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, out_dtype=torch.bfloat16):
    """fp8 e4m3 GEMM with per-token and per-channel scales through ``torch._scaled_mm``.

    x_fp8 ``[M, K]`` and w_fp8 ``[N, K]`` float8_e4m3fn (row-major, K a multiple of 16);
    x_scale float32 ``[M]``, w_scale float32 ``[N]``. Returns ``out_dtype [M, N]`` equal to
    ``(x_fp8 * x_scale[:, None]) @ (w_fp8 * w_scale[:, None]).T`` accumulated in float32.
    """
    return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale.reshape(-1, 1).float(),
                            scale_b=w_scale.reshape(1, -1).float(), out_dtype=out_dtype)


def int4_tinygemm_pack(q, scales, zeros, *, inner_k_tiles=8):
    """Pack a group-quantised int4 weight for torch's tinygemm kernel (once, not timed).

    q ``[N, K]`` integers in 0..15 (any integer dtype); scales, zeros ``[N, K // group]``.
    The weight they stand for is ``(q - 8) * scale + zero`` per group of ``group`` columns.
    N must be a multiple of 8 and K of ``inner_k_tiles * 16`` (inner_k_tiles in 2, 4, 8).
    Returns (packed int32 weight, bf16 scales_and_zeros ``[K // group, N, 2]``).
    """
    q = q.to(torch.uint8)
    # Two nibbles per byte with the even column in the high nibble: the input layout of
    # _convert_weight_to_int4pack on CUDA.
    nibbles = (q[:, 0::2] << 4) | q[:, 1::2]
    packed = torch._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous()


def int4_tinygemm_mm(x, packed, scales_and_zeros, group_size):
    """bf16 ``x [M, K]`` times the packed int4 weight transposed: bf16 ``[M, N]``
    (``group_size`` in 32, 64, 128, 256, as packed)."""
    return torch._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)


def sparse24_compress(w):
    """Compress a 2:4 sparse weight (once, not timed): fp16/bf16 ``[N, K]`` with at most two
    non-zeros in every four consecutive columns, N a multiple of 32 and K of 64. Returns torch's
    semi-structured tensor. torch does not check the pattern: a weight that is not 2:4 gives
    wrong products, so prune it first."""
    return torch.sparse.to_sparse_semi_structured(w)


def sparse24_linear(x, w_sparse):
    """``x [M, K] @ w.T`` with the compressed weight from ``sparse24_compress``: ``[M, N]``."""
    return F.linear(x, w_sparse)
