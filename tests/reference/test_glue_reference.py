"""Norm, rotary and activation references against naive formulations (row loops, complex
rotation) in float64."""

import math

import pytest
import torch
from helpers import assert_within_lowp_error

from ember.ops import reference

LOWP = [torch.float16, torch.bfloat16]


def naive_rms_norm(x, weight, eps):
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        rms = math.sqrt(sum(v * v for v in row.tolist()) / row.numel() + eps)
        out[i] = row / rms * weight.double()
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(1, 8), (17, 64), (3, 5, 257)])
def test_rms_norm_matches_naive(shape):
    x = torch.randn(shape, dtype=torch.float64) * 3
    weight = torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(reference.rms_norm(x, weight, 1e-5),
                               naive_rms_norm(x, weight, 1e-5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOWP)
def test_rms_norm_low_precision(dtype):
    x = torch.randn(33, 256, dtype=dtype)
    weight = torch.randn(256, dtype=dtype)
    out = reference.rms_norm(x, weight)
    assert out.dtype == dtype
    lowp = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert_within_lowp_error(out, naive_rms_norm(x, weight, 1e-6), lowp)


@pytest.mark.parametrize("dtype", [*LOWP, torch.float32])
def test_fused_add_rms_norm(dtype):
    x = torch.randn(19, 128, dtype=dtype)
    residual = torch.randn(19, 128, dtype=dtype)
    weight = torch.randn(128, dtype=dtype)
    normed, new_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    # The sum is rounded once to the input dtype; the norm then reads that rounded sum.
    want_sum = (x.double() + residual.double()).to(dtype)
    assert torch.equal(new_residual, want_sum)
    assert normed.dtype == dtype
    lowp = want_sum * torch.rsqrt(want_sum.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert_within_lowp_error(normed, naive_rms_norm(want_sum, weight, 1e-6), lowp)


def test_rotary_cache_matches_formula():
    cache = reference.rotary_cos_sin_cache(40, 16, base=500.0)
    assert cache.shape == (40, 16) and cache.dtype == torch.float32
    for pos in (0, 1, 17, 39):
        for i in range(8):
            angle = pos * 500.0 ** (-2 * i / 16)
            assert cache[pos, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert cache[pos, 8 + i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def pair_indices(rotary_dim, is_neox):
    """The features rotated together: (i, i + rotary_dim / 2) or (2i, 2i + 1)."""
    half = rotary_dim // 2
    if is_neox:
        return list(range(half)), list(range(half, rotary_dim))
    return list(range(0, rotary_dim, 2)), list(range(1, rotary_dim, 2))


def complex_rotary(positions, x, cache, is_neox):
    """Rotation as multiplication by e^{i angle}, pair by pair."""
    x = x.double()
    half = cache.shape[1] // 2
    out = x.clone()
    for t, pos in enumerate(positions.tolist()):
        phase = torch.complex(cache[pos, :half].double(), cache[pos, half:].double())
        first, second = pair_indices(2 * half, is_neox)
        z = torch.complex(x[t][:, first], x[t][:, second]) * phase
        out[t][:, first], out[t][:, second] = z.real, z.imag
    return out


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,heads_q,heads_kv,head_dim,rotary_dim", [
    (1, 1, 1, 8, 8), (17, 4, 2, 64, 64), (7, 9, 3, 64, 32), (5, 2, 2, 128, 96),
])
def test_rotary_matches_complex_rotation(is_neox, tokens, heads_q, heads_kv, head_dim,
                                         rotary_dim):
    cache = reference.rotary_cos_sin_cache(300, rotary_dim)
    positions = torch.randint(0, 300, (tokens,))
    q = torch.randn(tokens, heads_q, head_dim, dtype=torch.float64)
    k = torch.randn(tokens, heads_kv, head_dim, dtype=torch.float64)
    out_q, out_k = reference.rotary_embedding(positions, q, k, cache, is_neox)
    torch.testing.assert_close(out_q, complex_rotary(positions, q, cache, is_neox))
    torch.testing.assert_close(out_k, complex_rotary(positions, k, cache, is_neox))
    # Partial rotary leaves the tail bit-exact; rotation keeps each pair's norm.
    assert torch.equal(out_q[..., rotary_dim:], q[..., rotary_dim:])
    torch.testing.assert_close(out_q.norm(dim=-1), q.norm(dim=-1))


def test_rotary_styles_differ():
    cache = reference.rotary_cos_sin_cache(16, 8)
    q = torch.randn(4, 1, 8, dtype=torch.float64)
    positions = torch.arange(1, 5)
    neox, _ = reference.rotary_embedding(positions, q, q, cache, True)
    gptj, _ = reference.rotary_embedding(positions, q, q, cache, False)
    assert not torch.allclose(neox, gptj)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_low_precision(dtype, is_neox):
    cache = reference.rotary_cos_sin_cache(64, 64)
    positions = torch.randint(0, 64, (33,))
    q = torch.randn(33, 4, 64, dtype=dtype)
    k = torch.randn(33, 2, 64, dtype=dtype)
    out_q, _ = reference.rotary_embedding(positions, q, k, cache, is_neox)
    assert out_q.dtype == dtype
    # torch doing the same rotation in the input dtype.
    cos, sin = cache.to(dtype)[positions][:, None, :].chunk(2, dim=-1)
    first, second = pair_indices(64, is_neox)
    a, b = q[..., first], q[..., second]
    lowp = q.clone()
    lowp[..., first], lowp[..., second] = a * cos - b * sin, b * cos + a * sin
    assert_within_lowp_error(out_q, complex_rotary(positions, q, cache, is_neox), lowp)


@pytest.mark.parametrize("shape", [(1, 2), (17, 64), (2, 3, 258)])
def test_silu_and_mul_matches_naive(shape):
    x = torch.randn(shape, dtype=torch.float64) * 4
    inter = shape[-1] // 2
    gate, up = x[..., :inter], x[..., inter:]
    want = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(reference.silu_and_mul(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOWP)
def test_silu_and_mul_low_precision(dtype):
    x = torch.randn(65, 512, dtype=dtype) * 4
    out = reference.silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (65, 256)
    gate, up = x.double().chunk(2, dim=-1)
    lowp_gate, lowp_up = x.chunk(2, dim=-1)
    assert_within_lowp_error(out, gate * torch.sigmoid(gate) * up,
                             torch.nn.functional.silu(lowp_gate) * lowp_up)
