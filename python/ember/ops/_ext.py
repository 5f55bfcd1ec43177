"""The bridge to ``ember._C``: loading it, dtype codes and raw-pointer arguments.

The extension does not link libtorch, so every CUDA binding takes data pointers, sizes,
strides (in elements), dtype codes and the CUDA stream as plain integers.
"""

import functools

import torch

# Must match ember::DType in csrc/common/common.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
}


@functools.cache
def load_extension():
    """Return the ``ember._C`` module, or ``None`` when it was not built."""
    try:
        from ember import _C
    except ImportError:
        return None
    return _C


@functools.cache
def extension_error():
    """Why ``ember._C`` is missing, for error messages (asked per op call where it is: a failed
    import searches the whole path each time, so the answer is kept, as load_extension's is)."""
    try:
        from ember import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t):
    """Device pointer of ``t``, or 0 for ``None``."""
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream on ``t``'s device, as an integer handle."""
    return torch.cuda.current_stream(t.device).cuda_stream
