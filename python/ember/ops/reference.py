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


# ----------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Quantized GEMMs
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# 2:4 sparsity
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Engine glue: norms, rotary, activation
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
