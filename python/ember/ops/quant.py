"""Quantized linear layers (``y = x @ W^T`` with ``W [N, K]``): weight-only int8, weight-only
int4 with group scales and zero points, and fp8 e4m3 with per-channel weight scales and
per-token dynamic activation scales.

The ``quantize_*`` functions produce the layouts the GEMM kernels read; their exact format is
documented in ``ember.ops.reference`` (``quantize_int8``, ``quantize_int4``, ``quantize_fp8``).
"""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_choice, check_tensor

INT4_GROUP_SIZES = (32, 64, 128, 256)
FP8_DTYPE = torch.float8_e4m3fn


def _check_weight(op, w):
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES, ndim=2)
    return w.shape


def _check_activation(op, x, k):
    """x ``[M, K]`` float with a contiguous last dim, K matching the weight."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    if x.shape[1] != k:
        raise ValueError(f"{op}: x must have shape (*, {k}) to match the weight's K = {k}, "
                         f"got {tuple(x.shape)}")


# ---- int8 weight-only -------------------------------------------------------------------------

def quantize_int8(w, *, backend="auto"):
    """Symmetric per-output-channel int8 quantisation of a linear weight.

    Args:
        w: ``[N, K]`` fp16/bf16/fp32.

    Returns ``(qweight int8 [N, K], scale float32 [N])`` with ``w ~= qweight * scale[:, None]``,
    ``scale = max|w[n]| / 127`` and ``qweight = round(w / scale)``.
    """
    op = "quantize_int8"
    _check_weight(op, w)
    chosen = _registry.resolve(op, backend, w.device)
    return torch.ops.ember.quantize_int8(w, chosen)


@torch.library.custom_op("ember::quantize_int8", mutates_args=())
def _quantize_int8_op(w: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("quantize_int8", backend)(w)


@_quantize_int8_op.register_fake
def _(w, backend):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0], dtype=torch.float32)


def w8a16_gemm(x, qweight, scale, *, backend="auto"):
    """``x @ (qweight * scale[:, None])^T`` with float32 accumulation.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, contiguous last dim.
        qweight: int8 ``[N, K]``, contiguous (from :func:`quantize_int8`).
        scale: float32 ``[N]``.

    Returns ``[M, N]`` in x's dtype.
    """
    op = "w8a16_gemm"
    check_tensor(op, "qweight", qweight, dtypes=(torch.int8,), ndim=2, contiguous=True)
    n, k = qweight.shape
    _check_activation(op, x, k)
    check_tensor(op, "qweight", qweight, device=x.device)
    check_tensor(op, "scale", scale, dtypes=(torch.float32,), shape=(n,), device=x.device)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.w8a16_gemm(x, qweight, scale, chosen)


@torch.library.custom_op("ember::w8a16_gemm", mutates_args=())
def _w8a16_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   backend: str) -> torch.Tensor:
    return _registry.implementation("w8a16_gemm", backend)(x, qweight, scale)


@_w8a16_gemm_op.register_fake
def _(x, qweight, scale, backend):
    return x.new_empty(x.shape[0], qweight.shape[0])


# ---- int4 weight-only, group-wise asymmetric ----------------------------------------------------

def _check_group_size(op, group_size, k):
    check_choice(op, "group_size", group_size, INT4_GROUP_SIZES)
    if k % group_size:
        raise ValueError(f"{op}: group_size ({group_size}) must divide K ({k})")


def quantize_int4(w, group_size=128, *, backend="auto"):
    """Asymmetric int4 quantisation with one scale and zero point per ``group_size`` weights
    along K (GPTQ/AWQ-style range that always contains 0).

    Args:
        w: ``[N, K]`` fp16/bf16/fp32; K a multiple of ``group_size``.
        group_size: one of 32, 64, 128, 256.

    Returns ``(packed uint8 [N, K/2], scales float32 [N, K/group_size], zeros uint8
    [N, K/group_size])``: two 4-bit codes per byte, column ``2j`` in the low nibble and
    ``2j + 1`` in the high nibble (so nibble ``n`` of little-endian int32 word ``i`` is column
    ``8i + n``); weight = ``(code - zero) * scale`` of its group.
    """
    op = "quantize_int4"
    _, k = _check_weight(op, w)
    _check_group_size(op, group_size, k)
    chosen = _registry.resolve(op, backend, w.device)
    return torch.ops.ember.quantize_int4(w, group_size, chosen)


@torch.library.custom_op("ember::quantize_int4", mutates_args=())
def _quantize_int4_op(w: torch.Tensor, group_size: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _registry.implementation("quantize_int4", backend)(w, group_size)


@_quantize_int4_op.register_fake
def _(w, group_size, backend):
    n, k = w.shape
    return (w.new_empty(n, k // 2, dtype=torch.uint8),
            w.new_empty(n, k // group_size, dtype=torch.float32),
            w.new_empty(n, k // group_size, dtype=torch.uint8))


def w4a16_gemm(x, packed, scales, zeros, group_size, *, backend="auto"):
    """``x @ W^T`` with W dequantised from :func:`quantize_int4`'s output; float32 accumulation.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, contiguous last dim.
        packed: uint8 ``[N, K/2]``, contiguous.
        scales: float32 ``[N, K/group_size]``, contiguous.
        zeros: uint8 ``[N, K/group_size]``, contiguous.
        group_size: the value given to :func:`quantize_int4`.

    Returns ``[M, N]`` in x's dtype.
    """
    op = "w4a16_gemm"
    check_tensor(op, "packed", packed, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    n, k = packed.shape[0], 2 * packed.shape[1]
    _check_activation(op, x, k)
    _check_group_size(op, group_size, k)
    groups = (n, k // group_size)
    check_tensor(op, "packed", packed, device=x.device)
    check_tensor(op, "scales", scales, dtypes=(torch.float32,), shape=groups, device=x.device,
                 contiguous=True)
    check_tensor(op, "zeros", zeros, dtypes=(torch.uint8,), shape=groups, device=x.device,
                 contiguous=True)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.w4a16_gemm(x, packed, scales, zeros, group_size, chosen)


@torch.library.custom_op("ember::w4a16_gemm", mutates_args=())
def _w4a16_gemm_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, group_size: int, backend: str) -> torch.Tensor:
    return _registry.implementation("w4a16_gemm", backend)(x, packed, scales, zeros, group_size)


@_w4a16_gemm_op.register_fake
def _(x, packed, scales, zeros, group_size, backend):
    return x.new_empty(x.shape[0], packed.shape[0])


# ---- fp8 e4m3 ---------------------------------------------------------------------------------

def quantize_fp8(w, *, backend="auto"):
    """Per-output-channel float8 e4m3 quantisation of a linear weight.

    Args:
        w: ``[N, K]`` fp16/bf16/fp32.

    Returns ``(w_fp8 float8_e4m3fn [N, K], w_scale float32 [N])`` with
    ``w_scale = max|w[n]| / 448`` and ``w_fp8 = w / w_scale`` rounded to nearest even.
    """
    op = "quantize_fp8"
    _check_weight(op, w)
    chosen = _registry.resolve(op, backend, w.device)
    return torch.ops.ember.quantize_fp8(w, chosen)


@torch.library.custom_op("ember::quantize_fp8", mutates_args=())
def _quantize_fp8_op(w: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("quantize_fp8", backend)(w)


@_quantize_fp8_op.register_fake
def _(w, backend):
    return w.new_empty(w.shape, dtype=FP8_DTYPE), w.new_empty(w.shape[0], dtype=torch.float32)


def fp8_gemm(x, w_fp8, w_scale, *, backend="auto"):
    """``x @ W^T`` in fp8 with per-token dynamic activation scales.

    Each row of x is quantised to e4m3 with its own scale ``max|x[m]| / 448`` (as
    :func:`quantize_fp8` does for weight rows), then
    ``out = (x_fp8 @ w_fp8^T) * x_scale[:, None] * w_scale[None, :]``, accumulated in float32.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, contiguous last dim.
        w_fp8: float8_e4m3fn ``[N, K]``, contiguous (from :func:`quantize_fp8`).
        w_scale: float32 ``[N]``.

    Returns ``[M, N]`` in x's dtype.
    """
    op = "fp8_gemm"
    check_tensor(op, "w_fp8", w_fp8, dtypes=(FP8_DTYPE,), ndim=2, contiguous=True)
    n, k = w_fp8.shape
    _check_activation(op, x, k)
    check_tensor(op, "w_fp8", w_fp8, device=x.device)
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), shape=(n,), device=x.device)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.fp8_gemm(x, w_fp8, w_scale, chosen)


@torch.library.custom_op("ember::fp8_gemm", mutates_args=())
def _fp8_gemm_op(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                 backend: str) -> torch.Tensor:
    return _registry.implementation("fp8_gemm", backend)(x, w_fp8, w_scale)


@_fp8_gemm_op.register_fake
def _(x, w_fp8, w_scale, backend):
    return x.new_empty(x.shape[0], w_fp8.shape[0])


_registry.register("quantize_int8", torch=reference.quantize_int8)
_registry.register("w8a16_gemm", torch=reference.w8a16_gemm,
                   triton="ember.triton_kernels.quant:w8a16_gemm")
_registry.register("quantize_int4", torch=reference.quantize_int4)
_registry.register("w4a16_gemm", torch=reference.w4a16_gemm,
                   triton="ember.triton_kernels.quant:w4a16_gemm")
_registry.register("quantize_fp8", torch=reference.quantize_fp8)
_registry.register("fp8_gemm", torch=reference.fp8_gemm)
_registry.register("w8a16_gemm", nki="ember.neuron_kernels.quant:w8a16_gemm")
_registry.register("fp8_gemm", nki="ember.neuron_kernels.quant:fp8_gemm")
