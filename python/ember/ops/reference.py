"""Torch references for every op in ember.ops: the oracle of tests and benchmarks, and the
CPU fallback of the engine.

Plain, readable torch that accumulates in float32 (float64 where a test asks for it by passing
float64 inputs). Speed is not a goal here; clarity and exact semantics are. Each function is
itself tested against an independent naive formulation in tests/reference/.
"""

import torch

FP8_E4M3_MAX = 448.0


def quantize_fp8_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to ±448 and rounded to nearest even in float8_e4m3fn."""
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Write row ``i`` of k/v into cache slot ``slot_mapping[i]`` (skip -1), in place."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    new_k, new_v = k[keep], v[keep]
    if k_cache.dtype == torch.float8_e4m3fn:
        new_k, new_v = quantize_fp8_e4m3(new_k, k_scale), quantize_fp8_e4m3(new_v, v_scale)
    k_cache[blocks, offsets] = new_k.to(k_cache.dtype)
    v_cache[blocks, offsets] = new_v.to(v_cache.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
# Semantics (flash-attn 2.x, forward): NHD tensors; query head h reads kv head
# h // (heads_q // heads_kv); masks align bottom-right, so with lengths (sq, sk) query row i
# sits at key position i + sk - sq. Rows that see no key give zeros and lse = -inf.
# ``upcast=False`` runs the same math in the input dtype: the "torch in low precision" baseline
# of the tolerance rule.

def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), device=None):
    """Bool ``[seqlen_q, seqlen_k]``: True where query row i may attend to key j.

    Bottom-right aligned: row i sits at key position ``i + seqlen_k - seqlen_q``. ``causal``
    hides keys after that position; ``window_size=(left, right)`` keeps keys within ``left``
    before and ``right`` after it (-1: unbounded on that side).
    """
    left, right = window_size
    rows = torch.arange(seqlen_q, device=device)[:, None]
    keys = torch.arange(seqlen_k, device=device)[None, :]
    position = rows + (seqlen_k - seqlen_q)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        visible &= keys <= position
    if left >= 0:
        visible &= keys >= position - left
    if right >= 0:
        visible &= keys <= position + right
    return visible


def _attend(q, k, v, visible, softmax_scale, upcast):
    """Masked softmax attention of one batch.

    q ``[b, sq, hq, d]``, k/v ``[b, sk, hkv, d]``, visible bool ``[sq, sk]`` or ``[b, sq, sk]``.
    Returns out ``[b, sq, hq, d]`` in q's dtype and lse float32 ``[b, hq, sq]``.
    """
    dtype = _compute_dtype(q.dtype, upcast)
    group = q.shape[2] // k.shape[2]
    # The reference may repeat K/V per query head; kernels index kv head h // group instead.
    k = k.to(dtype).repeat_interleave(group, dim=2)
    v = v.to(dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k) * softmax_scale
    hidden = ~visible.unsqueeze(-3)  # broadcast over heads
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
    # A row with no visible key is all -inf, which softmax turns into NaN: zero it instead.
    probs = torch.softmax(scores, dim=-1).masked_fill(hidden, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, upcast=True):
    """Reference ``flash_attn_func``: q ``[b, sq, hq, d]``, k/v ``[b, sk, hkv, d]``.

    Returns out ``[b, sq, hq, d]`` (q's dtype), and lse float32 ``[b, hq, sq]`` if return_lse.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    visible = attention_mask(q.shape[1], k.shape[1], causal, window_size, q.device)
    out, lse = _attend(q, k, v, visible, scale, upcast)
    return (out, lse) if return_lse else out


def _cache_index(batch_index, positions, block_table, block_size):
    """Where logical token ``positions`` of sequence ``batch_index`` live in a KV cache.

    Contiguous cache ``[batch, max_len, ...]``: row ``(batch_index, position)``. Paged cache
    ``[num_blocks, block_size, ...]``: block ``block_table[batch_index, position // block_size]``,
    offset ``position % block_size``. Returns the two index tensors for the first two dims.
    """
    if block_table is None:
        return torch.full_like(positions, batch_index), positions
    blocks = block_table[batch_index].long()[positions // block_size]
    return blocks, positions % block_size


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1),
                           return_lse=False, block_table=None, upcast=True):
    """Reference ``flash_attn_varlen_func``: packed sequences.

    q ``[total_q, hq, d]``; k/v ``[total_k, hkv, d]``, or with ``block_table`` (int32
    ``[batch, max_blocks]``) paged caches ``[num_blocks, block_size, hkv, d]`` whose sequence b
    holds ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys. cu_seqlens_*: int32 ``[batch + 1]``.
    ``max_seqlen_*`` only bound the lengths (kernels size grids with them); the math ignores them.
    Returns out ``[total_q, hq, d]``, and lse float32 ``[hq, total_q]`` if return_lse.
    """
    del max_seqlen_q, max_seqlen_k
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b]:starts_q[b + 1]]
        if block_table is None:
            k_b, v_b = k[starts_k[b]:starts_k[b + 1]], v[starts_k[b]:starts_k[b + 1]]
        else:
            positions = torch.arange(starts_k[b + 1] - starts_k[b], device=q.device)
            where = _cache_index(b, positions, block_table, k.shape[1])
            k_b, v_b = k[where], v[where]
        visible = attention_mask(q_b.shape[0], k_b.shape[0], causal, window_size, q.device)
        out, lse = _attend(q_b[None], k_b[None], v_b[None], visible, scale, upcast)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), num_splits=0, return_lse=False, tree_mask=None,
                            k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None,
                            rotary_interleaved=True, upcast=True):
    """Reference ``flash_attn_with_kvcache``: decode / append over a KV cache.

    q ``[b, sq, hq, d]``. Cache: contiguous ``[b, max_len, hkv, d]``, or paged
    ``[num_blocks, block_size, hkv, d]`` with int32 ``block_table [b, max_blocks]``; q's dtype or
    float8_e4m3fn (then float32 scalar ``k_scale``/``v_scale``; stored value = cache * scale).
    ``cache_seqlens`` (int32 ``[b]``, an int, or None for the full capacity) counts the valid
    cached tokens. New tokens k/v ``[b, sn, hkv, d]`` are written into the cache, in place, at
    ``cache_seqlens .. cache_seqlens + sn - 1`` (quantised like ``store_kvcache`` for fp8), and
    attention covers all ``cache_seqlens + sn`` keys; the query rows are the last sq of them.
    ``tree_mask`` bool ``[b, sq, sq]`` replaces the causal rule among the last sq keys: row i
    sees every earlier key plus last-sq key t where ``tree_mask[b, i, t]``; the window still
    applies by position. ``num_splits`` only changes how kernels split the sum; ignored here.
    ``rotary_cos``/``rotary_sin`` ``[seqlen_ro, rotary_dim / 2]``: the new k rotate at positions
    ``cache_seqlens + j`` and q at ``cache_seqlens + i`` (causal or windowed) or
    ``cache_seqlens``, pairs ``(2i, 2i + 1)`` if ``rotary_interleaved`` else ``(i, i + dim / 2)``
    (flash-attn's rule), positions clipped to the table, as :func:`rotary_embedding` rotates.
    Returns out ``[b, sq, hq, d]``, and lse float32 ``[b, hq, sq]`` if return_lse.
    """
    del num_splits
    batch, seqlen_q = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    block_size = k_cache.shape[1]
    capacity = block_size * (block_table.shape[1] if block_table is not None else 1)
    if cache_seqlens is None:
        cached = [capacity] * batch
    elif isinstance(cache_seqlens, int):
        cached = [cache_seqlens] * batch
    else:
        cached = cache_seqlens.tolist()
    num_new = 0 if k is None else k.shape[1]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if rotary_cos is not None:
        by_row = causal or tuple(window_size) != (-1, -1)
        q, k = _rotate_new_tokens(q, k, rotary_cos, rotary_sin, rotary_interleaved, cached,
                                  by_row)

    outs, lses = [], []
    for b in range(batch):
        if k is not None:
            positions = torch.arange(cached[b], cached[b] + num_new, device=q.device)
            where = _cache_index(b, positions, block_table, block_size)
            new_k, new_v = k[b], v[b]
            if fp8:
                new_k, new_v = quantize_fp8_e4m3(new_k, k_scale), quantize_fp8_e4m3(new_v, v_scale)
            k_cache[where] = new_k.to(k_cache.dtype)
            v_cache[where] = new_v.to(v_cache.dtype)
        total = cached[b] + num_new
        where = _cache_index(b, torch.arange(total, device=q.device), block_table, block_size)
        k_b, v_b = k_cache[where], v_cache[where]
        if fp8:
            k_b, v_b = k_b.float() * k_scale.float(), v_b.float() * v_scale.float()
        if tree_mask is None:
            visible = attention_mask(seqlen_q, total, causal, window_size, q.device)
        else:
            # Every key before the last sq is visible; among those, the tree decides.
            visible = attention_mask(seqlen_q, total, False, window_size, q.device)
            among_new = torch.ones(seqlen_q, total, dtype=torch.bool, device=q.device)
            among_new[:, total - seqlen_q:] = tree_mask[b]
            visible &= among_new
        out, lse = _attend(q[b:b + 1], k_b[None], v_b[None], visible, scale, upcast)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs)
    lse = torch.cat(lses)
    return (out, lse) if return_lse else out


def _rotate_new_tokens(q, k, rotary_cos, rotary_sin, interleaved, cached, by_row):
    """flash_attn_with_kvcache's rotary of q ``[b, sq, hq, d]`` and k ``[b, sn, hkv, d]``."""
    last = rotary_cos.shape[0] - 1
    q_out, k_out = [], []
    for b, start in enumerate(cached):
        k_pos = torch.arange(start, start + k.shape[1], device=q.device).clamp(0, last)
        q_pos = (torch.arange(start, start + q.shape[1], device=q.device) if by_row
                 else torch.full((q.shape[1],), start, device=q.device)).clamp(0, last)
        for x, pos, out in ((q[b], q_pos, q_out), (k[b], k_pos, k_out)):
            cos, sin = rotary_cos[pos].float()[:, None], rotary_sin[pos].float()[:, None]
            out.append(_rotate(x, cos, sin, not interleaved))
    return torch.stack(q_out), torch.stack(k_out)


def merge_attn_states(out_a, lse_a, out_b, lse_b, upcast=True):
    """Combine two attentions of the same queries over disjoint key sets A and B.

    out_* ``[tokens, heads, d]``, lse_* float32 ``[heads, tokens]`` (vLLM's layout). The result
    equals attention over A ∪ B: weights ``exp(lse_a - m)``, ``exp(lse_b - m)`` with
    ``m = max(lse_a, lse_b)``. A side with lse = -inf weighs zero; both -inf gives zeros and
    lse -inf, without NaN. Returns ``(out [tokens, heads, d] in out_a's dtype, lse float32)``.
    """
    dtype = _compute_dtype(out_a.dtype, upcast)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    top = torch.maximum(lse_a, lse_b)
    # Shift by 0 where both sides are empty so the weights become exp(-inf) = 0, not NaN.
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = weight_a + weight_b
    lse = shift + torch.log(total)  # log(0) = -inf when both are empty
    denom = torch.where(total > 0, total, torch.ones_like(total))
    # [heads, tokens] weights -> [tokens, heads, 1] to scale each output row.
    frac_a = (weight_a / denom).transpose(0, 1).unsqueeze(-1)
    frac_b = (weight_b / denom).transpose(0, 1).unsqueeze(-1)
    out = frac_a * out_a.to(dtype) + frac_b * out_b.to(dtype)
    return out.to(out_a.dtype).contiguous(), lse.float().contiguous()


# ----------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------

def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` upcast for accumulation: float32, or float64 when a test passes float64."""
    return t.to(_compute_dtype(t.dtype, upcast=True))


def moe_route(router_logits, top_k, renormalize=True):
    """Softmax top-k routing: ``(topk_weights, topk_ids)``, both ``[tokens, top_k]``.

    Softmax over the experts in float32, then the ``top_k`` largest probabilities in descending
    order; with ``renormalize`` the selected weights are divided by their sum (Mixtral).
    Weights are float32 (float64 for float64 logits), ids int32.
    """
    probs = torch.softmax(_acc(router_logits), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_align(topk_ids, num_experts, block_m):
    """Group the (token, k) slots of ``topk_ids`` by expert, padded to blocks of ``block_m`` rows.

    ``topk_ids [tokens, top_k]`` is read flat: slot ``s = token * top_k + k``. Returns
    ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, all int32:

    - ``sorted_token_ids [numel + num_experts * (block_m - 1)]``: expert 0's slots in ascending
      order, padded with the sentinel ``numel`` to a multiple of ``block_m``, then expert 1's, and
      so on; everything after the last expert's padding is the sentinel too. Experts without
      slots take no rows. Ids outside ``[0, num_experts)`` are skipped (e.g. -1 for an expert
      held elsewhere).
    - ``expert_ids [ceil(len(sorted_token_ids) / block_m)]``: the expert of each block of
      ``block_m`` rows, -1 for blocks past ``num_tokens_post_padded``.
    - ``num_tokens_post_padded [1]``: the number of used rows (a multiple of ``block_m``).

    Everything stays on the device (no host sync), as a kernel would.
    """
    flat = topk_ids.reshape(-1).long()
    numel, device = flat.numel(), flat.device
    max_padded = numel + num_experts * (block_m - 1)
    valid = (flat >= 0) & (flat < num_experts)
    # Skipped slots get the pseudo-expert num_experts, which sorts last and owns no rows.
    expert = torch.where(valid, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    starts = torch.cumsum(counts, 0) - counts
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts:].zero_()  # a slice, not a scalar index: no host->device copy
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded

    order = torch.sort(expert, stable=True).indices  # slots by expert, ascending within one
    sorted_expert = expert[order]
    rank = torch.arange(numel, device=device) - starts[sorted_expert]
    # Skipped slots land in one extra row that is cut off afterwards (a boolean filter would
    # need the count on the host).
    dest = torch.where(sorted_expert < num_experts, padded_starts[sorted_expert] + rank,
                       max_padded)
    sorted_ids = torch.full((max_padded + 1,), numel, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    sorted_ids = sorted_ids[:max_padded]

    total = padded_ends[num_experts - 1]
    num_blocks = (max_padded + block_m - 1) // block_m
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_ends[:num_experts], block_starts, right=True)
    expert_ids = torch.where(block_starts < total, block_expert, -1).to(torch.int32)
    return sorted_ids, expert_ids, total.reshape(1).to(torch.int32)


def grouped_gemm(x, w, group_offsets):
    """``out[rows of group e] = x[rows of group e] @ w[e]^T``; x ``[M, K]``, w ``[E, N, K]``.

    ``group_offsets`` int32 ``[E]`` holds cumulative end rows (``torch._grouped_mm``'s ``offs``):
    group e is rows ``[group_offsets[e-1], group_offsets[e])`` with ``group_offsets[-1] = 0``.
    Rows from ``group_offsets[E-1]`` to M are zero. The ends are clipped to ``[0, M]`` and made
    non-decreasing (running max), which is the memory-safe reading every backend shares for
    offsets that were not checked. Returns ``[M, N]`` in x's dtype.
    """
    m = x.shape[0]
    acc = _compute_dtype(x.dtype, upcast=True)
    out = torch.zeros(m, w.shape[1], dtype=acc, device=x.device)
    ends = group_offsets.long().clamp(0, m).cummax(0).values.tolist()
    start = 0
    for e, end in enumerate(ends):
        out[start:end] = x[start:end].to(acc) @ w[e].to(acc).T
        start = end
    return out.to(x.dtype)


def fused_moe(hidden, w13, w2, router_logits, top_k, renormalize=True):
    """Mixtral-style MoE layer with SwiGLU experts.

    hidden ``[T, H]``; w13 ``[E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)`` up); w2 ``[E, H, I]``;
    router_logits ``[T, E]``. Routing by :func:`moe_route`; each token's output is
    ``sum_k weight_k * w2[e_k] @ (silu(gate_k) * up_k)`` accumulated in float32.
    Returns ``[T, H]`` in hidden's dtype.
    """
    weights, ids = moe_route(router_logits, top_k, renormalize)
    h = _acc(hidden)
    out = torch.zeros_like(h)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        gate_up = h[token] @ w13[e].to(h.dtype).T
        expert_out = silu_and_mul(gate_up) @ w2[e].to(h.dtype).T
        out.index_add_(0, token, expert_out * weights[token, slot, None].to(h.dtype))
    return out.to(hidden.dtype)



# ----------------------------------------------------------------------------------------------
# Dense linear layers
# ----------------------------------------------------------------------------------------------

def skinny_linear(x, weight, bias=None, activation=None):
    """``x @ weight^T (+ bias)`` in float32, rounded once to x's dtype; x ``[M, K]``, weight
    ``[N, K]``, bias ``[N]``. With ``activation="silu_and_mul"`` x is ``[M, 2K]`` and the input
    is :func:`silu_and_mul` of it, rounded to x's dtype first, as an unfused pair would."""
    if activation == "silu_and_mul":
        x = silu_and_mul(x)
    y = _acc(x) @ _acc(weight).T
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Quantized GEMMs
# ----------------------------------------------------------------------------------------------

INT8_MAX = 127
INT4_MAX = 15  # unsigned 4-bit codes 0..15


def _row_scale(t: torch.Tensor, qmax: float) -> torch.Tensor:
    """float32 ``max|row| / qmax`` per row, kept above zero so all-zero rows divide safely."""
    return (t.float().abs().amax(dim=-1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_int8(w):
    """Symmetric per-output-channel int8: ``(qweight int8 [N, K], scale float32 [N])``.

    ``scale = max|w[n]| / 127``; ``qweight = round(w / scale)`` (half to even) in [-127, 127].
    """
    scale = _row_scale(w, INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(qweight, scale):
    """float32 ``[N, K]`` weight ``qweight * scale[:, None]``."""
    return qweight.float() * scale.float()[:, None]


def w8a16_gemm(x, qweight, scale):
    """``x @ dequantize_int8(qweight, scale)^T``; x ``[M, K]`` -> ``[M, N]`` in x's dtype."""
    w = dequantize_int8(qweight, scale)
    return (_acc(x) @ w.to(_acc(x).dtype).T).to(x.dtype)


def quantize_int4(w, group_size=128):
    """Asymmetric int4 with one scale and zero point per ``group_size`` weights along K.

    Returns ``(packed uint8 [N, K/2], scales float32 [N, K/group_size], zeros uint8
    [N, K/group_size])``. Per group: the range ``[min(w, 0), max(w, 0)]`` (zero is exactly
    representable) is split in 15 steps, ``scale = (hi - lo) / 15``, ``zero = round(-lo / scale)``
    in [0, 15], ``code = clamp(round(w / scale) + zero, 0, 15)``, and dequantisation is
    ``(code - zero) * scale``. Packing: byte ``j`` of a row holds column ``2j`` in its low
    nibble and ``2j + 1`` in its high nibble, so read as a little-endian int32 word ``i``,
    nibble ``n`` (bits ``4n..4n+3``) is column ``8i + n``.
    """
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    codes = torch.round(groups / scales[..., None]) + zeros[..., None]
    codes = codes.clamp(0, INT4_MAX).to(torch.uint8).reshape(n, k)
    return pack_int4(codes), scales, zeros.to(torch.uint8)


def pack_int4(codes):
    """uint8 codes ``[N, K]`` in 0..15 -> ``[N, K/2]``: even column low nibble, odd high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: ``[N, K/2]`` -> uint8 codes ``[N, K]``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scales, zeros, group_size):
    """float32 ``[N, K]`` weight ``(code - zero) * scale`` of each group."""
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    groups = codes.reshape(n, k // group_size, group_size)
    w = (groups - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k)


def w4a16_gemm(x, packed, scales, zeros, group_size):
    """``x @ dequantize_int4(...)^T``; x ``[M, K]`` -> ``[M, N]`` in x's dtype."""
    w = dequantize_int4(packed, scales, zeros, group_size)
    return (_acc(x) @ w.to(_acc(x).dtype).T).to(x.dtype)


def quantize_fp8(t):
    """Row-wise e4m3: ``(t_fp8 [R, C], scale float32 [R])`` with ``scale = max|row| / 448``.

    The weight quantiser (per output channel) and, inside :func:`fp8_gemm`, the dynamic
    per-token activation quantiser.
    """
    scale = _row_scale(t, FP8_E4M3_MAX)
    return quantize_fp8_e4m3(t, scale[:, None]), scale


def fp8_gemm(x, w_fp8, w_scale):
    """``x @ W^T`` in fp8: x ``[M, K]`` is quantised per row by :func:`quantize_fp8`, then
    ``out = (x_fp8 @ w_fp8^T) * x_scale[:, None] * w_scale[None, :]`` in float32, cast to x's
    dtype. w_fp8 ``[N, K]`` float8_e4m3fn, w_scale float32 ``[N]``.
    """
    x_fp8, x_scale = quantize_fp8(x)
    out = x_fp8.float() @ w_fp8.float().T
    return (out * x_scale[:, None] * w_scale.float()[None, :]).to(x.dtype)



# ----------------------------------------------------------------------------------------------
# 2:4 sparsity
# ----------------------------------------------------------------------------------------------

def prune_24(w, method="magnitude", act_norm=None):
    """Keep 2 of every 4 consecutive weights along K; returns the pruned dense ``w`` (same dtype).

    The two kept are those with the largest score: ``|w|`` ("magnitude"), or Wanda's
    ``|w[n, k]| * act_norm[k]`` ("wanda"), where ``act_norm [K]`` is the L2 norm of input
    feature k over calibration activations. Ties keep the lower column.
    """
    n, k = w.shape
    score = w.float().abs()
    if method == "wanda":
        score = score * act_norm.float()[None, :]
    order = torch.argsort(score.reshape(n, k // 4, 4), dim=-1, descending=True, stable=True)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=w.device)
    keep.scatter_(-1, order[..., :2], True)
    return torch.where(keep.reshape(n, k), w, torch.zeros_like(w))


def compress_24(w):
    """2:4 weight ``[N, K]`` -> ``(values [N, K/2], metadata uint8 [N, K/4])``.

    For group ``g`` (columns ``4g..4g+3``) of row n, ``metadata[n, g]`` holds the in-group
    positions of its two stored values, ``i0 < i1``, as ``i0 | i1 << 2`` (bits 4..7 are zero),
    and ``values[n, 2g], values[n, 2g + 1]`` are ``w[n, 4g + i0], w[n, 4g + i1]``. Groups with
    fewer than two nonzeros store zeros at their lowest zero positions. Groups with more than
    two nonzeros are not 2:4; ember.ops.compress_24 rejects them, this function would drop
    all but the first two.
    """
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    nonzero_first = torch.argsort((groups != 0).to(torch.int8), dim=-1, descending=True,
                                  stable=True)
    idx = nonzero_first[..., :2].sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(n, k // 2)
    metadata = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
    return values, metadata


def decompress_24(values, metadata):
    """Dense ``[N, K]`` from :func:`compress_24`'s output. Both positions are read from their
    two bits, so any metadata byte is in bounds; equal positions add up, as a GEMM would."""
    n, half = values.shape
    meta = metadata.long()
    idx = torch.stack([meta & 3, (meta >> 2) & 3], dim=-1)
    dense = torch.zeros(n, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_add_(-1, idx, values.reshape(n, half // 2, 2))
    return dense.reshape(n, 2 * half)


def sparse24_gemm(x, values, metadata):
    """``x @ decompress_24(values, metadata)^T``; x ``[M, K]`` -> ``[M, N]`` in x's dtype."""
    w = decompress_24(values, metadata)
    return (_acc(x) @ _acc(w).T).to(x.dtype)



# ----------------------------------------------------------------------------------------------
# Engine glue: norms, rotary, activation
# ----------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps=1e-6):
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` in float32; x ``[..., H]``, weight ``[H]``."""
    xf = _acc(x)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.to(xf.dtype)).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps=1e-6):
    """``(rms_norm(x + residual), x + residual)``. The sum is rounded to x's dtype before it is
    normalised, as an unfused ``residual = x + residual; rms_norm(residual)`` would."""
    new_residual = (_acc(x) + _acc(residual)).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def rotary_cos_sin_cache(max_positions, rotary_dim, base=10000.0):
    """float32 ``[max_positions, rotary_dim]``: ``cos(p * f_i)`` then ``sin(p * f_i)`` for the
    ``rotary_dim / 2`` frequencies ``f_i = base^(-2i / rotary_dim)`` (computed in float64)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * base ** -exponents
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def _rotate(x, cos, sin, is_neox):
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x [T, heads, D]``; the rest pass."""
    half = cos.shape[-1]
    xf = _acc(x)
    rot, tail = xf[..., :2 * half], xf[..., 2 * half:]
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    if is_neox:  # pairs (i, i + half)
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # gpt-j: pairs (2i, 2i + 1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, tail], dim=-1).to(x.dtype)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    """Rotary position embedding; returns new ``(q, k)``.

    positions ``[T]``; q ``[T, heads_q, D]``, k ``[T, heads_kv, D]``; cos_sin_cache
    ``[max_pos, rotary_dim]`` (cos half, then sin half). Feature pairs ``(i, i + rotary_dim/2)``
    (neox) or ``(2i, 2i + 1)`` (gpt-j) of the first ``rotary_dim`` features are rotated by
    angle ``i`` of the token's position; features past ``rotary_dim`` are copied. Positions are
    clipped to ``[0, max_pos)``, the memory-safe reading of unchecked (GPU) positions.
    """
    pos = positions.long().clamp(0, cos_sin_cache.shape[0] - 1)
    cos, sin = cos_sin_cache[pos].float()[:, None, :].chunk(2, dim=-1)
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


def rotary_embedding_and_store_kvcache(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                       slot_mapping, is_neox=True, k_scale=None, v_scale=None):
    """``rotary_embedding`` then ``store_kvcache`` of the rotated k and of v (in place); returns
    the rotated q."""
    q_rotated, k_rotated = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    store_kvcache(k_rotated, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rotated


def silu_and_mul(x):
    """``silu(x[..., :I]) * x[..., I:]`` in float32 for x ``[..., 2I]``; returns ``[..., I]``."""
    xf = _acc(x)
    gate, up = xf.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)



# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

# Random numbers are a pure function of (seed, offset, index, stream), so a row's token never
# depends on the batch around it and no generator state lives on the host. The generator is
# Philox4x32-10, as Triton's tl.philox(seed, c0, c1, c2, c3), curand and JAX use it:
# key = (seed low word, seed high word), counter = (index, offset low word, offset high word,
# stream), first output word. ``index`` is the vocabulary index (or 0 for acceptance tests).
SAMPLE_STREAM = 0      # Gumbel noise of sample()
ACCEPT_STREAM = 1      # acceptance uniforms of speculative_accept()
RESAMPLE_STREAM = 2    # Gumbel noise of speculative_accept()'s replacement and bonus tokens
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for 32-bit ``a`` and int64 tensors holding 32-bit
    values; b is split into 16-bit halves so no partial product overflows int64."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return ((p_hi >> 16) + (mid >> 32)) & _U32, mid & _U32


def philox4x32(seed, c0, c1, c2, c3, rounds=10):
    """Philox4x32 of int64 tensors (broadcast together): ``seed`` is the 64-bit key (two's
    complement for negatives), ``c0..c3`` the 32-bit counter words. Returns the four output
    words as int64 tensors holding values in ``[0, 2^32)``."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _U32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_uniform(seed, offset, index, stream):
    """float32 uniforms in (0, 1) from Philox word 0 ``r``: ``((r >> 9) + 0.5) / 2^23``.

    Exactly representable, never 0 or 1, so ``-log(-log(u))`` is always finite. ``seed``,
    ``offset`` and ``index`` are int64 tensors that broadcast together; ``stream`` an int.
    """
    r, _, _, _ = philox4x32(seed, index, offset, offset >> 32, stream)
    return ((r >> 9).float() + 0.5) * 2.0 ** -23


def _usable_logits(x):
    """float32 scores with NaN read as -inf; in a row with +inf entries those share all the
    mass (they become 0, the rest -inf); a row with no usable entry becomes uniform (all 0)."""
    x = torch.where(torch.isnan(x), float("-inf"), x)
    posinf = torch.isposinf(x)
    x = torch.where(posinf.any(-1, keepdim=True), torch.where(posinf, 0.0, float("-inf")), x)
    return torch.where(torch.isneginf(x).all(-1, keepdim=True), torch.zeros_like(x), x)


def _gumbel_argmax(scores, seed, offset, stream):
    """A draw from ``softmax(scores)`` over the last dim: ``argmax(scores + Gumbel noise)``.

    scores float32 ``[..., V]`` (already passed through :func:`_usable_logits`); seed and
    offset int64 ``[...]``. Noise at vocabulary index v is ``-log(-log(u))`` of
    ``philox_uniform(seed, offset, v, stream)``.
    """
    index = torch.arange(scores.shape[-1], device=scores.device)
    u = philox_uniform(seed[..., None], offset[..., None], index, stream)
    return torch.argmax(scores - torch.log(-torch.log(u)), dim=-1)


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """One token per row of ``logits [B, V]``; int64 ``[B]``.

    Per-row parameters (``[B]``): temperature float32, top_k int32 or int64, top_p float32,
    min_p float32, seeds int64, offsets int64. Rows with ``temperature <= 0`` (or NaN) are greedy:
    the first index of the largest logit. Other rows, with ``z = (logits - max(logits)) /
    temperature`` and ``p = softmax(z)``, keep token i if all of:

    - top-k: ``p_i >= `` the k-th largest p (ties at the threshold stay); off if k <= 0 or >= V;
    - top-p: the mass of top-k-kept tokens with ``p_j > p_i`` is ``< top_p`` times the top-k-kept
      mass; off if top_p >= 1;
    - min-p: ``p_i >= min_p * max(p)``;

    the most likely tokens are always kept. The token is ``argmax(z_i + g_i)`` over kept i
    with Gumbel noise ``g`` from :func:`philox_uniform` (seed, offset, i, stream 0): a draw from
    the renormalised kept distribution, fixed by (row logits, parameters, seed, offset) alone.
    NaN logits are never drawn; +inf logits share all the mass; a row without a usable logit
    is uniform (greedy: token 0). See :func:`_usable_logits`.
    """
    vocab = logits.shape[-1]
    greedy = ~(temperature > 0)
    # Greedy rows divide by 1; an (unchecked) infinite temperature by the largest float.
    scale = torch.where(greedy, 1.0, temperature).clamp(max=torch.finfo(torch.float32).max)
    z = _usable_logits(logits.float())
    # Shifting by the row max first keeps z <= 0, so a tiny temperature cannot overflow to +inf.
    z = (z - z.amax(dim=-1, keepdim=True)) / scale[:, None]
    # A batch of greedy rows needs no filtering or noise. Asking reads the flags on the host,
    # so only CPU tensors ask (a CPU engine's common case; on a GPU it would sync).
    if logits.device.type == "cpu" and bool(greedy.all()):
        return z.argmax(dim=-1)
    probs = torch.softmax(z, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    p_max = sorted_probs[:, :1]

    k = top_k.long()
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    kth = sorted_probs.gather(-1, k[:, None] - 1)
    keep_k = probs >= kth

    in_k = torch.where(sorted_probs >= kth, sorted_probs, 0.0)
    mass_before = torch.cumsum(in_k, dim=-1) - in_k
    # Position of the first sorted entry <= p_i: everything before it is strictly larger.
    first_not_larger = torch.searchsorted(-sorted_probs, -probs.contiguous(), side="left")
    mass_above = mass_before.gather(-1, first_not_larger)
    total = in_k.sum(dim=-1, keepdim=True)
    keep_p = (top_p[:, None] >= 1) | (mass_above < top_p[:, None] * total)

    keep_min_p = probs >= min_p[:, None] * p_max
    keep = (keep_k & keep_p & keep_min_p) | (probs == p_max)

    drawn = _gumbel_argmax(torch.where(keep, z, float("-inf")), seeds, offsets, SAMPLE_STREAM)
    return torch.where(greedy, z.argmax(dim=-1), drawn)


def _as_distribution(probs):
    """float32 probabilities with NaN and negative entries read as 0."""
    probs = probs.float()
    return torch.where(probs > 0, probs, 0.0)


def speculative_accept(draft_token_ids, draft_probs, target_probs, seeds, offsets):
    """Rejection sampling of k draft tokens (Leviathan et al. 2023, Chen et al. 2023).

    draft_token_ids ``[B, k]``; draft_probs float32 ``[B, k, V]`` (q_j) or None for greedy;
    target_probs float32 ``[B, k + 1, V]`` (p_j); seeds, offsets int64 ``[B]``.
    Draft j is accepted if ``u_j * q_j(t_j) < p_j(t_j)`` (probability ``min(1, p/q)``) with
    ``u_j = philox_uniform(seed, offset + j, 0, stream 1)``, and only while all before it were.
    At the first rejection j the token is drawn from ``normalize(max(0, p_j - q_j))`` (from
    p_j if that is all zero); if all k pass, a bonus token is drawn from p_k. Draws use
    :func:`_gumbel_argmax` on ``log`` of the distribution at ``offset + j``, stream 2. The
    emitted tokens are then distributed exactly as tokens drawn from the target.
    Greedy (draft_probs None): accept while ``t_j == argmax(p_j)``; the replacement or bonus
    is ``argmax(p_j)``. One-hot p and q for a row give the same result as greedy.
    Draft tokens outside ``[0, V)`` are rejected; NaN or negative probabilities count as 0,
    and a distribution left with no positive entry is drawn from uniformly.

    Returns ``(output_tokens int64 [B, k + 1], num_accepted int64 [B])``: the accepted drafts,
    then the replacement or bonus token, then -1.
    """
    batch, k = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    device = target_probs.device
    p = _as_distribution(target_probs)
    drafts = draft_token_ids.long()
    valid = (drafts >= 0) & (drafts < vocab)
    safe_drafts = drafts.clamp(0, vocab - 1)
    if draft_probs is None:
        best = p.argmax(dim=-1)
        accepted = valid & (safe_drafts == best[:, :k])
        emitted = best
    else:
        q = _as_distribution(draft_probs)
        p_draft = p[:, :k].gather(-1, safe_drafts[..., None]).squeeze(-1)
        q_draft = q.gather(-1, safe_drafts[..., None]).squeeze(-1)
        position = offsets[:, None] + torch.arange(k + 1, device=device)
        u = philox_uniform(seeds[:, None], position[:, :k], 0, ACCEPT_STREAM)
        accepted = valid & (u * q_draft < p_draft)
        residual = (p[:, :k] - q).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])
        dists = torch.cat([residual, p[:, k:]], dim=1)
        emitted = _gumbel_argmax(_usable_logits(dists.log()), seeds[:, None].expand(-1, k + 1),
                                 position, RESAMPLE_STREAM)

    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    slot = torch.arange(k + 1, device=device)
    drafts_padded = torch.cat([drafts, drafts.new_full((batch, 1), -1)], dim=1)
    last = emitted.gather(-1, num_accepted[:, None])
    out = torch.where(slot < num_accepted[:, None], drafts_padded, -1)
    out = torch.where(slot == num_accepted[:, None], last, out)
    return out, num_accepted


def multi_copy(dsts, srcs):
    """Copy each ``srcs[i]`` into ``dsts[i]``, ordered on the stream as ``non_blocking`` copies."""
    for dst, src in zip(dsts, srcs, strict=True):
        dst.copy_(src, non_blocking=True)


def prefetch_l2(t, rows, pitch, prefix_bytes):
    """A cache hint has no result; off the GPU there is no L2 to warm."""
