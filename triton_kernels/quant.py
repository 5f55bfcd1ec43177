"""Weight-only quantized GEMMs in Triton: ``w8a16_gemm`` (int8, a scale per output channel) and
``w4a16_gemm`` (int4 codes, a scale and zero point per group of K).

One program per ``[BLOCK_M, BLOCK_N]`` output tile streams K: the weight tile arrives as
integer codes and is turned into x's dtype in registers (the codes, or code - zero for int4,
are small integers, exact in fp16/bf16), multiplied by x on the tensor cores with float32
accumulation; the scales multiply the float32 partial sums, per output channel (int8: once at
the end) or per group (int4: after each K tile, which lies in one group). So no dequantised
weight exists anywhere, and no rounding beyond the reference's float32 one.

Work for x ``[M, K]``, weight ``[N, K]`` (s-byte activations):
    FLOPs  2 M N K
    bytes  N K (int8) or N K / 2 (int4, plus 5 bytes of scale and zero per group) for the
           weight, + s (M K + M N)
Decode (small M) is memory-bound on the weight: int8 halves and int4 quarters bf16's bytes.
"""

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # the smallest tl.dot tile: decode batches are a few rows
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4


@triton.jit
def _w8a16_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, m, n, k,
                  stride_xm, stride_qn, stride_om, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        codes = tl.load(q_ptr + cols.to(tl.int64)[None, :] * stride_qn + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0)
        acc += tl.dot(x, codes.to(x.dtype), input_precision=PRECISION)
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w4a16_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, m, n, k, group_size,
                  stride_xm, stride_pn, stride_sn, stride_om, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_K divides group_size, so each K tile lies in one group. A packed byte holds
    columns 2j (low nibble) and 2j + 1 (high nibble): the tile is two half-tiles, multiplied
    by x's even and odd columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j: columns 2j and 2j + 1
        x_even = tl.load(x_rows + 2 * pairs[None, :], mask=row_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + 2 * pairs[None, :] + 1, mask=row_ok[:, None], other=0.0)
        packed = tl.load(packed_ptr + cols.to(tl.int64)[None, :] * stride_pn + pairs[:, None],
                         mask=col_ok[None, :], other=0)
        group = k0 // group_size
        zero = tl.load(zeros_ptr + cols * stride_sn + group, mask=col_ok, other=0)
        low = (packed & 0xF).to(tl.int32) - zero.to(tl.int32)[None, :]
        high = (packed >> 4).to(tl.int32) - zero.to(tl.int32)[None, :]
        partial = tl.dot(x_even, low.to(x_even.dtype), input_precision=PRECISION)
        partial = tl.dot(x_odd, high.to(x_odd.dtype), partial, input_precision=PRECISION)
        acc += partial * tl.load(scales_ptr + cols * stride_sn + group, mask=col_ok,
                                 other=0.0)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _grid(m, n):
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


def _precision(x):
    # float32 activations multiply in full precision, not tf32 (Triton's default on a GPU).
    return "ieee" if x.dtype == torch.float32 else "tf32"


def w8a16_gemm(x, qweight, scale):
    """Triton backend of ``ember.ops.w8a16_gemm`` (inputs validated there): x ``[M, K]``
    fp16/bf16/fp32 with a contiguous last dim, qweight int8 ``[N, K]`` contiguous, scale float32
    ``[N]``. Returns ``x @ (qweight * scale[:, None])^T`` ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    _w8a16_kernel[_grid(m, n)](x, qweight, scale.float().contiguous(), out, m, n, k,
                               x.stride(0), qweight.stride(0), out.stride(0),
                               PRECISION=_precision(x), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out


def w4a16_gemm(x, packed, scales, zeros, group_size):
    """Triton backend of ``ember.ops.w4a16_gemm`` (inputs validated there): x ``[M, K]``,
    packed uint8 ``[N, K/2]``, scales float32 and zeros uint8 ``[N, K/group_size]``, all
    contiguous, group_size in (32, 64, 128, 256). Returns ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_k = min(BLOCK_K, group_size)
    _w4a16_kernel[_grid(m, n)](x, packed, scales, zeros, out, m, n, k, group_size,
                               x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
                               PRECISION=_precision(x), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_K=block_k, num_warps=NUM_WARPS)
    return out
