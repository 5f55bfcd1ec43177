"""Merging partial attention states by their log-sum-exp, in Triton.

Attentions of the same queries over disjoint key sets, ``(o_i, lse_i)``, combine into the
attention over the union: ``lse = log(sum_i exp(lse_i))`` and ``o = sum_i exp(lse_i - lse) *
o_i``. An empty state (``lse = -inf``, no key seen) has weight zero; merging only empty states
gives ``o = 0`` and ``lse = -inf``.

``fold_states`` is that math as a running fold over blocks of states, used both by the public
``merge_attn_states`` kernel here (two states) and by the split-KV combine of
``decode_attention`` (one state per KV split).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def fold_states(m, s, acc, lse, o):
    """Fold states with LSEs ``lse [N]`` and outputs ``o [N, BLOCK_D]`` into the running
    ``(m, s, acc)``: max LSE so far, sum of ``exp(lse_i - m)``, sum of ``exp(lse_i - m) * o_i``
    (all float32; start from ``-inf, 0, 0``).

    Weights are taken relative to the running max so exp never overflows; while every state
    seen is empty the max is -inf, and 0 stands in for it so no -inf - -inf NaN appears.
    """
    m_new = tl.maximum(m, tl.max(lse, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    old = tl.exp(m - m_ref)
    w = tl.exp(lse - m_ref)
    return m_new, s * old + tl.sum(w, 0), acc * old + tl.sum(w[:, None] * o, 0)


@triton.jit
def finish_states(m, s, acc):
    """Normalised output and natural-log LSE of the folded states."""
    seen = s > 0.0
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(seen, m_ref + tl.log(tl.where(seen, s, 1.0)), float("-inf"))
    return acc / tl.where(seen, s, 1.0), lse


@triton.jit
def _merge_two_kernel(
    OA, LA, OB, LB, OUT, LSE,
    stride_oat, stride_oah, stride_obt, stride_obh, stride_ot, stride_oh,
    stride_lah, stride_lbh, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (token, head) row of head_dim outputs; the two sides are the two rows
    # of a [2, BLOCK_D] tile of states.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < HEAD_DIM
    side_a = tl.arange(0, 2) == 0
    o_ptrs = tl.where(side_a[:, None], OA + t * stride_oat + head * stride_oah + cols[None, :],
                      OB + t * stride_obt + head * stride_obh + cols[None, :])
    o = tl.load(o_ptrs, mask=ok[None, :], other=0.0).to(tl.float32)
    lse = tl.load(tl.where(side_a, LA + head * stride_lah + t, LB + head * stride_lbh + t))
    m, s, acc = fold_states(float("-inf"), 0.0, tl.zeros([BLOCK_D], dtype=tl.float32), lse, o)
    out, lse = finish_states(m, s, acc)
    tl.store(OUT + t * stride_ot + head * stride_oh + cols, out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + head * stride_lh + t, lse)


def merge_attn_states(out_a, lse_a, out_b, lse_b):
    """Triton backend of ``ember.ops.merge_attn_states`` (inputs already validated).

    out_a, out_b ``[tokens, heads, d]`` fp16/bf16 with contiguous d; lse_a, lse_b float32
    ``[heads, tokens]``, contiguous. Returns ``(out [tokens, heads, d] in out_a's dtype, lse
    float32 [heads, tokens])``.
    """
    tokens, heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(heads, tokens, dtype=torch.float32, device=out_a.device)
    _merge_two_kernel[(tokens, heads)](
        out_a, lse_a, out_b, lse_b, out, lse,
        *out_a.stride()[:2], *out_b.stride()[:2], *out.stride()[:2],
        lse_a.stride(0), lse_b.stride(0), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out, lse
