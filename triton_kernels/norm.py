"""RMSNorm in Triton: ``rms_norm`` and ``fused_add_rms_norm``, one program per row.

    rms_norm:            out = x * rsqrt(mean(x^2) + eps) * weight
    fused_add_rms_norm:  new_residual = round(x + residual);  out = rms_norm(new_residual)

All math is float32 with one rounding to the input dtype at the end; fused_add_rms_norm rounds
the sum to x's dtype first and normalises that rounded value, exactly as the unfused
``residual = x + residual; rms_norm(residual)`` does.

Per row of H features of s bytes each (weight's H * s bytes are read once from DRAM and then
from L2 by every other row, so they are left out):
    rms_norm             4H FLOPs (square, sum, scale by rsqrt, scale by weight) + 1 rsqrt;
                         2Hs bytes (read x, write out)
    fused_add_rms_norm   5H FLOPs + 1 rsqrt; 4Hs bytes (read x and residual, write out and
                         the new residual)
Both are memory-bound by far (about 1 FLOP per byte), so the kernel's job is to touch each
byte once with wide loads: a row of up to MAX_ROW_BLOCK features stays in registers between
the reduction and the scaling. Wider rows, which no current model has, take two passes over
chunks of MAX_ROW_BLOCK; the second pass re-reads the row, mostly from L2.
"""

import torch
import triton
import triton.language as tl

# Features of one row held in registers at once: 16384 covers every hidden size in use today
# (Llama-3 405B has 16384) with 16 warps at 32 float32 values per thread.
MAX_ROW_BLOCK = 16384


@triton.jit
def _row_chunk(x_row, residual_row, residual_out_row, cols, mask,
               ADD_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr):
    """float32 values of features ``cols`` of the row to normalise: x, or ``x + residual``
    rounded to x's dtype (and stored as the new residual when STORE_RESIDUAL)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        if STORE_RESIDUAL:
            tl.store(residual_out_row + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    x_row_stride, residual_row_stride, hidden, eps,
    BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    """Normalise row ``program_id(0)`` of x (plus residual when ADD_RESIDUAL).

    x, residual: rows of ``hidden`` contiguous features, ``*_row_stride`` elements apart.
    out, residual_out: contiguous ``[rows, hidden]``. weight: ``[hidden]``.
    ONE_CHUNK: ``hidden <= BLOCK``, so the row stays in registers.
    """
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2^31 on long prefills
    x_row = x_ptr + row * x_row_stride
    residual_row = residual_ptr + row * residual_row_stride
    out_row = out_ptr + row * hidden
    residual_out_row = residual_out_ptr + row * hidden
    cols = tl.arange(0, BLOCK)
    if ONE_CHUNK:
        mask = cols < hidden
        x = _row_chunk(x_row, residual_row, residual_out_row, cols, mask, ADD_RESIDUAL, True)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            x = _row_chunk(x_row, residual_row, residual_out_row, start + cols, mask,
                           ADD_RESIDUAL, True)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            # The rounded sum is recomputed rather than read back from residual_out, so no
            # ordering between this program's own stores and loads is needed.
            x = _row_chunk(x_row, residual_row, residual_out_row, start + cols, mask,
                           ADD_RESIDUAL, False)
            weight = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + start + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty),
                     mask=mask)


def _launch(x, residual, weight, out, residual_out, eps):
    """Run the kernel over all rows of ``x [..., H]`` (non-empty); outputs are contiguous."""
    hidden = x.shape[-1]
    # A view when the leading dims flatten by strides (the usual case, including row-strided
    # column slices); otherwise a copy, which the kernel then reads contiguously.
    x_rows = x.reshape(-1, hidden)
    residual_rows = x_rows if residual is None else residual.reshape(-1, hidden)
    block = min(triton.next_power_of_2(hidden), MAX_ROW_BLOCK)
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight, out, out if residual_out is None else residual_out,
        x_rows.stride(0), residual_rows.stride(0), hidden, eps,
        BLOCK=block, ONE_CHUNK=hidden <= block, ADD_RESIDUAL=residual is not None,
        # 8 features per thread (one 16-byte fp16 load) up to H = 4096, then 16 warps with up
        # to 32 each: enough threads per row that a decode batch's few rows are not latency-
        # bound on one warp.
        num_warps=min(max(block // 256, 1), 16),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` in float32, rounded once to x's dtype.

    x: ``[..., H]`` fp16/bf16/fp32, contiguous last dim; weight: ``[H]`` contiguous, x's dtype.
    Returns a new contiguous tensor shaped and typed like x.
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _launch(x, None, weight, out, None, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``, the sum rounded to x's dtype first.

    x, residual: ``[..., H]`` fp16/bf16/fp32, same shape and dtype, contiguous last dims;
    weight: ``[H]`` contiguous, x's dtype. Returns two new contiguous tensors shaped like x.
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _launch(x, residual, weight, out, new_residual, eps)
    return out, new_residual
