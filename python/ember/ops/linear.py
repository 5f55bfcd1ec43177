"""Dense linear layers: ``skinny_linear``, the weight-streaming GEMM of a decode step."""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import HALF_DTYPES, check_choice, check_same, check_tensor

# Rows of x the kernel keeps in registers: a decode batch. Larger batches are GEMMs that
# cuBLAS runs well.
SKINNY_MAX_ROWS = 16
# K is read in 16-byte vectors of 8 fp16/bf16 elements.
SKINNY_K_MULTIPLE = 8
ACTIVATIONS = (None, "silu_and_mul")


def skinny_linear(x, weight, bias=None, *, activation=None, static_weight=False, backend="auto"):
    """``y = x @ weight^T (+ bias)`` for a few rows of x, accumulated in float32.

    A linear layer for decode, where the batch is a handful of tokens and the time is that of
    reading ``weight`` once: the CUDA backend streams the weight at close to copy bandwidth in
    one kernel (no split-K reduction pass).

    Args:
        x: ``[M, K]`` fp16/bf16 with ``1 <= M <= 16``, contiguous last dim, any row stride.
            With ``activation="silu_and_mul"``: ``[M, 2K]`` holding ``[gate | up]``.
        weight: ``[N, K]``, contiguous, x's dtype; K a positive multiple of 8.
        bias: ``[N]`` in x's dtype, or None.
        activation: None, or ``"silu_and_mul"`` to use ``silu(gate) * up`` as the input,
            rounded to x's dtype exactly as :func:`ember.ops.silu_and_mul` rounds it, so the
            result is that of ``skinny_linear(silu_and_mul(x), weight, bias)`` in one kernel
            (a Llama MLP's down projection).
        static_weight: a promise that no kernel queued before this call writes ``weight``
            (model weights at inference time). The CUDA kernel may then start streaming the
            weight before the kernel that produces x has finished (programmatic dependent
            launch on Hopper). Breaking the promise is a race; the result does not otherwise
            depend on it.

    Returns ``[M, N]`` in x's dtype: the float32 sum (plus bias) rounded once.
    """
    op = "skinny_linear"
    check_choice(op, "activation", activation, ACTIVATIONS)
    check_tensor(op, "x", x, dtypes=HALF_DTYPES, ndim=2, last_dim_contiguous=True)
    if not 1 <= x.shape[0] <= SKINNY_MAX_ROWS:
        raise ValueError(f"{op}: x must have 1 to {SKINNY_MAX_ROWS} rows, got shape "
                         f"{tuple(x.shape)}; use torch.nn.functional.linear for larger batches")
    check_tensor(op, "weight", weight, dtypes=HALF_DTYPES, ndim=2, contiguous=True,
                 device=x.device)
    check_same(op, "dtype", x=x.dtype, weight=weight.dtype)
    n, k = weight.shape
    if k == 0 or k % SKINNY_K_MULTIPLE:
        raise ValueError(f"{op}: weight must have K (its last dim, x's features) a positive "
                         f"multiple of {SKINNY_K_MULTIPLE}, got shape {tuple(weight.shape)}")
    in_features = 2 * k if activation == "silu_and_mul" else k
    if x.shape[1] != in_features:
        what = f"2K = {in_features} ([gate | up])" if activation else f"K = {in_features}"
        raise ValueError(f"{op}: x must have shape (*, {in_features}) to match the weight's "
                         f"{what}, got {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=HALF_DTYPES, shape=(n,), device=x.device)
        check_same(op, "dtype", x=x.dtype, bias=bias.dtype)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.skinny_linear(x, weight, bias, activation, bool(static_weight), chosen)


@torch.library.custom_op("ember::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str | None, static_weight: bool,
                      backend: str) -> torch.Tensor:
    implementation = _registry.implementation("skinny_linear", backend)
    if backend == "cuda":
        return implementation(x, weight, bias, activation, static_weight=static_weight)
    return implementation(x, weight, bias, activation)  # the result does not depend on the hint


@_skinny_linear_op.register_fake
def _(x, weight, bias, activation, static_weight, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


_registry.register("skinny_linear", torch=reference.skinny_linear)
_registry.register("skinny_linear", cuda="ember.ops._cuda_gemm:skinny_linear")
