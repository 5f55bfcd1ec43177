"""Tile-level sub-kernels shared by ember's NKI kernels.

Plain functions called from ``@nki.jit`` kernels (the compiler inlines them; they must not
carry ``@nki.jit`` themselves). Layout convention of every kernel: the contraction dimension
of a matmul and the rows of a softmax live on the partitions (at most 128), the streamed
dimension on the free axis (at most 512 per matmul: one float32 PSUM bank).
"""

from ember.neuron_kernels.nki_api import nisa, nl

PMAX = 128  # partitions of a tile; rows of a stationary matmul operand; K of one matmul
FMAX = 512  # free size of a moving matmul operand: one PSUM bank of float32
PSUM_BANK_BYTES = 2048  # per partition


def itemsize(dtype):
    """Bytes per element of an ``nki.language`` dtype (they are opaque objects in real NKI)."""
    if dtype == nl.float32 or dtype == nl.int32 or dtype == nl.uint32:
        return 4
    if dtype == nl.int8 or dtype == nl.uint8 or dtype == nl.float8_e4m3fn:
        return 1
    return 2


def chunks(total, size):
    """``[(start, length), ...]`` covering ``range(total)`` in pieces of at most ``size``."""
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def transpose_blocks(dst, blocks):
    """Write SBUF ``blocks`` ``[p_i, f]`` transposed side by side into SBUF ``dst [f, sum p_i]``.

    TensorE transposes (``nc_transpose``: matmul against the identity) land in one PSUM tile
    of the blocks' dtype, which a single copy moves to ``dst`` (casting if ``dst`` differs,
    e.g. fp8 cache rows widened to bf16 on the way).
    """
    rows = dst.shape[1]
    staged = nl.ndarray((dst.shape[0], rows), dtype=blocks[0].dtype, buffer=nl.psum)
    col = 0
    for block in blocks:
        nisa.nc_transpose(dst=staged[:, col:col + block.shape[0]], data=block)
        col += block.shape[0]
    nisa.tensor_copy(dst=dst, src=staged)


def columns_of(rows, dtype, name=""):
    """``rows`` SBUF ``[r <= 128, K]`` -> list over 128-wide K chunks of SBUF ``[kc, r]``
    tiles in ``dtype``: the operand layout of a matmul that contracts over K."""
    out = []
    for k0, kc in chunks(rows.shape[1], PMAX):
        tile = nl.ndarray((kc, rows.shape[0]), dtype=dtype, buffer=nl.sbuf, name=name)
        transpose_blocks(tile, [rows[:, k0:k0 + kc]])
        out.append(tile)
    return out
