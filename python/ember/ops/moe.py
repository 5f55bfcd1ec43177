"""Mixture-of-experts ops: ``moe_align``, ``grouped_gemm``, ``fused_moe``.

Index values (expert ids, group offsets) are never read on the host for CUDA tensors, so these
ops stay free of host synchronisation and capturable in CUDA graphs; every backend reads
out-of-range values in the one memory-safe way the reference documents. Offsets on CPU
tensors, where reading them costs nothing, are checked with a ValueError.
"""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_bool, check_positive_int, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


def moe_align(topk_ids, num_experts, block_m, *, backend="auto"):
    """Sort the (token, k) slots of a top-k routing by expert, in blocks of ``block_m`` rows.

    vLLM's ``moe_align_block_size`` semantics, made deterministic (slots in ascending order
    within an expert).

    Args:
        topk_ids: int32/int64 ``[tokens, top_k]`` expert ids; slot ``s = token * top_k + k``.
            Ids outside ``[0, num_experts)`` are skipped (e.g. -1 for experts held by another
            rank).
        num_experts: number of experts E (> 0).
        block_m: rows per block of the grouped GEMM that consumes the result (> 0).
        backend: "auto" or a backend name.

    Returns ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, all int32:
        sorted_token_ids ``[numel + E * (block_m - 1)]``: expert 0's slots, padded to a
            multiple of ``block_m`` with the sentinel ``numel``, then expert 1's, ...; the
            tail after the last used row is the sentinel as well.
        expert_ids ``[ceil(len(sorted_token_ids) / block_m)]``: each block's expert, -1 for
            blocks past the used rows.
        num_tokens_post_padded ``[1]``: used rows (a multiple of ``block_m``), on the device.
    """
    op = "moe_align"
    check_tensor(op, "topk_ids", topk_ids, dtypes=INDEX_DTYPES, ndim=2)
    check_positive_int(op, "num_experts", num_experts)
    check_positive_int(op, "block_m", block_m)
    chosen = _registry.resolve(op, backend, topk_ids.device)
    return torch.ops.ember.moe_align(topk_ids, num_experts, block_m, chosen)


@torch.library.custom_op("ember::moe_align", mutates_args=())
def _moe_align_op(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _registry.implementation("moe_align", backend)(topk_ids, num_experts, block_m)


@_moe_align_op.register_fake
def _(topk_ids, num_experts, block_m, backend):
    rows = topk_ids.numel() + num_experts * (block_m - 1)
    blocks = (rows + block_m - 1) // block_m
    new = topk_ids.new_empty
    return (new(rows, dtype=torch.int32), new(blocks, dtype=torch.int32),
            new(1, dtype=torch.int32))


def grouped_gemm(x, w, group_offsets, *, backend="auto"):
    """One GEMM per group of consecutive rows: ``out[rows of e] = x[rows of e] @ w[e]^T``.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, rows sorted by group; contiguous last dim.
        w: ``[E, N, K]``, x's dtype, contiguous.
        group_offsets: int32 ``[E]``, cumulative end rows as in ``torch._grouped_mm``'s
            ``offs``: group e is rows ``[group_offsets[e-1], group_offsets[e])`` (0 for
            e = 0); non-decreasing and at most M. Checked on CPU; on a GPU, unchecked values
            are clipped to ``[0, M]`` and made non-decreasing.
        backend: "auto" or a backend name.

    Returns ``[M, N]`` in x's dtype; rows from ``group_offsets[E-1]`` to M are zero.
    """
    op = "grouped_gemm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    m, k = x.shape
    check_tensor(op, "w", w, dtypes=(x.dtype,), ndim=3, device=x.device, contiguous=True)
    check_tensor(op, "w", w, shape=(None, None, k))
    check_tensor(op, "group_offsets", group_offsets, dtypes=(torch.int32,),
                 shape=(w.shape[0],), device=x.device)
    if group_offsets.device.type == "cpu" and group_offsets.numel():
        ends = group_offsets.long()
        if bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0 or int(ends[-1]) > m:
            raise ValueError(f"{op}: group_offsets must be non-decreasing cumulative ends in "
                             f"[0, {m}] (rows of x), got {ends.tolist()}")
    chosen = _registry.resolve(op, backend, x.device)
    return torch.ops.ember.grouped_gemm(x, w, group_offsets, chosen)


@torch.library.custom_op("ember::grouped_gemm", mutates_args=())
def _grouped_gemm_op(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor,
                     backend: str) -> torch.Tensor:
    return _registry.implementation("grouped_gemm", backend)(x, w, group_offsets)


@_grouped_gemm_op.register_fake
def _(x, w, group_offsets, backend):
    return x.new_empty(x.shape[0], w.shape[1])


def fused_moe(hidden, w13, w2, router_logits, top_k, renormalize=True, *, backend="auto"):
    """A Mixtral-style MoE layer: softmax top-k routing over SwiGLU experts.

    Args:
        hidden: ``[T, H]`` fp16/bf16/fp32; contiguous last dim.
        w13: ``[E, 2I, H]``, hidden's dtype, contiguous: rows ``[0, I)`` are the gate
            projection, rows ``[I, 2I)`` the up projection (Mixtral's w1 and w3 stacked).
        w2: ``[E, H, I]``, hidden's dtype, contiguous: the down projection.
        router_logits: ``[T, E]``, any float dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        renormalize: divide the top-k softmax weights by their sum (Mixtral: True).
        backend: "auto" or a backend name.

    Returns ``[T, H]`` in hidden's dtype:
    ``out[t] = sum_k weight[t, k] * w2[e] @ (silu(w13[e, :I] @ h) * (w13[e, I:] @ h))`` with
    ``e = topk_ids[t, k]`` and the weights of ``reference.moe_route``.
    """
    op = "fused_moe"
    check_tensor(op, "hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    tokens, hidden_size = hidden.shape
    dev = hidden.device
    check_tensor(op, "w13", w13, dtypes=(hidden.dtype,), ndim=3, device=dev, contiguous=True)
    experts, two_inter, _ = w13.shape
    if two_inter % 2:
        raise ValueError(f"{op}: w13 must have an even dim 1 (gate and up rows), "
                         f"got shape {tuple(w13.shape)}")
    check_tensor(op, "w13", w13, shape=(None, None, hidden_size))
    check_tensor(op, "w2", w2, dtypes=(hidden.dtype,), shape=(experts, hidden_size, two_inter // 2),
                 device=dev, contiguous=True)
    check_tensor(op, "router_logits", router_logits, dtypes=FLOAT_DTYPES + (torch.float64,),
                 shape=(tokens, experts), device=dev)
    check_positive_int(op, "top_k", top_k)
    if top_k > experts:
        raise ValueError(f"{op}: top_k must be <= the number of experts ({experts}), got {top_k}")
    check_bool(op, "renormalize", renormalize)
    chosen = _registry.resolve(op, backend, dev)
    return torch.ops.ember.fused_moe(hidden, w13, w2, router_logits, top_k, renormalize, chosen)


@torch.library.custom_op("ember::fused_moe", mutates_args=())
def _fused_moe_op(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  router_logits: torch.Tensor, top_k: int, renormalize: bool,
                  backend: str) -> torch.Tensor:
    return _registry.implementation("fused_moe", backend)(
        hidden, w13, w2, router_logits, top_k, renormalize)


@_fused_moe_op.register_fake
def _(hidden, w13, w2, router_logits, top_k, renormalize, backend):
    return hidden.new_empty(hidden.shape)


_registry.register("moe_align", torch=reference.moe_align)
_registry.register("grouped_gemm", torch=reference.grouped_gemm,
                   triton="ember.triton_kernels.moe:grouped_gemm")
_registry.register("fused_moe", torch=reference.fused_moe,
                   triton="ember.triton_kernels.moe:fused_moe")
_registry.register("grouped_gemm", nki="ember.neuron_kernels.moe:grouped_gemm")
