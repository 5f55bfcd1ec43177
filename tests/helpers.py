"""Tolerance rules and helpers shared by the kernel tests.

The rule for attention and GEMMs is flash-attn's: a kernel's max error against a high-precision
reference may be at most ``factor`` (2) times the error of the same computation done by torch
in the input dtype, plus a small absolute term. Elementwise ops computed in float32 and rounded
once (the glue ops) must agree with the reference to that one rounding:
``assert_matches_reference``. Also ``prefill_logits``, a prompt through ember's model alone.
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


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (or fp8) values as integers in which neighbouring representable values differ
    by 1 (sign-magnitude bits to two's complement; +0 and -0 both map to 0)."""
    signed, magnitude = {2: (torch.int16, 0x7FFF), 1: (torch.int8, 0x7F)}[t.element_size()]
    bits = t.view(signed).to(torch.int32)
    return torch.where(bits < 0, -(bits & magnitude), bits)


# Float32 rounding of O(1) intermediate terms (inputs are randn): where a rotary pair nearly
# cancels, this absolute error is many ulps of a tiny bf16/fp16 result, yet correct.
FLOAT32_NOISE = 1e-6
# Float32 results that differ by ~1e-7 relative (reduction order, FMA, approximate exp and
# rsqrt on the GPU) round to different fp16/bf16 values for well under 0.1% of elements;
# rounding at a different point than the reference (e.g. normalising the unrounded residual
# sum, or rounding x * inv_rms before the weight) changes a fifth to a quarter of them.
MAX_OFF_BY_ONE_FRACTION = 0.01


def assert_matches_reference(out, ref, name="out"):
    """``out`` agrees with the reference to one final rounding: fp32 outputs within a few 1e-6
    relative; fp16/bf16 (and fp8) outputs within 1 ulp of their dtype (or FLOAT32_NOISE), and
    off by that ulp for at most MAX_OFF_BY_ONE_FRACTION of the elements."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{name}: got {tuple(out.shape)} {out.dtype}, want {tuple(ref.shape)} {ref.dtype}")
    assert not out.float().isnan().any(), f"{name} has NaNs (unwritten or broken elements)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=5e-6, atol=FLOAT32_NOISE, msg=name)
        return
    ulps = (ordered_bits(out) - ordered_bits(ref)).abs()
    bad = (ulps > 1) & ((out.float() - ref.float()).abs() > FLOAT32_NOISE)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} elements differ from the reference by "
                             f"more than 1 ulp, e.g. at {list(i)}: {out[i].float().item()} vs "
                             f"{ref[i].float().item()} ({int(ulps[i])} ulps)")
    off = int((ulps > 0).sum())
    allowed = 4 + MAX_OFF_BY_ONE_FRACTION * out.numel()
    assert off <= allowed, (f"{name}: {off} of {out.numel()} elements differ from the reference "
                            f"(at most {allowed:.0f} may, by 1 ulp): rounding at another point?")


def assert_unchanged(inputs, originals):
    for name, tensor in inputs.items():
        assert torch.equal(tensor, originals[name]), f"the op modified its input {name}"


def prefill_logits(model, ids: list, caches: list | None = None) -> torch.Tensor:
    """Logits of every prompt position through ember's model, as one chunk written into
    ``caches`` (per layer KVCaches of at least ``ceil(len(ids) / 16)`` blocks of 16; by default
    fresh ones in the model's dtype): token t goes to slot t."""
    from ember.engine.model_runner import allocate_kv_cache
    from ember.models.attention import AttentionMetadata

    device = model.embed_tokens.weight.device
    blocks = -(-len(ids) // 16)
    if caches is None:
        caches = allocate_kv_cache(model, blocks, 16, device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(len(ids), device=device), chunks=[(0, len(ids), len(ids))],
        chunk_block_table=torch.arange(blocks, dtype=torch.int32, device=device)[None])
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                       meta, caches)
        return model.compute_logits(hidden)
