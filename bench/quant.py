"""quant: weight-only quantized GEMMs (``w8a16_gemm``, ``w4a16_gemm``) against bf16 cuBLAS and
torch's int4 tinygemm.

Llama-3-8B's projection shapes (N x K: QKV 6144 x 4096, gate/up 28672 x 4096, down 4096 x 14336)
at a decode step's rows (1, 16) and a prefill chunk's (4096), bf16 activations. At a few rows
the product reads the weight and little else: memory-bound, judged on TB/s of the bytes that
must move (int8 codes + a float32 scale per row; int4 codes + float32 scale and uint8 zero per
group of 128; bf16 for the cuBLAS anchor), and int8/int4 should approach 2x/4x bf16's speed.
At 4096 rows it is compute-bound (TFLOP/s = 2MNK). Every output is compared with the float32
reference of the same quantized weight before timing (``check``: relative error).
"""

import torch

from bench import anchors, harness
from bench.harness import ember_backends, relative_error, suite

SHAPES = ((6144, 4096), (28672, 4096), (4096, 14336))  # (N, K)
ROWS = (1, 16, 4096)
QUICK_ROWS = (1, 4096)
GROUP = 128
DTYPE = torch.bfloat16
CHECK_TOLERANCE = 2e-2


def weight_bytes(n: int, k: int, method: str) -> int:
    """Bytes of one weight as each provider reads it."""
    if method == "int8":
        return n * k + 4 * n
    if method == "int4":
        return n * k // 2 + 5 * n * (k // GROUP)
    return 2 * n * k


def gemm_bytes(m: int, n: int, k: int, method: str) -> float:
    return float(weight_bytes(n, k, method) + 2 * m * k + 2 * m * n)


def _make_inputs(m, n, k):
    """One call's arguments of every provider: x, the int8 and int4 quantizations of a random
    weight, the bf16 weight (transposed for cuBLAS) and tinygemm's packing of the int4 one."""
    from ember.ops import reference

    dev = harness.DEVICE
    x = torch.randn(m, k, device=dev, dtype=DTYPE)
    w = torch.randn(n, k, device=dev) * k ** -0.5
    qweight, scale = reference.quantize_int8(w)
    packed, scales, zeros = reference.quantize_int4(w, GROUP)
    tiny = None
    try:
        # tinygemm reads (q - 8) * scale + zero: q = our code, zero = (8 - our zero) * scale
        # is our (code - zero) * scale, but for the bf16 rounding of its scales and zeros.
        tiny = anchors.int4_tinygemm_pack(reference.unpack_int4(packed), scales,
                                          (8 - zeros.float()) * scales)
    except (RuntimeError, NotImplementedError):
        pass  # no tinygemm kernel here (CPU)
    return x, qweight, scale, packed, scales, zeros, w.to(DTYPE).t(), tiny


def _providers(backends, tinygemm: bool):
    """name -> (weights, fn(*inputs)); the tinygemm anchor where its packing worked."""
    from ember.ops import _registry

    providers = {}
    for backend in backends:
        w8 = _registry.implementation("w8a16_gemm", backend)
        w4 = _registry.implementation("w4a16_gemm", backend)
        providers[f"ember-{backend}-int8"] = (
            "int8", lambda x, q, s, *_, f=w8: f(x, q, s))
        providers[f"ember-{backend}-int4"] = (
            "int4", lambda x, _q, _s, p, sc, z, *_, f=w4: f(x, p, sc, z, GROUP))
    providers["cublas-bf16"] = ("bf16", lambda x, *rest: anchors.cublas_matmul(x, rest[5]))
    if tinygemm:
        providers["torch-tinygemm-int4"] = (
            "int4", lambda x, *rest: anchors.int4_tinygemm_mm(x, *rest[6], GROUP))
    return providers


def _case(ctx, backends, m, n, k):
    from ember.ops import reference

    # A copy holds about 4 n k bytes (int8, int4, bf16 and tinygemm weights), of which the
    # int4 weight is an eighth: 16 L2s of copies keep every provider's own bytes past 2 L2s.
    rot = harness.Rotation(lambda: _make_inputs(m, n, k), min_bytes=16 * harness.l2_cache_bytes())
    x, qweight, scale, packed, scales, zeros, w_t, tiny = rot.inputs[0]
    providers = _providers(backends, tinygemm=tiny is not None)
    if tiny is None:
        ctx.note("torch-tinygemm-int4 skipped: torch has no int4 packing here")
    want = {"int8": reference.w8a16_gemm(x, qweight, scale),
            "int4": reference.w4a16_gemm(x, packed, scales, zeros, GROUP),
            "bf16": (x.float() @ w_t.float()).to(DTYPE)}
    extras = {}
    for name, (method, fn) in providers.items():
        err = ctx.guarded(f"{name} check ({m}x{n}x{k})",
                          lambda f=fn, ref=want[method]: relative_error(f(*rot.inputs[0]), ref))
        extras[name] = {"weights": method, **({"check": err} if err is not None else {})}
        if err is not None and err > CHECK_TOLERANCE:
            ctx.note(f"{name} differs from its reference at {m}x{n}x{k} (relative error "
                     f"{err:.2e}): its numbers are void")
    for name, (method, fn) in providers.items():  # one row each: the bytes differ
        ctx.bench(op="weight_only_gemm", params={"m": m, "n": n, "k": k},
                  flops=2.0 * m * n * k, bytes=gemm_bytes(m, n, k, method),
                  providers={name: rot.bind(fn)}, extras={name: extras[name]})


@suite("quant", order=45, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
def run(ctx):
    backends, notes = ember_backends("w8a16_gemm", wanted=("triton",))
    for message in notes:
        ctx.note(message)
    for n, k in SHAPES:
        for m in QUICK_ROWS if ctx.quick else ROWS:
            _case(ctx, backends, m, n, k)
