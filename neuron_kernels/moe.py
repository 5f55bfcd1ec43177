"""MoE grouped GEMM on a NeuronCore (``grouped_gemm``): ``out[rows of e] = x[rows of e] @
w[e]^T`` for groups of consecutive rows given by runtime offsets.

Structure (after nki-library's ``moe_cte`` / nki-samples' ``blockwise_mm``): the work is a list
of blocks of at most ``BLOCK_ROWS`` rows of one expert, ``(first row, rows, expert)``, held in
HBM as data, so the kernel compiles once per shape whatever the routing. Per block the kernel
gathers the block's x rows with an indirect DMA (rows past the block's end are skipped and stay
zero), reads the expert's weights with a runtime offset (``.ap(scalar_offset=expert)``),
multiplies in 128 x 512 PSUM tiles and scatters the rows back (again skipping rows past the
end). Rows after the last group are zero, written by one skipping scatter per 128 rows.

The host builds the block list from ``group_offsets`` (O(E) integers, like the block tables of
attention); the offsets are read the memory-safe way ``reference.grouped_gemm`` defines: ends
clipped to ``[0, M]`` and made non-decreasing.
"""

import torch

from ember.neuron_kernels import host
from ember.neuron_kernels.matmul import accumulate, weight_columns
from ember.neuron_kernels.nki_api import nisa, nki, nl
from ember.neuron_kernels.tiles import FMAX, PMAX, chunks, columns_of

# Rows per block: four 128-row tiles share each weight block read from HBM, enough to keep
# TensorE rather than DMA the bottleneck at Mixtral-like shapes.
BLOCK_ROWS = 4 * PMAX
ZERO_COLUMNS = 2048  # width of the zero tile that clears the rows after the last group


def block_list(group_offsets: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """The work list of ``rows`` rows of x: int32 ``[ceil(rows / BLOCK_ROWS) + E, 3]`` of
    ``(first row, rows, expert)`` per block, padded with blocks of 0 rows (a static length for
    any routing), and the end of the last group."""
    ends = group_offsets.long().clamp(0, rows).cummax(0).values.tolist()
    blocks, start = [], 0
    for expert, end in enumerate(ends):
        for first in range(start, end, BLOCK_ROWS):
            blocks.append((first, min(BLOCK_ROWS, end - first), expert))
        start = end
    capacity = -(-rows // BLOCK_ROWS) + len(ends)
    blocks += [(0, 0, 0)] * (capacity - len(blocks))
    return torch.tensor(blocks, dtype=torch.int32), (ends[-1] if ends else 0)


def _row_index(first, base, limit, rows):
    """int32 ``[rows, 1]`` row numbers ``first + base + p`` for the gathers/scatters of one
    128-row tile, -1 (skipped) where ``base + p >= limit``. first/limit: float32 ``[128, 1]``
    runtime values; base: trace-time offset of the tile."""
    local = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=local, pattern=[[0, 1]], offset=base, channel_multiplier=1)
    index = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=index, data1=local, data2=first[0:rows, :], op=nl.add)
    past = nl.ndarray((rows, 1), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=past, data=local, op0=nl.greater_equal, operand0=limit[0:rows, :])
    nisa.tensor_copy_predicated(dst=index, src=-1, predicate=past)
    return index


@nki.jit
def grouped_gemm_kernel(x, w, blocks, groups_end):
    """x ``[M, K]`` (rows sorted by group), w ``[E, N, K]`` (x's dtype), blocks int32
    ``[B, 3]`` of ``(first row, rows, expert)``, groups_end int32 ``[1]`` (rows from it on are
    zero). Returns ``[M, N]`` in x's dtype."""
    m_total, k = x.shape
    n_total = w.shape[1]
    out = nl.ndarray((m_total, n_total), dtype=x.dtype, buffer=nl.shared_hbm, name="out")

    for blk in range(blocks.shape[0]):
        # This block's (first row, rows) on every partition, and its expert id for addressing.
        first = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=first, src=blocks.ap(pattern=[[0, PMAX], [1, 1]], offset=3 * blk))
        count = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=count, src=blocks.ap(pattern=[[0, PMAX], [1, 1]], offset=3 * blk + 1))
        expert = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=expert, src=blocks[blk, 2:3])

        tiles = []
        for base, rows in chunks(min(BLOCK_ROWS, m_total), PMAX):
            index = _row_index(first, base, count, rows)
            x_rows = nl.ndarray((rows, k), dtype=x.dtype, buffer=nl.sbuf)
            nisa.memset(dst=x_rows, value=0.0)
            nisa.dma_copy(dst=x_rows, src=x.ap(pattern=[[k, rows], [1, k]], vector_offset=index,
                                               indirect_dim=0), oob_mode=nisa.oob_mode.skip)
            tiles.append((index, columns_of(x_rows, x.dtype)))

        for n0, nb in chunks(n_total, FMAX):
            w_rows = []
            for r0, nr in chunks(nb, PMAX):
                rows_sb = nl.ndarray((nr, k), dtype=w.dtype, buffer=nl.sbuf)
                src = w.ap(pattern=[[k, nr], [1, k]], offset=(n0 + r0) * k,
                           scalar_offset=expert, indirect_dim=0)
                nisa.dma_copy(dst=rows_sb, src=src)
                w_rows.append(rows_sb)
            w_cols = weight_columns(w_rows, x.dtype)
            for index, x_cols in tiles:
                rows = index.shape[0]
                acc = nl.ndarray((rows, nb), dtype=nl.float32, buffer=nl.psum)
                accumulate(acc, x_cols, w_cols)
                res = nl.ndarray((rows, nb), dtype=x.dtype, buffer=nl.sbuf)
                nisa.tensor_copy(dst=res, src=acc)
                nisa.dma_copy(dst=out.ap(pattern=[[n_total, rows], [1, nb]], offset=n0,
                                         vector_offset=index, indirect_dim=0),
                              src=res, oob_mode=nisa.oob_mode.skip)

    # Rows from groups_end on belong to no group: zeros.
    end = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=end, src=groups_end.ap(pattern=[[0, PMAX], [1, 1]], offset=0))
    zero = nl.ndarray((PMAX, min(n_total, ZERO_COLUMNS)), dtype=x.dtype, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    for t0, rows in chunks(m_total, PMAX):
        # Row t0 + p gets zeros iff it is at or after the end; earlier rows are skipped (-1).
        position = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=position, pattern=[[0, 1]], offset=t0, channel_multiplier=1)
        index = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=index, src=position)
        before = nl.ndarray((rows, 1), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=before, data=position, op0=nl.less, operand0=end[0:rows, :])
        nisa.tensor_copy_predicated(dst=index, src=-1, predicate=before)
        for c0, cw in chunks(n_total, ZERO_COLUMNS):
            nisa.dma_copy(dst=out.ap(pattern=[[n_total, rows], [1, cw]], offset=c0,
                                     vector_offset=index, indirect_dim=0),
                          src=zero[0:rows, 0:cw], oob_mode=nisa.oob_mode.skip)
    return out


def grouped_gemm(x, w, group_offsets):
    """Backend ``"grouped_gemm"`` (arguments of ``ember.ops.moe.grouped_gemm``)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    blocks, end = block_list(group_offsets, x.shape[0])
    out = grouped_gemm_kernel(host.to_numpy(x), host.to_numpy(w), host.to_numpy(blocks),
                              host.to_numpy(torch.tensor([end], dtype=torch.int32)))
    return host.to_torch(out, x.device)
