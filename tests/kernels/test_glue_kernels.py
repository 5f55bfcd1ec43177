"""Engine glue ops (rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul) on every
backend against the torch reference.

These are elementwise ops (plus one row reduction) computed in float32 and rounded once, so
the kernels must agree with the reference to float32 rounding: fp32 outputs within a few
1e-6 relative, fp16/bf16 outputs within 1 ulp of the output dtype, and fused_add_rms_norm's
rounded residual sum bit for bit. Triton runs on CPU through the interpreter, whose bfloat16
support is unreliable, so bf16 Triton is covered on the GPU only.
"""

import pytest
import torch
from helpers import assert_matches_reference, assert_unchanged, backends_to_test

import ember
from ember.ops import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def require_backend(op, backend, device, dtype=None):
    """Skip, with the reason, where ``backend`` cannot run ``op`` here."""
    if backend not in ember.ops.available_backends(op):
        pytest.skip(f"{op} has no usable {backend!r} backend here "
                    f"(available: {ember.ops.available_backends(op)})")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter handles bfloat16 unreliably; bf16 Triton runs "
                    "on the GPU")


def randn_rows(rows, hidden, dtype, device, layout="contiguous"):
    """Random ``[rows, hidden]``-like input in one of the layouts the ops must accept.

    contiguous: ``[rows, hidden]``; row_strided: a column slice of a wider buffer (row stride
    ``hidden + 24``); strided_3d: ``[rows, 2, hidden]`` whose leading dims do not flatten by
    strides (the launcher must copy or stride correctly); vector: ``[hidden]``.
    """
    if layout == "contiguous":
        return torch.randn(rows, hidden, dtype=dtype, device=device)
    if layout == "row_strided":
        return torch.randn(rows, hidden + 24, dtype=dtype, device=device)[:, 8:8 + hidden]
    if layout == "strided_3d":
        return torch.randn(rows, 4, hidden, dtype=dtype, device=device)[:, ::2]
    if layout == "vector":
        return torch.randn(hidden, dtype=dtype, device=device)
    raise ValueError(layout)


# Hidden sizes: tiny, SmolLM2 (576), not a multiple of 16, a power of two, a multiple of 16
# that is not (5120), and one past the kernel's in-register row block (two-pass path).
NORM_SHAPES = [(1, 64), (3, 576), (257, 1000), (3, 2048), (1, 5120), (2, 20000)]
LAYOUTS = ["row_strided", "strided_3d", "vector"]


# ---- rms_norm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends_to_test("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
def test_rms_norm(backend, device, dtype, rows, hidden):
    require_backend("rms_norm", backend, device, dtype)
    x = randn_rows(rows, hidden, dtype, device) * 3
    weight = torch.randn(hidden, dtype=dtype, device=device)
    inputs = dict(x=x, weight=weight)
    originals = {name: t.clone() for name, t in inputs.items()}
    out = ember.ops.rms_norm(x, weight, 1e-5, backend=backend)
    assert_unchanged(inputs, originals)
    assert_matches_reference(out, reference.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("backend,device", backends_to_test("rms_norm"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rms_norm_layouts(backend, device, dtype, layout):
    require_backend("rms_norm", backend, device, dtype)
    x = randn_rows(5, 1000, dtype, device, layout)
    weight = torch.randn(1000, dtype=dtype, device=device)
    out = ember.ops.rms_norm(x, weight, backend=backend)
    assert_matches_reference(out, reference.rms_norm(x, weight))


# ---- fused_add_rms_norm -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends_to_test("fused_add_rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
def test_fused_add_rms_norm(backend, device, dtype, rows, hidden):
    require_backend("fused_add_rms_norm", backend, device, dtype)
    x = randn_rows(rows, hidden, dtype, device)
    residual = randn_rows(rows, hidden, dtype, device) * 4
    weight = torch.randn(hidden, dtype=dtype, device=device)
    inputs = dict(x=x, residual=residual, weight=weight)
    originals = {name: t.clone() for name, t in inputs.items()}
    out, new_residual = ember.ops.fused_add_rms_norm(x, residual, weight, 1e-6, backend=backend)
    assert_unchanged(inputs, originals)
    want_out, want_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, want_residual), "the rounded residual sum must be exact"
    assert_matches_reference(out, want_out)


@pytest.mark.parametrize("backend,device", backends_to_test("fused_add_rms_norm"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_fused_add_rms_norm_normalises_the_rounded_sum(backend, device, dtype):
    """Large x plus small residual: every sum has bits below x's precision, so normalising
    the float32 sum instead of the rounded one would move many outputs by an ulp."""
    require_backend("fused_add_rms_norm", backend, device, dtype)
    x = torch.randn(16, 1024, dtype=dtype, device=device) * 1000
    residual = torch.randn(16, 1024, dtype=dtype, device=device)
    weight = torch.randn(1024, dtype=dtype, device=device)
    out, new_residual = ember.ops.fused_add_rms_norm(x, residual, weight, backend=backend)
    want_out, want_residual = reference.fused_add_rms_norm(x, residual, weight)
    unrounded = reference.rms_norm(x.float() + residual.float(), weight.float()).to(dtype)
    assert (unrounded != want_out).float().mean() > 0.1, "inputs do not tell the two apart"
    assert torch.equal(new_residual, want_residual), "the rounded residual sum must be exact"
    assert_matches_reference(out, want_out)


@pytest.mark.parametrize("backend,device", backends_to_test("fused_add_rms_norm"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_add_rms_norm_layouts(backend, device, dtype, layout):
    require_backend("fused_add_rms_norm", backend, device, dtype)
    x = randn_rows(5, 1000, dtype, device, layout)
    residual = torch.randn(x.shape, dtype=dtype, device=device)  # contiguous, unlike x
    weight = torch.randn(1000, dtype=dtype, device=device)
    out, new_residual = ember.ops.fused_add_rms_norm(x, residual, weight, backend=backend)
    want_out, want_residual = reference.fused_add_rms_norm(x, residual, weight)
    assert torch.equal(new_residual, want_residual), "the rounded residual sum must be exact"
    assert_matches_reference(out, want_out)


# ---- rotary_embedding -------------------------------------------------------------------------

def fused_qkv_slices(tokens, heads_q, heads_kv, head_dim, dtype, device):
    """q and k sliced out of one ``[T, heads_q + 2 heads_kv, D]`` projection: token strides
    that are not their own sizes, as the engine passes them."""
    qkv = torch.randn(tokens, heads_q + 2 * heads_kv, head_dim, dtype=dtype, device=device)
    return qkv[:, :heads_q], qkv[:, heads_q:heads_q + heads_kv]


def check_rotary(backend, positions, q, k, cache, is_neox):
    inputs = dict(positions=positions, q=q, k=k, cos_sin_cache=cache)
    originals = {name: t.clone() for name, t in inputs.items()}
    out_q, out_k = ember.ops.rotary_embedding(positions, q, k, cache, is_neox, backend=backend)
    assert_unchanged(inputs, originals)
    want_q, want_k = reference.rotary_embedding(positions, q, k, cache, is_neox)
    assert_matches_reference(out_q, want_q, "q")
    assert_matches_reference(out_k, want_k, "k")


# (tokens, heads_q, heads_kv, head_dim, rotary_dim): Llama decode, GQA 9:3 with partial rotary,
# a non-power-of-two head dim with rotary_dim 20 (StableLM-style), and GQA 28:4 at head dim 96.
ROTARY_SHAPES = [(1, 32, 8, 128, 128), (3, 9, 3, 64, 32), (17, 4, 4, 80, 20),
                 (7, 28, 4, 96, 96)]


@pytest.mark.parametrize("backend,device", backends_to_test("rotary_embedding"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("tokens,heads_q,heads_kv,head_dim,rotary_dim", ROTARY_SHAPES)
def test_rotary_embedding(backend, device, dtype, is_neox, tokens, heads_q, heads_kv, head_dim,
                          rotary_dim):
    require_backend("rotary_embedding", backend, device, dtype)
    q, k = fused_qkv_slices(tokens, heads_q, heads_kv, head_dim, dtype, device)
    cache = reference.rotary_cos_sin_cache(4096, rotary_dim).to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    check_rotary(backend, positions, q, k, cache, is_neox)


@pytest.mark.parametrize("backend,device", backends_to_test("rotary_embedding"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64], ids=dtype_id)
@pytest.mark.parametrize("cache_in_q_dtype", [False, True], ids=["fp32_cache", "q_dtype_cache"])
def test_rotary_positions_and_cache_dtypes(backend, device, dtype, positions_dtype,
                                           cache_in_q_dtype):
    require_backend("rotary_embedding", backend, device, dtype)
    # Contiguous q and k; both pairings over the four cases, to keep the count down. The CPU
    # interpreter runs programs one at a time, so fewer tokens there.
    tokens = 257 if device == "cuda" else 33
    q = torch.randn(tokens, 9, 64, dtype=dtype, device=device)
    k = torch.randn(tokens, 3, 64, dtype=dtype, device=device)
    cache = reference.rotary_cos_sin_cache(300, 64).to(device)
    if cache_in_q_dtype:
        cache = cache.to(dtype)
    positions = torch.randint(0, 300, (tokens,), device=device, dtype=positions_dtype)
    check_rotary(backend, positions, q, k, cache, is_neox=positions_dtype == torch.int64)


@pytest.mark.parametrize("backend,device", backends_to_test("rotary_embedding", cpu_backends=()))
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64], ids=dtype_id)
def test_rotary_clips_out_of_range_positions(backend, device, positions_dtype):
    """On a GPU positions are not checked on the host (no sync): they are clipped to the cache
    rows, never read out of bounds. (On CPU the public op rejects them.)"""
    require_backend("rotary_embedding", backend, device)
    q, k = fused_qkv_slices(6, 8, 2, 128, torch.float16, device)
    cache = reference.rotary_cos_sin_cache(100, 128).to(device)
    positions = torch.tensor([-5, 0, 99, 100, 2 ** 31 - 1, -(2 ** 31)], dtype=positions_dtype,
                             device=device)
    check_rotary(backend, positions, q, k, cache, is_neox=True)


# ---- silu_and_mul -----------------------------------------------------------------------------

# (rows, intermediate size I); x is [rows, 2I]. 14336 (Llama-3 8B) spans several programs.
SILU_SHAPES = [(1, 32), (3, 288), (257, 500), (3, 2560), (2, 14336)]


# The interpreter's numpy exp warns where exp(-gate) overflows to inf, as it should.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend,device", backends_to_test("silu_and_mul"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,inter", SILU_SHAPES)
def test_silu_and_mul(backend, device, dtype, rows, inter):
    require_backend("silu_and_mul", backend, device, dtype)
    x = randn_rows(rows, 2 * inter, dtype, device) * 3
    # Gates far out on both sides: exp(-gate) overflows to inf (silu -> -0) or vanishes.
    x[0, :2] = torch.tensor([-100.0, 60.0], dtype=dtype)
    original = x.clone()
    out = ember.ops.silu_and_mul(x, backend=backend)
    assert torch.equal(x, original), "the op modified its input x"
    assert_matches_reference(out, reference.silu_and_mul(x))


@pytest.mark.parametrize("backend,device", backends_to_test("silu_and_mul"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_silu_and_mul_layouts(backend, device, dtype, layout):
    require_backend("silu_and_mul", backend, device, dtype)
    x = randn_rows(5, 2 * 500, dtype, device, layout)
    out = ember.ops.silu_and_mul(x, backend=backend)
    assert_matches_reference(out, reference.silu_and_mul(x))


# ---- empty inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends_to_test("rms_norm"))
@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_zero_rows(backend, device, leading):
    """No rows: empty outputs of the right shapes, and no launch that could fault."""
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"):
        require_backend(op, backend, device)
    dtype = torch.float16
    x = torch.randn(*leading, 64, dtype=dtype, device=device)
    weight = torch.randn(64, dtype=dtype, device=device)
    assert ember.ops.rms_norm(x, weight, backend=backend).shape == x.shape
    out, new_residual = ember.ops.fused_add_rms_norm(x, x.clone(), weight, backend=backend)
    assert out.shape == new_residual.shape == x.shape
    assert ember.ops.silu_and_mul(x, backend=backend).shape == (*leading, 32)
    q = torch.randn(0, 4, 64, dtype=dtype, device=device)
    k = torch.randn(0, 2, 64, dtype=dtype, device=device)
    positions = torch.zeros(0, dtype=torch.int64, device=device)
    cache = reference.rotary_cos_sin_cache(16, 64).to(device)
    out_q, out_k = ember.ops.rotary_embedding(positions, q, k, cache, backend=backend)
    assert out_q.shape == q.shape and out_k.shape == k.shape
