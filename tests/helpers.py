"""Tolerance rules and helpers shared by the kernel tests.

The rule for attention and GEMMs is flash-attn's: a kernel's max error against a high-precision
reference may be at most ``factor`` (2) times the error of the same computation done by torch
in the input dtype, plus a small absolute term.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_ON_CPU = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"

# NaN marks elements a kernel failed to write.
POISON = float("nan")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` whose every element is NaN (or 0x7f.. for integers)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, POISON)
    return torch.full_like(t, torch.iinfo(t.dtype).max)


def assert_within_lowp_error(out, ref, lowp, *, factor=2.0, atol=1e-5, name="out"):
    """flash-attn's rule: max|out - ref| <= factor * max|lowp - ref| + atol.

    out: the kernel's result; ref: reference in float32/float64 on upcast inputs; lowp: the
    same computation done by torch in the input dtype.
    """
    out, ref, lowp = out.double(), ref.double(), lowp.double()
    assert not torch.isnan(out).any(), f"{name} has NaNs (unwritten or broken elements)"
    err = (out - ref).abs().max().item()
    base = (lowp - ref).abs().max().item()
    assert err <= factor * base + atol, (
        f"{name}: max error {err:.3e} > {factor} x torch low-precision error {base:.3e} + {atol:g}")


def backends_to_test(op: str, cpu_backends=("torch", "triton"), gpu_backends=("cuda", "triton")):
    """pytest params: on a GPU box the GPU backends (marked cuda), otherwise the CPU ones."""
    params = []
    for b in cpu_backends:
        if b == "triton" and not TRITON_ON_CPU:
            continue
        params.append(pytest.param(b, "cpu", id=f"{b}-cpu"))
    for b in gpu_backends:
        params.append(pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda))
    return params
