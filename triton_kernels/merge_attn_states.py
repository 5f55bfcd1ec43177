"""Merging partial attention states by their log-sum-exp, in Triton.

Two attentions of the same queries over disjoint key sets, ``(o_a, lse_a)`` and ``(o_b, lse_b)``,
combine into the attention over the union: ``lse = log(exp(lse_a) + exp(lse_b))`` and
``o = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b``. An empty state (``lse = -inf``, no key
seen) has weight zero; merging only empty states gives ``o = 0`` and ``lse = -inf``.

``merge_step`` is that math as a running fold, used both by the public ``merge_attn_states``
kernel here and by the split-KV combine of ``decode_attention``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def merge_init(BLOCK_D: tl.constexpr):
    """The empty state: running max, running sum of weights, weighted sum of outputs."""
    return float("-inf"), 0.0, tl.zeros([BLOCK_D], dtype=tl.float32)


@triton.jit
def merge_step(m, s, acc, lse, o):
    """Fold the state ``(o, lse)`` into the running ``(m, s, acc)`` (all float32).

    Weights are kept relative to the running max ``m`` so exp never overflows; while every
    state seen is empty the max is -inf, and 0 stands in for it so no -inf - -inf NaN appears.
    """
    m_new = tl.maximum(m, lse)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    old = tl.exp(m - m_ref)
    w = tl.exp(lse - m_ref)
    return m_new, s * old + w, acc * old + w * o


@triton.jit
def merge_finish(m, s, acc):
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
    # One program per (token, head) row of head_dim outputs.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < HEAD_DIM
    o_a = tl.load(OA + t * stride_oat + head * stride_oah + cols, mask=ok).to(tl.float32)
    o_b = tl.load(OB + t * stride_obt + head * stride_obh + cols, mask=ok).to(tl.float32)
    lse_a = tl.load(LA + head * stride_lah + t)
    lse_b = tl.load(LB + head * stride_lbh + t)
    m, s, acc = merge_init(BLOCK_D)
    m, s, acc = merge_step(m, s, acc, lse_a, o_a)
    m, s, acc = merge_step(m, s, acc, lse_b, o_b)
    out, lse = merge_finish(m, s, acc)
    tl.store(OUT + t * stride_ot + head * stride_oh + cols, out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + head * stride_lh + t, lse)


def merge_attn_states(out_a, lse_a, out_b, lse_b):
    """Triton backend of ``ember.ops.merge_attn_states`` (inputs already validated).

    out_a, out_b ``[tokens, heads, d]`` fp16/bf16/fp32 with contiguous d; lse_a, lse_b float32
    ``[heads, tokens]`` with contiguous tokens. Returns ``(out [tokens, heads, d] in out_a's
    dtype, lse float32 [heads, tokens])``.
    """
    tokens, heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(heads, tokens, dtype=torch.float32, device=out_a.device)
    if tokens == 0:
        return out, lse
    _merge_two_kernel[(tokens, heads)](
        out_a, lse_a, out_b, lse_b, out, lse,
        *out_a.stride()[:2], *out_b.stride()[:2], *out.stride()[:2],
        lse_a.stride(0), lse_b.stride(0), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out, lse
