"""Paged attention of one layer over a flat batch: the only place models call attention ops.

A step's batch is flat: ``num_tokens`` rows, the single-token decodes first, then the prompt
chunks (prefills, chunked prefills, recomputes after preemption). Each layer has first written
the new tokens' K/V into the paged cache (``rotary_embedding_and_store_kvcache``, at the slots
``slot_mapping`` computed once for the step, on the host); it then attends with
``flash_attn_with_kvcache`` over the cache, causally aligned bottom-right (a chunk sees the
sequence's earlier tokens and its own up to itself): one batched call for the decodes
(Flash-Decoding, the call CUDA graphs capture) and one call per chunk.
"""

from dataclasses import dataclass, field

import torch

from ember import ops


@dataclass
class AttentionMetadata:
    """Where the new K/V go and what each query attends to.

    slot_mapping: int64 ``[num_tokens]``, the cache slot of each token's K/V (-1: a padding
        row, not stored).
    num_decodes: the first ``num_decodes`` rows are one-token decodes.
    decode_seqlens: int32 ``[num_decodes]``, keys each decode attends (its own included).
    decode_block_table: int32 ``[num_decodes, max_blocks]``.
    chunks: per prompt chunk, host ints ``(first row, num_tokens, keys it attends to)``; the
        keys are the sequence's tokens up to and including the chunk's last.
    chunk_block_table: int32 ``[num_chunks, max_blocks]``.
    """

    slot_mapping: torch.Tensor | None = None
    num_decodes: int = 0
    decode_seqlens: torch.Tensor | None = None
    decode_block_table: torch.Tensor | None = None
    chunks: list = field(default_factory=list)
    chunk_block_table: torch.Tensor | None = None


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, *, softmax_scale: float,
                    window: int | None, backend: str) -> torch.Tensor:
    """Causal attention of a flat batch over the paged cache, which already holds the batch's
    new K/V.

    q: ``[num_tokens, heads_q, head_dim]``; k_cache, v_cache: ``[num_blocks, block_size,
    heads_kv, head_dim]``. ``window``: Hugging Face's sliding window (a query sees that many
    most recent keys, itself included) or None. Returns ``[num_tokens, heads_q, head_dim]``.
    """
    window_size = (-1, -1) if window is None else (window - 1, 0)
    common = dict(softmax_scale=softmax_scale, causal=True, window_size=window_size,
                  backend=backend)
    parts = []
    nd = meta.num_decodes
    if nd:
        out = ops.flash_attn_with_kvcache(
            q[:nd, None], k_cache, v_cache, cache_seqlens=meta.decode_seqlens,
            block_table=meta.decode_block_table, **common)
        parts.append(out[:, 0])
    for i, (start, length, keys) in enumerate(meta.chunks):
        out = ops.flash_attn_with_kvcache(
            q[None, start:start + length], k_cache, v_cache, cache_seqlens=keys,
            block_table=meta.chunk_block_table[i:i + 1], **common)
        parts.append(out[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
