"""MoE GEMMs in Triton: ``grouped_gemm`` and Mixtral's layer ``fused_moe`` (two gathered grouped
GEMMs), on one kernel over moe_align's blocks.

Routing and grouping are device-side torch ops with no host sync (``reference.moe_route`` and
``reference.moe_align``), so the whole layer can be captured in a CUDA graph. moe_align lists
the ``T * top_k`` (token, k) slots grouped by expert and padded to blocks of ``BLOCK_M`` slots of
one expert each. Then, per block and tile of output columns:

1. ``act[slot] = silu(h[token] @ w13[e, :I]^T) * (h[token] @ w13[e, I:]^T)``: the gate and up
   tiles of the same columns are two accumulators of one program, so the SwiGLU is applied in
   its epilogue and ``[T * top_k, 2I]`` is never written; ``act`` is rounded to h's dtype, as
   the input of the next GEMM.
2. ``out_slot[slot] = weight[slot] * act[slot] @ w2[e]^T`` in float32, and ``out[t]`` the sum of
   its ``top_k`` slots, rounded once to h's dtype.

Work for T tokens, hidden H, intermediate I, top-k k (s-byte elements):
    FLOPs  2 T k (2I H + H I) = 6 T k H I
    bytes  s (T H + E 3 I H) + 2 T k I s (act written, read) + 8 T k H (float32 slots) + T H s:
           every expert's weights once when each gets a block of slots (decode: only the
           routed experts' weights are read).
A decode step (T small) reads each routed expert's 3 I H weights for a few rows: memory-bound.
"""

import torch
import triton
import triton.language as tl

from ember.ops import reference

# Slots per block: moe_align pads each expert's slots to a multiple of this. 16 rows is the
# smallest tl.dot tile and wastes little at decode sizes (top_k slots per token).
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64
# 8 warps: with 4, the gated program's two accumulators and two weight tiles spilled to local
# memory (9 LDL/STL in the sm_90 SASS from Triton 3.9 on a CPU machine); with 8, none.
NUM_WARPS = 8


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
                     weights_ptr, num_slots, n_out, k_dim, a_row_div,
                     stride_am, stride_we, stride_wn, stride_om,
                     GATED: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns ``[program_id(1) * BLOCK_N, + BLOCK_N)`` of the slots of block ``program_id(0)``.

    Slot s reads row ``s // a_row_div`` of a ``[*, k_dim]`` and writes row s of out
    ``[num_slots, n_out]``: ``a_row @ w[e, n]^T`` over ``n < n_out``, e the block's expert.
    GATED: w has ``2 * n_out`` rows per expert; out = silu(a @ w[:n_out]^T) * (a @ w[n_out:]^T).
    WEIGHTED: out rows are scaled by ``weights[s]`` (float32). Blocks past moe_align's used rows,
    and padding slots (id ``num_slots``), write nothing.
    """
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + block).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_ok = slots < num_slots
    a_rows = tl.where(slot_ok, slots // a_row_div, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    w_expert = w_ptr + expert * stride_we

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :],
                    mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_expert + cols[None, :] * stride_wn + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_expert + (cols[None, :] + n_out) * stride_wn + ks[:, None],
                           mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up += tl.dot(a, w_up, input_precision=PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc *= tl.load(weights_ptr + slots, mask=slot_ok, other=0.0)[:, None]
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def _moe_gemm(a, w, out, align, weights, a_row_div, *, gated):
    sorted_ids, expert_ids, num_post = align
    n_out = out.shape[1]
    grid = (expert_ids.numel(), triton.cdiv(n_out, BLOCK_N))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, expert_ids, num_post, weights if weights is not None else out,
        out.shape[0], n_out, a.shape[1], a_row_div,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATED=gated, WEIGHTED=weights is not None,
        # float32 inputs multiply in full precision, not tf32 (Triton's default on a GPU).
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)


def fused_moe(hidden, w13, w2, router_logits, top_k, renormalize):
    """Triton backend of ``ember.ops.fused_moe`` (inputs validated there).

    hidden ``[T, H]`` fp16/bf16/fp32 with a contiguous last dim; w13 ``[E, 2I, H]`` and w2
    ``[E, H, I]`` contiguous, hidden's dtype; router_logits ``[T, E]``. Returns ``[T, H]`` in
    hidden's dtype.
    """
    tokens, hidden_size = hidden.shape
    experts, inter = w13.shape[0], w2.shape[2]
    if tokens == 0:
        return torch.empty(0, hidden_size, dtype=hidden.dtype, device=hidden.device)
    weights, ids = reference.moe_route(router_logits, top_k, renormalize)
    align = reference.moe_align(ids, experts, BLOCK_M)
    slots = tokens * top_k
    act = torch.empty(slots, inter, dtype=hidden.dtype, device=hidden.device)
    _moe_gemm(hidden, w13, act, align, None, top_k, gated=True)
    out_slots = torch.empty(slots, hidden_size, dtype=torch.float32, device=hidden.device)
    _moe_gemm(act, w2, out_slots, align, weights.reshape(-1).float(), 1, gated=False)
    return out_slots.view(tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)


def grouped_gemm(x, w, group_offsets):
    """Triton backend of ``ember.ops.grouped_gemm``: ``out[rows of e] = x[rows of e] @ w[e]^T``.

    x ``[M, K]`` fp16/bf16/fp32 (contiguous last dim), w ``[E, N, K]`` contiguous, x's dtype;
    group_offsets int32 ``[E]`` cumulative end rows, read as the reference does (clipped to
    ``[0, M]``, running max). Each row is tagged with its group on the device and moe_align
    blocks the rows by group, so no host sync. Returns ``[M, N]`` in x's dtype, zero past the
    last group's end.
    """
    rows, experts = x.shape[0], w.shape[0]
    out = torch.zeros(rows, w.shape[1], dtype=x.dtype, device=x.device)
    if rows == 0 or experts == 0:
        return out
    ends = group_offsets.long().clamp(0, rows).cummax(0).values
    # Row r belongs to the first group whose end is past it; rows past the last end get the
    # id ``experts``, which moe_align skips.
    group = torch.searchsorted(ends, torch.arange(rows, device=x.device), right=True)
    align = reference.moe_align(group[:, None], experts, BLOCK_M)
    _moe_gemm(x, w, out, align, None, 1, gated=False)
    return out
