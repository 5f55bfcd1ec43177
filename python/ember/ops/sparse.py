"""2:4 structured sparsity: ``prune_24``, ``compress_24``, ``sparse24_gemm``.

A 2:4 weight ``[N, K]`` has at most two nonzeros in every group of four consecutive columns.
``compress_24`` stores the two kept values per group and their positions; the metadata format
is documented in ``ember.ops.reference.compress_24``.
"""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_choice, check_tensor

PRUNE_METHODS = ("magnitude", "wanda")


def _check_24_weight(op, w):
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES, ndim=2)
    if w.shape[1] % 4:
        raise ValueError(f"{op}: w's K (dim 1) must be a multiple of 4 for 2:4 sparsity, "
                         f"got shape {tuple(w.shape)}")


def prune_24(w, method="magnitude", act_norm=None, *, backend="auto"):
    """Prune a linear weight to 2:4: in every 4 consecutive weights along K keep the 2 with the
    largest score and zero the others (ties keep the lower column).

    Args:
        w: ``[N, K]`` fp16/bf16/fp32, K a multiple of 4.
        method: "magnitude" (score ``|w|``) or "wanda" (score ``|w[n, k]| * act_norm[k]``,
            Sun et al. 2023).
        act_norm: float ``[K]``, for "wanda" only: the L2 norm of input feature k over a batch
            of calibration activations (``x.float().norm(dim=0)`` for x ``[tokens, K]``).

    Returns the pruned dense weight ``[N, K]`` in w's dtype.
    """
    op = "prune_24"
    _check_24_weight(op, w)
    check_choice(op, "method", method, PRUNE_METHODS)
    if method == "wanda":
        if act_norm is None:
            raise ValueError(f"{op}: method='wanda' needs act_norm, the [K] norms of the inputs")
        check_tensor(op, "act_norm", act_norm, dtypes=FLOAT_DTYPES, shape=(w.shape[1],),
                     device=w.device)
    elif act_norm is not None:
        raise ValueError(f"{op}: act_norm is only used by method='wanda', got method={method!r}")
    chosen = _registry.resolve(op, backend, w.device)
    return torch.ops.ember.prune_24(w, method, act_norm, chosen)


@torch.library.custom_op("ember::prune_24", mutates_args=())
def _prune_24_op(w: torch.Tensor, method: str, act_norm: torch.Tensor | None,
                 backend: str) -> torch.Tensor:
    return _registry.implementation("prune_24", backend)(w, method, act_norm)


@_prune_24_op.register_fake
def _(w, method, act_norm, backend):
    return w.new_empty(w.shape)


def compress_24(w, *, backend="auto"):
    """Compress a 2:4 weight (e.g. from :func:`prune_24`) for :func:`sparse24_gemm`.

    Args:
        w: ``[N, K]`` fp16/bf16/fp32, K a multiple of 4, at most two nonzeros in every group
            of four consecutive columns (checked: this reads w on the host).

    Returns ``(values [N, K/2] in w's dtype, metadata uint8 [N, K/4])``: for group g of row n,
    ``metadata[n, g] = i0 | i1 << 2`` with the in-group positions ``i0 < i1`` of
    ``values[n, 2g]`` and ``values[n, 2g + 1]``.
    """
    op = "compress_24"
    _check_24_weight(op, w)
    nonzeros = (w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
    if bool((nonzeros > 2).any()):
        row, group = (int(i) for i in torch.nonzero(nonzeros > 2)[0])
        raise ValueError(f"{op}: w is not 2:4 sparse: row {row}, columns {4 * group}.."
                         f"{4 * group + 3} hold {int(nonzeros[row, group])} nonzeros "
                         f"(prune it with prune_24 first)")
    chosen = _registry.resolve(op, backend, w.device)
    return torch.ops.ember.compress_24(w, chosen)


@torch.library.custom_op("ember::compress_24", mutates_args=())
def _compress_24_op(w: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("compress_24", backend)(w)


@_compress_24_op.register_fake
def _(w, backend):
    n, k = w.shape
    return w.new_empty(n, k // 2), w.new_empty(n, k // 4, dtype=torch.uint8)


def sparse24_gemm(x, values, metadata, *, backend="auto"):
    """``x @ W^T`` for a 2:4 weight W given as :func:`compress_24`'s ``(values, metadata)``.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, contiguous last dim.
        values: ``[N, K/2]`` in x's dtype, contiguous.
        metadata: uint8 ``[N, K/4]``, contiguous. Any byte is safe to read (positions are its
            two 2-bit fields); equal positions add up.

    Returns ``[M, N]`` in x's dtype, accumulated in float32.
    """
    op = "sparse24_gemm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    k = x.shape[1]
    if k % 4:
        raise ValueError(f"{op}: x's K (dim 1) must be a multiple of 4, got shape {tuple(x.shape)}")
    check_tensor(op, "values", values, dtypes=(x.dtype,), ndim=2, device=x.device,
                 contiguous=True)
    check_tensor(op, "values", values, shape=(None, k // 2))
    check_tensor(op, "metadata", metadata, dtypes=(torch.uint8,),
                 shape=(values.shape[0], k // 4), device=x.device, contiguous=True)
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.sparse24_gemm(x, values, metadata, chosen)


@torch.library.custom_op("ember::sparse24_gemm", mutates_args=())
def _sparse24_gemm_op(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor,
                      backend: str) -> torch.Tensor:
    return _registry.implementation("sparse24_gemm", backend)(x, values, metadata)


@_sparse24_gemm_op.register_fake
def _(x, values, metadata, backend):
    return x.new_empty(x.shape[0], values.shape[0])


_registry.register("prune_24", torch=reference.prune_24)
_registry.register("compress_24", torch=reference.compress_24)
_registry.register("sparse24_gemm", torch=reference.sparse24_gemm)
