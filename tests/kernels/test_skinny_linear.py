"""skinny_linear (``x @ weight^T + bias`` for 1..16 rows) on every backend against the torch
reference.

Tolerance: the GEMM rule of DESIGN §4 (helpers.assert_within_lowp_error): the error against a
float64 product of the same inputs is at most twice that of torch's own linear in the input
dtype, plus a small absolute term. Outputs start as NaN (poisoned_outputs), so a row or column
the kernel skips shows. The torch backend runs on CPU with the smaller shapes; the CUDA kernel
runs the whole grid on a GPU.
"""

import pytest
import torch
from helpers import assert_matches_reference, assert_unchanged, assert_within_lowp_error

import ember
from ember.ops import reference

DTYPES = [torch.float16, torch.bfloat16]
ROWS = [1, 2, 3, 5, 8, 13, 16]
# N: one row, a tail of 7, SmolLM2's widths (576, 960), one that no tile divides, a QKV width.
NS = [1, 7, 576, 960, 1000, 3072]
# K: one 16-byte vector, under one warp's 256 elements, SmolLM2 hidden, 193 vectors (no multiple
# of 32), Llama-1B hidden, Llama-1B intermediate (split-K inside the CTA for small N).
KS = [8, 64, 576, 1544, 2048, 8192]
# Shapes for the CUDA kernels' edges: 28 KB rows (the bulk-copy kernel's two-slot ring), rows
# over 48 KB (the register kernel for every M), weights larger than the SMs' rings (the
# streaming kernel for one row of x), one whose rows end 1 vector into their second chunk.
EXTRA_SHAPES = [(200, 14336), (1000, 24584), (20000, 2048), (4099, 2056)]
# The torch backend runs on the CPU in CI: keep its weights at most this many elements.
CPU_MAX_WEIGHT = 1 << 20


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def require_backend(backend):
    if backend not in ember.ops.available_backends("skinny_linear"):
        pytest.skip(f"skinny_linear has no usable {backend!r} backend here "
                    f"(available: {ember.ops.available_backends('skinny_linear')})")


def shape_cases(shapes):
    """(backend, device, n, k) params: every shape on the GPU, the small ones on the CPU."""
    params = []
    for n, k in shapes:
        params.append(pytest.param("cuda", "cuda", n, k, marks=pytest.mark.cuda,
                                   id=f"cuda-n{n}-k{k}"))
        if n * k <= CPU_MAX_WEIGHT:
            params.append(pytest.param("torch", "cpu", n, k, id=f"torch-cpu-n{n}-k{k}"))
    return params


def strided_rows(rows, cols, dtype, device, offset=8, pad=24):
    """Random ``[rows, cols]`` cut from a wider buffer: row stride ``cols + pad`` > cols, first
    element ``offset`` elements in (8 keeps 16-byte alignment, other offsets break it)."""
    buf = torch.randn(rows, cols + pad, dtype=dtype, device=device)
    return buf[:, offset:offset + cols]


def make_weight(n, k, dtype, device):
    # Scaled so that outputs are O(1) for every K.
    return (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)


def check(out, x, weight, bias, name="y"):
    """The GEMM rule against float64, with torch's linear in the input dtype as the yardstick."""
    ref = x.double() @ weight.double().T
    if bias is not None:
        ref = ref + bias.double()
    lowp = torch.nn.functional.linear(x, weight, bias)
    assert out.shape == lowp.shape and out.dtype == x.dtype, (
        f"{name}: got {tuple(out.shape)} {out.dtype}, want {tuple(lowp.shape)} {x.dtype}")
    assert_within_lowp_error(out, ref, lowp, name=name)


@pytest.mark.parametrize("backend,device,n,k",
                         shape_cases([(n, k) for n in NS for k in KS] + EXTRA_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_skinny_linear(backend, device, n, k, dtype, with_bias, poisoned_outputs):
    require_backend(backend)
    weight = make_weight(n, k, dtype, device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    for rows in ROWS:
        x = strided_rows(rows, k, dtype, device)
        inputs = dict(x=x, weight=weight) | ({"bias": bias} if with_bias else {})
        originals = {name: t.clone() for name, t in inputs.items()}
        # static_weight only changes when the kernel may start reading the weight.
        for static_weight in (False, True):
            out = ember.ops.skinny_linear(x, weight, bias, static_weight=static_weight,
                                          backend=backend)
            assert_unchanged(inputs, originals)
            check(out, x, weight, bias, name=f"y, M={rows}, static_weight={static_weight}")


# Layouts the CUDA wrapper must take: contiguous x; a row slice of a wider buffer whose rows are
# not 16-byte aligned (copied first); a weight view that starts off a 16-byte boundary (copied
# first); a bias view with a stride.
LAYOUTS = ["contiguous", "misaligned_x", "misaligned_weight", "strided_bias"]


@pytest.mark.parametrize("backend,device,n,k", shape_cases([(1000, 576)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skinny_linear_layouts(backend, device, n, k, dtype, layout, poisoned_outputs):
    require_backend(backend)
    weight = make_weight(n, k, dtype, device)
    bias = torch.randn(n, dtype=dtype, device=device)
    x = torch.randn(5, k, dtype=dtype, device=device)
    if layout == "misaligned_x":
        x = strided_rows(5, k, dtype, device, offset=3, pad=11)
    elif layout == "misaligned_weight":
        flat = torch.randn(n * k + 3, device=device).to(dtype)
        weight = flat[3:].view(n, k)
    elif layout == "strided_bias":
        bias = torch.randn(n, 2, dtype=dtype, device=device)[:, 1]
    out = ember.ops.skinny_linear(x, weight, bias, backend=backend)
    check(out, x, weight, bias)


# (N, K) of the down projections the fused prologue is for (SmolLM2, Llama-3.2-1B), plus a tail.
SILU_SHAPES = [(576, 1536), (2048, 8192), (7, 64), (1000, 1544), (1500, 4104)]


@pytest.mark.parametrize("backend,device,n,k", shape_cases(SILU_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_skinny_linear_silu_and_mul(backend, device, n, k, dtype, with_bias, poisoned_outputs):
    """The fused prologue rounds silu(gate) * up to the dtype where silu_and_mul does, so it
    matches the unfused pair to the last bit but for rare float32 ties."""
    require_backend(backend)
    weight = make_weight(n, k, dtype, device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    for rows in ROWS:
        x = strided_rows(rows, 2 * k, dtype, device)
        fused = ember.ops.skinny_linear(x, weight, bias, activation="silu_and_mul",
                                        backend=backend)
        hidden = reference.silu_and_mul(x)
        check(fused, hidden, weight, bias, name=f"y, M={rows}")
        unfused = ember.ops.skinny_linear(ember.ops.silu_and_mul(x, backend=backend), weight,
                                          bias, backend=backend)
        assert_matches_reference(fused, unfused, name=f"fused vs unfused, M={rows}")


@pytest.mark.cuda
def test_skinny_linear_captures_in_cuda_graph_without_sync():
    """The CUDA op launches on the current stream with no host sync, so a graph captured on a
    side stream replays it on whatever x holds then."""
    require_backend("cuda")
    dtype = torch.bfloat16
    x = torch.randn(3, 2048, dtype=dtype, device="cuda")
    weight = make_weight(2048, 2048, dtype, "cuda")
    bias = torch.randn(2048, dtype=dtype, device="cuda")
    gate_up = torch.randn(3, 2 * 2048, dtype=dtype, device="cuda")

    def step():
        return (ember.ops.skinny_linear(x, weight, bias, backend="cuda"),
                ember.ops.skinny_linear(gate_up, weight, activation="silu_and_mul",
                                        backend="cuda"))

    step()  # eager warm-up: loads the extension, caches the SM count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        gate_up.copy_(torch.randn_like(gate_up))
        graph.replay()
        for got, want in zip(captured, step(), strict=True):
            assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("width", [2048, 4096])
def test_skinny_linear_chain_reads_what_the_previous_kernel_wrote(rows, width):
    """Back-to-back launches with no sync between them, each input the previous output and each
    weight rewritten by a copy just before its GEMM: under programmatic dependent launch a
    kernel that read x, or a non-static weight, before waiting for its predecessor would see
    stale data. Repeated, since a race shows only some of the time. Widths: 8 MB weights (the
    bulk kernel up to 4 rows) and 32 MB (the streaming kernel at 1 row)."""
    require_backend("cuda")
    dtype, layers = torch.bfloat16, 6
    weights = [make_weight(width, width, dtype, "cuda") for _ in range(layers)]
    fresh = [make_weight(width, width, dtype, "cuda") for _ in range(layers)]
    for trial in range(5):
        x0 = torch.randn(rows, width, dtype=dtype, device="cuda")
        x, outs = x0, []
        for layer in range(layers):
            # Even trials rewrite the weights (with static_weight=False, as the promise
            # requires); odd ones keep them and take the static path.
            static = trial % 2 == 1
            if not static:
                weights[layer].copy_(fresh[layer] if trial % 4 == 0 else -fresh[layer])
            x = ember.ops.skinny_linear(x, weights[layer], static_weight=static,
                                        backend="cuda")
            outs.append(x)
        torch.cuda.synchronize()
        x = x0
        for layer in range(layers):
            want = reference.skinny_linear(x, weights[layer])
            assert_matches_reference(outs[layer], want, name=f"trial {trial}, layer {layer}")
            x = outs[layer]  # each layer checked on the input it actually got


def test_custom_op_registration():
    """Schema and fake implementation agree: torch.compile / CUDA-graph ready."""
    x = torch.randn(3, 64, dtype=torch.float16)
    weight = torch.randn(24, 64, dtype=torch.float16)
    bias = torch.randn(24, dtype=torch.float16)
    gate_up = torch.randn(2, 128, dtype=torch.bfloat16)
    for args in ((x, weight, bias, None), (gate_up, weight.bfloat16(), None, "silu_and_mul")):
        torch.library.opcheck(torch.ops.ember.skinny_linear.default, (*args, False, "torch"),
                              test_utils=("test_schema", "test_faketensor"))


def test_public_op_dispatches_to_reference():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.randn(10, 64, dtype=torch.bfloat16)
    bias = torch.randn(10, dtype=torch.bfloat16)
    assert "skinny_linear" in ember.ops.__all__
    assert "torch" in ember.ops.available_backends("skinny_linear")
    for backend in ("torch", "auto"):
        assert torch.equal(ember.ops.skinny_linear(x, weight, bias, backend=backend),
                           reference.skinny_linear(x, weight, bias))


# ---- bad input --------------------------------------------------------------------------------

META = torch.device("meta")
HALF = torch.float16


def valid_args():
    return dict(x=torch.randn(3, 64, dtype=HALF), weight=torch.randn(10, 64, dtype=HALF),
                bias=torch.randn(10, dtype=HALF))


ERROR_CASES = [
    # (change to a valid call, error, match)
    (dict(x=torch.randn(0, 64, dtype=HALF)), ValueError, "x must have 1 to 16 rows"),
    (dict(x=torch.randn(17, 64, dtype=HALF)), ValueError, "x must have 1 to 16 rows"),
    (dict(x=torch.randn(3, 2, 64, dtype=HALF)), ValueError, "x must have 2 dims"),
    (dict(x=torch.randn(3, 48, dtype=HALF)), ValueError, r"x must have shape \(\*, 64\)"),
    (dict(x=torch.randn(64, 3, dtype=HALF).T), ValueError, "x must have a contiguous last"),
    (dict(x=torch.randn(3, 64)), TypeError, "x must have dtype"),
    (dict(x=torch.randn(3, 12, dtype=HALF), weight=torch.randn(10, 12, dtype=HALF)),
     ValueError, "weight must have K .* a positive multiple of 8"),
    (dict(weight=torch.randn(10, 64, dtype=torch.bfloat16)), ValueError,
     r"dtype of weight \(torch.bfloat16\) must match x \(torch.float16\)"),
    (dict(weight=torch.randn(64, 10, dtype=HALF).T), ValueError, "weight must be contiguous"),
    (dict(weight=torch.randn(10, 64, dtype=HALF, device=META)), ValueError,
     "weight must be on cpu"),
    (dict(weight=torch.randn(10, 64, 1, dtype=HALF)), ValueError, "weight must have 2 dims"),
    (dict(bias=torch.randn(9, dtype=HALF)), ValueError, r"bias must have shape \(10,\)"),
    (dict(bias=torch.randn(10, dtype=torch.bfloat16)), ValueError,
     r"dtype of bias \(torch.bfloat16\) must match x"),
    (dict(bias=torch.randn(10, dtype=HALF, device=META)), ValueError, "bias must be on cpu"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(activation="silu_and_mul"), ValueError,
     r"x must have shape \(\*, 128\) to match the weight's 2K"),
    (dict(backend="triton"), ValueError, "backend 'triton' is not implemented"),
]


@pytest.mark.parametrize("change,error,match", ERROR_CASES,
                         ids=[f"{i}-{'-'.join(c[0])}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input_errors(change, error, match):
    kwargs = valid_args() | change
    with pytest.raises(error, match=f"skinny_linear: {match}"):
        ember.ops.skinny_linear(**kwargs)
