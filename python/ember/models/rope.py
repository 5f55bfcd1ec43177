"""Rotary position embedding tables, including the rope scaling of Llama 3.1/3.2.

The table is ``ember.ops.rotary_embedding``'s ``cos_sin_cache``: ``[max_positions, head_dim]``,
row ``p`` holding ``cos(p * inv_freq)`` then ``sin(p * inv_freq)`` (``head_dim / 2`` each).
"""

import math

import torch

from ember.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """float32 ``[head_dim / 2]``: the angle per position of each rotated pair.

    Computed in float32 exactly as transformers does, so float32 runs match it bit for bit.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    return _llama3_scaled(inv_freq, scaling, config.max_position_embeddings)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    # Llama 3.1: wavelengths shorter than the pre-training context / high_freq_factor keep their
    # frequency, those longer than context / low_freq_factor are slowed down by `factor`, and the
    # band in between is interpolated linearly in 1/wavelength.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling.get("original_max_position_embeddings", max_positions)
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelen - low) / (high - low)
    mixed = (1 - blend) * slowed / factor + blend * slowed
    in_band = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(in_band, mixed, slowed)


def cos_sin_cache(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """float32 ``[max_positions, head_dim]``: cos half then sin half for every position."""
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    # An outer product by broadcasting rounds each angle once, like transformers' K=1 matmul.
    angles = positions[:, None] * inverse_frequencies(config)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
