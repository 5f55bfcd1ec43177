"""CUDA backend of ``ember.ops.skinny_linear``: the launch wrapper of ``csrc/gemm/`` (through
``ember._C``).

``ember.ops.linear`` has validated the inputs (dtypes, shapes, devices, K a multiple of 8). The
wrapper allocates a dense output and passes pointers, sizes, x's row stride, the dtype code and
the current stream; nothing reads a tensor back to the host, so the op can be captured in CUDA
graphs. The kernel reads x and the weight in 16-byte vectors: the odd view whose rows do not
start on a 16-byte boundary is copied here first.
"""

import torch

from ember.ops import _ext
from ember.ops._split_kv import sm_count
from ember.ops._validation import with_16b_aligned_rows


def skinny_linear(x, weight, bias=None, activation=None, *, static_weight=False):
    """CUDA backend of ``ember.ops.skinny_linear``: x ``[M, K]`` (``[M, 2K]`` with
    ``activation="silu_and_mul"``), weight ``[N, K]`` contiguous, bias ``[N]`` or None;
    ``static_weight`` lets the kernel read the weight before earlier kernels finish."""
    n, k = weight.shape
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    x = with_16b_aligned_rows(x)
    # A misaligned weight is copied by a kernel just before, so it is not static.
    weight_is_original = weight.data_ptr() % 16 == 0
    if not weight_is_original:
        weight = weight.clone()
    if bias is not None:
        bias = bias.contiguous()
    _ext.load_extension().skinny_gemm(
        x.data_ptr(), weight.data_ptr(), _ext.ptr(bias), y.data_ptr(), x.shape[0], n, k,
        x.stride(0), activation == "silu_and_mul", static_weight and weight_is_original,
        sm_count(x.device), _ext.dtype_code(x), _ext.stream_of(x))
    return y
