"""Rotary position embedding: ``rotary_embedding`` (neox and gpt-j pairings, partial rotary),
and ``rotary_embedding_and_store_kvcache``, the same fused with ``store_kvcache`` of the rotated
k for the decode step."""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_bool, check_tensor
from ember.ops.kvcache import _check_store_kvcache


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True, *, backend="auto"):
    """Rotate q and k by their tokens' positions (vLLM's signature); returns new ``(q, k)``.

    Args:
        positions: int32/int64 ``[T]``, each in ``[0, max_pos)``. Checked on CPU; on a GPU
            they are not read on the host (no sync) and out-of-range values are clipped.
        q: ``[T, heads_q, D]`` fp16/bf16/fp32, contiguous last dim.
        k: ``[T, heads_kv, D]``, q's dtype, contiguous last dim.
        cos_sin_cache: ``[max_pos, rotary_dim]`` float32 or q's dtype, contiguous:
            ``cos(pos * f_i)`` for the ``rotary_dim / 2`` frequencies, then ``sin(pos * f_i)``
            (``reference.rotary_cos_sin_cache`` builds the plain RoPE one). ``rotary_dim`` is
            even and at most D; features past it are left as they are (partial rotary).
        is_neox: True pairs feature i with ``i + rotary_dim / 2`` (rotate halves: Llama,
            Mistral, Qwen, NeoX); False pairs ``2i`` with ``2i + 1`` (GPT-J, interleaved).

    Each pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)`` of angle i, computed in
    float32. Returns new tensors shaped and typed like q and k.
    """
    op = "rotary_embedding"
    _check_rotary_embedding(op, positions, q, k, cos_sin_cache, is_neox)
    chosen = _registry.resolve(op, backend, positions.device)
    return torch.ops.ember.rotary_embedding(positions, q, k, cos_sin_cache, is_neox, chosen)


def _check_rotary_embedding(op, positions, q, k, cos_sin_cache, is_neox):
    """rotary_embedding's checks, in errors that name ``op`` (also
    rotary_embedding_and_store_kvcache, which rotates through them)."""
    check_tensor(op, "positions", positions, dtypes=(torch.int32, torch.int64), ndim=1)
    tokens, dev = positions.shape[0], positions.device
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=3, device=dev, last_dim_contiguous=True)
    check_tensor(op, "q", q, shape=(tokens, None, None))
    head_dim = q.shape[2]
    check_tensor(op, "k", k, dtypes=(q.dtype,), shape=(tokens, None, head_dim), device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "cos_sin_cache", cos_sin_cache, dtypes=(torch.float32, q.dtype), ndim=2,
                 device=dev, contiguous=True)
    max_pos, rotary_dim = cos_sin_cache.shape
    if max_pos == 0:
        raise ValueError(f"{op}: cos_sin_cache needs at least one position (row), got shape "
                         f"{tuple(cos_sin_cache.shape)}")
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"{op}: cos_sin_cache's rotary_dim (dim 1) must be even and in "
                         f"[2, head_dim={head_dim}], got {rotary_dim}")
    check_bool(op, "is_neox", is_neox)
    if dev.type == "cpu" and tokens:
        lo, hi = torch.aminmax(positions)
        if int(lo) < 0 or int(hi) >= max_pos:
            raise ValueError(f"{op}: positions must be in [0, {max_pos}) (cos_sin_cache rows), "
                             f"got range [{int(lo)}, {int(hi)}]")


@torch.library.custom_op("ember::rotary_embedding", mutates_args=())
def _rotary_embedding_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _registry.implementation("rotary_embedding", backend)(
        positions, q, k, cos_sin_cache, is_neox)


@_rotary_embedding_op.register_fake
def _(positions, q, k, cos_sin_cache, is_neox, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


_registry.register("rotary_embedding", torch=reference.rotary_embedding)
_registry.register("rotary_embedding", triton="ember.triton_kernels.rotary:rotary_embedding")
_registry.register("rotary_embedding", cuda="ember.ops._cuda_glue:rotary_embedding")


def rotary_embedding_and_store_kvcache(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                       slot_mapping, is_neox=True, k_scale=None, v_scale=None, *,
                                       backend="auto"):
    """``rotary_embedding`` fused with ``store_kvcache`` of the rotated k (one kernel instead of
    two per layer of a decode step); returns the rotated q and writes the caches in place.

    Exactly ``q_rot, k_rot = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)`` followed
    by ``store_kvcache(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)``, with the
    inputs of the two and their checks (the same errors, under this op's name).

    Args:
        positions: int32/int64 ``[T]``, each in ``[0, max_pos)``. Checked on CPU; on a GPU
            they are not read on the host and out-of-range values are clipped.
        q: ``[T, heads_q, D]`` fp16/bf16/fp32, contiguous last dim.
        k, v: ``[T, heads_kv, D]``, q's dtype, contiguous last dims (any token/head strides:
            slices of a fused QKV projection are fine); fp16/bf16 rows 16-byte aligned. D is a
            multiple of 8.
        cos_sin_cache: ``[max_pos, rotary_dim]`` float32 or q's dtype, contiguous: cos of the
            ``rotary_dim / 2`` angles, then their sin (``reference.rotary_cos_sin_cache``);
            ``rotary_dim`` is even and at most D, features past it are not rotated.
        k_cache, v_cache: ``[num_blocks, block_size, heads_kv, D]``, q's dtype or
            ``torch.float8_e4m3fn``; contiguous last dim.
        slot_mapping: int64 ``[T]``: ``block * block_size + offset`` per token, ``-1`` skips
            the token's k and v (its q is still rotated). Slots must be distinct.
        is_neox: True pairs feature i with ``i + rotary_dim / 2`` (rotate halves); False pairs
            ``2i`` with ``2i + 1`` (GPT-J).
        k_scale, v_scale: float32 one-element tensors, required for fp8 caches: the cache holds
            ``value / scale`` saturated to ±448, rounded to nearest even.
        backend: "auto", "cuda", "triton" or "torch".

    The rotated k is rounded to q's dtype before it is stored (and quantised, for an fp8 cache),
    as the two ops in sequence would. Returns the rotated q: a new ``[T, heads_q, D]`` tensor of
    q's dtype. Slot values are checked with one device-to-host copy, skipped while a CUDA graph is
    being captured.
    """
    op = "rotary_embedding_and_store_kvcache"
    _check_rotary_embedding(op, positions, q, k, cos_sin_cache, is_neox)
    _check_store_kvcache(op, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    chosen = _registry.resolve(op, backend, positions.device)
    return torch.ops.ember.rotary_embedding_and_store_kvcache(
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox, k_scale,
        v_scale, chosen)


@torch.library.custom_op("ember::rotary_embedding_and_store_kvcache",
                         mutates_args=("k_cache", "v_cache"))
def _rotary_embedding_and_store_kvcache_op(
        positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        slot_mapping: torch.Tensor, is_neox: bool, k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _registry.implementation("rotary_embedding_and_store_kvcache", backend)(
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox, k_scale,
        v_scale)


@_rotary_embedding_and_store_kvcache_op.register_fake
def _(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox, k_scale,
      v_scale, backend):
    return q.new_empty(q.shape)


_registry.register("rotary_embedding_and_store_kvcache",
                   torch=reference.rotary_embedding_and_store_kvcache)
_registry.register("rotary_embedding_and_store_kvcache",
                   triton="ember.triton_kernels.rotary:rotary_embedding_and_store_kvcache")
_registry.register("rotary_embedding_and_store_kvcache",
                   cuda="ember.ops._cuda_glue:rotary_embedding_and_store_kvcache")
