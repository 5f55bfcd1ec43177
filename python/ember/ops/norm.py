"""RMSNorm: ``rms_norm`` and ``fused_add_rms_norm`` (residual add + norm in one pass)."""

import math

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_tensor


def _check_norm(op, x, weight, eps):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    check_tensor(op, "weight", weight, dtypes=(x.dtype,), shape=(x.shape[-1],), device=x.device,
                 contiguous=True)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a finite positive number, got {eps!r}")


def rms_norm(x, weight, eps=1e-6, *, backend="auto"):
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``, in float32.

    Args:
        x: ``[..., H]`` fp16/bf16/fp32, contiguous last dim.
        weight: ``[H]``, x's dtype.
        eps: added to the mean square (> 0).

    Returns a new tensor shaped like x, in x's dtype.
    """
    _check_norm("rms_norm", x, weight, eps)
    chosen = _registry.resolve("rms_norm", backend, x.device)
    return torch.ops.ember.rms_norm(x, weight, float(eps), chosen)


@torch.library.custom_op("ember::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: str) -> torch.Tensor:
    return _registry.implementation("rms_norm", backend)(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape)


def fused_add_rms_norm(x, residual, weight, eps=1e-6, *, backend="auto"):
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``.

    The sum is rounded to x's dtype and that rounded value is normalised, exactly as the
    unfused ``residual = x + residual; out = rms_norm(residual)``. Both results are new
    tensors (a custom op may not return its inputs), so callers rebind ``residual``.

    Args:
        x, residual: ``[..., H]`` fp16/bf16/fp32, same shape and dtype, contiguous last dim.
        weight: ``[H]``, x's dtype.
        eps: added to the mean square (> 0).
    """
    op = "fused_add_rms_norm"
    _check_norm(op, x, weight, eps)
    check_tensor(op, "residual", residual, dtypes=(x.dtype,), shape=x.shape, device=x.device,
                 last_dim_contiguous=True)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.fused_add_rms_norm(x, residual, weight, float(eps), chosen)


@torch.library.custom_op("ember::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("fused_add_rms_norm", backend)(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


_registry.register("rms_norm", torch=reference.rms_norm)
_registry.register("fused_add_rms_norm", torch=reference.fused_add_rms_norm)
_registry.register("rms_norm", triton="ember.triton_kernels.norm:rms_norm")
_registry.register("fused_add_rms_norm", triton="ember.triton_kernels.norm:fused_add_rms_norm")
_registry.register("rms_norm", cuda="ember.ops._cuda_glue:rms_norm")
_registry.register("fused_add_rms_norm", cuda="ember.ops._cuda_glue:fused_add_rms_norm")
