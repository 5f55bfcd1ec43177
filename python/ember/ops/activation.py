"""Gated activation: ``silu_and_mul`` (the SwiGLU of Llama/Mixtral MLPs)."""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_tensor


def silu_and_mul(x, *, backend="auto"):
    """``silu(x[..., :I]) * x[..., I:]``, computed in float32.

    Args:
        x: ``[..., 2I]`` fp16/bf16/fp32 (gate features first, then up), contiguous last dim.

    Returns ``[..., I]`` in x's dtype.
    """
    op = "silu_and_mul"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: x's last dim must be even (gate and up halves), "
                         f"got shape {tuple(x.shape)}")
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.silu_and_mul(x, chosen)


@torch.library.custom_op("ember::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _registry.implementation("silu_and_mul", backend)(x)


@_silu_and_mul_op.register_fake
def _(x, backend):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


_registry.register("silu_and_mul", torch=reference.silu_and_mul)
_registry.register("silu_and_mul", triton="ember.triton_kernels.activation:silu_and_mul")
_registry.register("silu_and_mul", cuda="ember.ops._cuda_glue:silu_and_mul")
