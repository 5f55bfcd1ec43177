"""Tiled matmul on a NeuronCore, ``out [M, N] = x [M, K] @ w [N, K]^T`` (torch's linear
layout), and the tiling driver the quantized GEMMs share.

Tiles as in the nki-samples matmul tutorial: TensorE contracts over the partitions, so both
operands are brought to K-major layout (``x^T`` chunks ``[128 K, <=128 M]`` are the stationary
operand, ``w^T`` chunks ``[128 K, <=512 N]`` the moving one) by TensorE transposes of row
tiles; one ``[128, 512]`` float32 PSUM bank accumulates over all K chunks; the loop runs N
blocks outside, M tiles inside, so each weight block is read from HBM once, and the ``x^T``
tiles stay in SBUF across N blocks when they fit (``X_RESIDENT_BYTES``).
"""

from ember.neuron_kernels import host
from ember.neuron_kernels.nki_api import nisa, nki, nl
from ember.neuron_kernels.tiles import (
    FMAX,
    PMAX,
    chunks,
    columns_of,
    itemsize,
    transpose_blocks,
)

X_RESIDENT_BYTES = 64 * 1024  # per partition
FP8_MAX = 448.0               # float8_e4m3fn
FP32_TINY = 1.1754943508222875e-38


def weight_columns(w_rows, dtype):
    """SBUF weight row tiles ``[nr_i <= 128, K]`` (any dtype, e.g. int8 or fp8) -> list over
    128-wide K chunks of ``[kc, sum nr_i]`` tiles in the matmul ``dtype``: transposed on
    TensorE, widened on the copy out of PSUM."""
    cols = []
    for k0, kc in chunks(w_rows[0].shape[1], PMAX):
        tile = nl.ndarray((kc, sum(r.shape[0] for r in w_rows)), dtype=dtype, buffer=nl.sbuf)
        transpose_blocks(tile, [r[:, k0:k0 + kc] for r in w_rows])
        cols.append(tile)
    return cols


def accumulate(acc, x_cols, w_cols):
    """``acc [m, n] (PSUM) = sum over K chunks of x_cols[i]^T @ w_cols[i]``."""
    for i in range(len(x_cols)):
        nisa.nc_matmul(dst=acc, stationary=x_cols[i], moving=w_cols[i], accumulate=i > 0)


def quantized_x_columns(rows, dtype):
    """Per-row dynamic e4m3 quantisation of SBUF x rows ``[m, K]`` (``reference.quantize_fp8``):
    ``scale = max(max|x| / 448, tiny)``, ``x_fp8 = x / scale`` rounded to e4m3fn. Returns the
    K-major chunks of x_fp8 in ``dtype`` and the float32 ``[m, 1]`` scales. |x / scale| <= 448
    up to the last bit of the division, which e4m3fn rounding brings back to 448, so no clamp."""
    m = rows.shape[0]
    top = nl.ndarray((m, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=top, op=nl.maximum, data=rows, axis=1)
    neg_bottom = nl.ndarray((m, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_bottom, op=nl.minimum, data=rows, axis=1, negate=True)
    scale = nl.ndarray((m, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=scale, data1=top, data2=neg_bottom, op=nl.maximum)
    nisa.tensor_scalar(dst=scale, data=scale, op0=nl.divide, operand0=FP8_MAX,
                       op1=nl.maximum, operand1=FP32_TINY)
    x_fp8 = nl.ndarray(rows.shape, dtype=nl.float8_e4m3fn, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=x_fp8, data=rows, op0=nl.divide, operand0=scale)
    return columns_of(x_fp8, dtype), scale


def _x_columns(x, m0, mr, dtype, quantize_x):
    """K-major chunks of x rows ``[m0, m0+mr)`` (and their fp8 scales when quantising)."""
    rows = nl.ndarray((mr, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=rows, src=x[m0:m0 + mr, :])
    if quantize_x:
        return quantized_x_columns(rows, dtype)
    return columns_of(rows, dtype), None


def linear(out, x, w, dtype, col_scale=None, scale_columns=False, quantize_x=False):
    """``out [M, N] (HBM) = epilogue(x [M, K] @ w [N, K]^T)`` with TensorE in ``dtype``.

    scale_columns: multiply column n by ``col_scale[n]`` (float32 HBM ``[N]``: per output
    channel weight scales). quantize_x: quantise x rows to e4m3 first and multiply row m by
    its scale (``fp8_gemm``).
    """
    m_total, k = x.shape
    n_total = w.shape[0]
    m_tiles = chunks(m_total, PMAX)
    resident = m_total * k * itemsize(dtype) // PMAX <= X_RESIDENT_BYTES
    x_cache = [_x_columns(x, m0, mr, dtype, quantize_x) for m0, mr in m_tiles] \
        if resident else []
    for n0, nb in chunks(n_total, FMAX):
        w_rows = []
        for r0, nr in chunks(nb, PMAX):
            rows = nl.ndarray((nr, k), dtype=w.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=rows, src=w[n0 + r0:n0 + r0 + nr, :])
            w_rows.append(rows)
        w_cols = weight_columns(w_rows, dtype)
        if scale_columns:
            # The block's scales on the partitions of the output rows (a stride-0 DMA
            # broadcast: each partition reads the row again, so only as many as needed).
            parts = m_tiles[0][1]
            scale_row = nl.ndarray((parts, nb), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=scale_row, src=col_scale.ap(pattern=[[0, parts], [1, nb]],
                                                          offset=n0))
        for t in range(len(m_tiles)):
            m0, mr = m_tiles[t]
            x_cols, row_scale = x_cache[t] if resident else _x_columns(x, m0, mr, dtype,
                                                                        quantize_x)
            acc = nl.ndarray((mr, nb), dtype=nl.float32, buffer=nl.psum)
            accumulate(acc, x_cols, w_cols)
            res = nl.ndarray((mr, nb), dtype=out.dtype, buffer=nl.sbuf)
            if quantize_x:
                nisa.scalar_tensor_tensor(dst=res, data=acc, op0=nl.multiply,
                                          operand0=row_scale, op1=nl.multiply,
                                          operand1=scale_row[0:mr, :])
            elif scale_columns:
                nisa.tensor_tensor(dst=res, data1=acc, data2=scale_row[0:mr, :],
                                   op=nl.multiply)
            else:
                nisa.tensor_copy(dst=res, src=acc)
            nisa.dma_copy(dst=out[m0:m0 + mr, n0:n0 + nb], src=res)


@nki.jit
def matmul_kernel(x, w):
    """x ``[M, K]``, w ``[N, K]`` (same float dtype) -> ``x @ w^T`` ``[M, N]`` in x's dtype,
    float32 accumulation."""
    out = nl.ndarray((x.shape[0], w.shape[0]), dtype=x.dtype, buffer=nl.shared_hbm, name="out")
    linear(out, x, w, x.dtype)
    return out


def matmul(x, w):
    """``x @ w.T`` for torch tensors x ``[M, K]``, w ``[N, K]`` through ``matmul_kernel``."""
    return host.to_torch(matmul_kernel(host.to_numpy(x), host.to_numpy(w)), x.device)
