"""Weight-only quantized GEMM kernels (w8a16_gemm, w4a16_gemm) against the float64 reference,
with flash-attn's tolerance rule: the error may be at most twice that of the same product done
by torch in the input dtype on the dequantised weight. CPU: the Triton interpreter in
fp16/fp32; GPU: the Triton kernels in fp16/bf16 (marked cuda)."""

import pytest
import torch
from helpers import assert_within_lowp_error, backends_to_test

import ember
from ember.ops import reference

# (M, N, K): a decode row, odd row and column counts, K across several groups and tiles.
SHAPES = [(1, 130, 256), (17, 96, 512), (70, 200, 128)]


def dtypes_for(device):
    return [torch.float16, torch.float32] if device == "cpu" else [torch.float16,
                                                                   torch.bfloat16]


def make(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g).to(device)
    return x, w


def check(out, x, w_dequant, ref, name):
    lowp = x @ w_dequant.to(x.dtype).T
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert_within_lowp_error(out, ref, lowp, atol=1e-5 * max(1.0, ref.abs().max().item()),
                             name=name)


@pytest.mark.parametrize("backend,device", backends_to_test(
    "w8a16_gemm", cpu_backends=("triton",), gpu_backends=("triton",)))
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_w8a16_gemm_matches_reference(backend, device, shape, poisoned_outputs):
    m, n, k = shape
    for dtype in dtypes_for(device):
        x, w = make(m, n, k, dtype, device, seed=m)
        qweight, scale = reference.quantize_int8(w)
        out = ember.ops.w8a16_gemm(x, qweight, scale, backend=backend)
        check(out, x, reference.dequantize_int8(qweight, scale),
              reference.w8a16_gemm(x.double(), qweight, scale), f"w8a16 {dtype}")


@pytest.mark.parametrize("backend,device", backends_to_test(
    "w4a16_gemm", cpu_backends=("triton",), gpu_backends=("triton",)))
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("group_size", [32, 128])
def test_w4a16_gemm_matches_reference(backend, device, shape, group_size, poisoned_outputs):
    m, n, k = shape
    for dtype in dtypes_for(device):
        x, w = make(m, n, k, dtype, device, seed=m + group_size)
        packed, scales, zeros = reference.quantize_int4(w, group_size)
        out = ember.ops.w4a16_gemm(x, packed, scales, zeros, group_size, backend=backend)
        check(out, x, reference.dequantize_int4(packed, scales, zeros, group_size),
              reference.w4a16_gemm(x.double(), packed, scales, zeros, group_size),
              f"w4a16 g{group_size} {dtype}")


@pytest.mark.parametrize("backend,device", backends_to_test(
    "w4a16_gemm", cpu_backends=("triton",), gpu_backends=("triton",)))
def test_w4a16_gemm_group_scales_and_zeros_are_per_group(backend, device):
    """Weights whose groups have very different ranges (a scale 1000x another, zero points at
    both ends): a kernel applying one group's scale or zero to another's columns is far off."""
    k, group = 128, 32
    w = torch.randn(8, k)
    w[:, :group] *= 1000.0
    w[:, group:2 * group] = w[:, group:2 * group].abs()   # zero point 0
    w[:, 2 * group:3 * group] = -w[:, 2 * group:3 * group].abs()  # zero point 15
    packed, scales, zeros = reference.quantize_int4(w.to(device), group)
    x = torch.randn(3, k).to(device=device, dtype=torch.float16)
    out = ember.ops.w4a16_gemm(x, packed, scales, zeros, group, backend=backend)
    ref = reference.w4a16_gemm(x.double(), packed, scales, zeros, group)
    torch.testing.assert_close(out.double(), ref.double(), rtol=2e-3, atol=1e-2)
