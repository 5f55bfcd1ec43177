"""Paged attention of one layer over a flat batch: the only place models call attention ops.

A step's batch is flat: ``num_tokens`` rows, the single-token decodes first, then the prompt
chunks (prefills, chunked prefills, recomputes after preemption). Each row's q and k are
rotated (rotary embedding), its k and v written into the paged cache, and it attends causally
over the cache, aligned bottom-right (a chunk sees the sequence's earlier tokens and its own up
to itself):

- the decodes in one batched ``flash_attn_with_kvcache`` call that is handed the new k/v and
  the rotary table (Flash-Decoding; on CUDA one kernel rotates, stores and attends; the call
  CUDA graphs capture);
- the chunks through ``rotary_embedding_and_store_kvcache`` at the slots ``slot_mapping``
  computed for the step on the host, then one ``flash_attn_with_kvcache`` call per chunk
  (with a tree mask for a tree of speculative drafts, whose rows' positions are their depths
  while their slots follow the row order).
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ember import ops


class KVCache(NamedTuple):
    """One layer's paged cache: ``k, v [num_blocks, block_size, heads_kv, head_dim]`` in the
    model's dtype or float8_e4m3fn, and for fp8 their float32 ``[1]`` scales (a stored code
    times its scale is the value; None for 16/32-bit caches)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Where the new K/V go and what each query attends to.

    slot_mapping: int64 ``[num_tokens]``, the cache slot of each token's K/V (-1: a padding
        row, not stored); read for the chunk rows only.
    num_decodes: the first ``num_decodes`` rows are one-token decodes.
    decode_cache_seqlens: int32 ``[num_decodes]``, cached keys before each decode's own token
        (its position).
    decode_block_table: int32 ``[num_decodes, max_blocks]``.
    decode_max_seqlen_k: a bound on each decode's keys (its own included), or None: the decode
        attention kernel picks its tile width from it (CUDA graphs are captured per bound).
    chunks: per prompt chunk, host ints ``(first row, num_tokens, keys it attends to)``; the
        keys are the sequence's tokens up to and including the chunk's last.
    chunk_block_table: int32 ``[num_chunks, max_blocks]``.
    chunk_tree_masks: per chunk, None (causal) or bool ``[num_tokens, num_tokens]``: the rows
        a chunk row sees among the chunk's (a tree of speculative draft tokens: its ancestors
        and itself), besides everything cached before the chunk.
    """

    slot_mapping: torch.Tensor | None = None
    num_decodes: int = 0
    decode_cache_seqlens: torch.Tensor | None = None
    decode_block_table: torch.Tensor | None = None
    decode_max_seqlen_k: int | None = None
    chunks: list = field(default_factory=list)
    chunk_block_table: torch.Tensor | None = None
    chunk_tree_masks: list = field(default_factory=list)


def paged_attention(positions, q, k, v, cache: KVCache, cos_sin_cache,
                    meta: AttentionMetadata, *, softmax_scale: float, window: int | None,
                    backend: str) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX pairs), the KV cache write and causal attention of a flat
    batch.

    positions: int64 ``[num_tokens]``; q: ``[num_tokens, heads_q, head_dim]``; k, v:
    ``[num_tokens, heads_kv, head_dim]``, not yet rotated; cache: the layer's KVCache (an fp8
    cache quantizes on write and dequantizes in the attention kernels); cos_sin_cache:
    ``[max_positions, rotary_dim]`` (cos half, then sin half). ``window``: Hugging Face's
    sliding window (a query sees that many most recent keys, itself included) or None.
    Returns ``[num_tokens, heads_q, head_dim]``.
    """
    window_size = (-1, -1) if window is None else (window - 1, 0)
    common = dict(softmax_scale=softmax_scale, causal=True, window_size=window_size,
                  k_scale=cache.k_scale, v_scale=cache.v_scale, backend=backend)
    parts = []
    nd = meta.num_decodes
    if nd:
        half = cos_sin_cache.shape[1] // 2
        out = ops.flash_attn_with_kvcache(
            q[:nd, None], cache.k, cache.v, k=k[:nd, None], v=v[:nd, None],
            cache_seqlens=meta.decode_cache_seqlens, block_table=meta.decode_block_table,
            rotary_cos=cos_sin_cache[:, :half], rotary_sin=cos_sin_cache[:, half:],
            rotary_interleaved=False, max_seqlen_k=meta.decode_max_seqlen_k, **common)
        parts.append(out[:, 0])
    if meta.chunks:
        # One kernel rotates q and k and writes k and v into their cache slots.
        q_chunks = ops.rotary_embedding_and_store_kvcache(
            positions[nd:], q[nd:], k[nd:], v[nd:], cos_sin_cache, cache.k, cache.v,
            meta.slot_mapping[nd:], is_neox=True, k_scale=cache.k_scale, v_scale=cache.v_scale,
            backend=backend)
        for i, (start, length, keys) in enumerate(meta.chunks):
            tree = meta.chunk_tree_masks[i] if meta.chunk_tree_masks else None
            # A tree mask replaces the causal one (each node sees its ancestors: earlier rows).
            args = common if tree is None else {**common, "causal": False,
                                                "tree_mask": tree[None]}
            out = ops.flash_attn_with_kvcache(
                q_chunks[None, start - nd:start - nd + length], cache.k, cache.v,
                cache_seqlens=keys, block_table=meta.chunk_block_table[i:i + 1], **args)
            parts.append(out[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
