"""Probe (not a suite, not run by CI): ember.ops.skinny_linear against cuBLAS on decode GEMMs.

    python -m bench.skinny_gemm_probe OUT.json

On a GPU, for M in {1, 4, 8} rows and the (N, K) weights of SmolLM2-135M and Llama-3.2-1B (and
the 1B's LM head), times ember's CUDA kernel ("linear"; "static" with ``static_weight=True``, which
lets each call start streaming its weight while the previous call runs, as in a model) and
torch.nn.functional.linear (cuBLAS) in bf16, and prints microseconds, TB/s of weight bytes
(N * K * 2 / time: the weight is the traffic that matters; x and y are a few KB) and cuBLAS time
/ ember time. For the down projections (K = 1536, 8192) it also times the fused silu_and_mul
prologue ("fused", static) and ember's silu_and_mul kernel then skinny_linear ("unfused"); the
cuBLAS column of those rows is ember's silu_and_mul then cuBLAS. Run it with EMBER_PDL=0 too to
see what programmatic dependent launch is worth.

Timing: triton.testing.do_bench_cudagraph (median) on a CUDA graph whose every call runs the op
once on each of several weight copies, together at least 4x the L2 cache, so every call reads its
weight from DRAM as a decode step does; the time per op is the graph time over the copies. x
stays the same (hot in L2, like an activation). Each result is checked against a float64
product with the GEMM rule of tests/helpers.py before it is timed.
"""

import json
import math
import sys

import torch

DTYPE = torch.bfloat16
ROWS = (1, 4, 8)
# (N, K): SmolLM2-135M's fused QKV, O, fused gate_up and down; then Llama-3.2-1B's.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (3072, 2048), (2048, 2048),
          (16384, 2048), (2048, 8192), (128256, 2048)]
DOWN_K = (1536, 8192)
ROTATE_L2_MULTIPLE = 4
REP_MS = 100


def weight_copies(n: int, k: int, l2_bytes: int) -> list[torch.Tensor]:
    """Enough copies of a random [n, k] weight to hold ROTATE_L2_MULTIPLE x the L2 cache."""
    nbytes = n * k * DTYPE.itemsize
    count = max(2, math.ceil(ROTATE_L2_MULTIPLE * l2_bytes / nbytes))
    return [(torch.randn(n, k, device="cuda") * k ** -0.5).to(DTYPE) for _ in range(count)]


def time_us(fn, x, weights) -> float:
    """Median microseconds of one ``fn(x, w)``, over a graph that calls it on every copy."""
    from triton.testing import do_bench_cudagraph

    def all_copies():
        for w in weights:
            fn(x, w)

    ms = do_bench_cudagraph(all_copies, rep=REP_MS, return_mode="median")
    return ms * 1e3 / len(weights)


def check(out, x, w) -> str:
    """The GEMM rule of DESIGN §4 against float64, cuBLAS in bf16 as the yardstick."""
    ref = x.double() @ w.double().T
    err = (out.double() - ref).abs().max().item()
    base = (torch.nn.functional.linear(x, w).double() - ref).abs().max().item()
    ok = not out.isnan().any() and err <= 2 * base + 1e-5
    return "ok" if ok else f"MISMATCH (err {err:.2e}, cuBLAS {base:.2e})"


def copy_tbps() -> float:
    """Device copy bandwidth (read + write of 1 GiB), the roofline of a weight stream."""
    from bench.harness import time_ms

    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def row(variant, m, n, k, ember_us, cublas_us, status, copy):
    weight_tb = n * k * DTYPE.itemsize / 1e12
    return {
        "variant": variant, "m": m, "n": n, "k": k,
        "ember_us": ember_us, "cublas_us": cublas_us,
        "ember_tbps": weight_tb / (ember_us * 1e-6),
        "cublas_tbps": weight_tb / (cublas_us * 1e-6),
        "ember_fraction_of_copy": weight_tb / (ember_us * 1e-6) / copy,
        "speedup_vs_cublas": cublas_us / ember_us,
        "check": status,
    }


def print_row(r):
    print(f"{r['variant']:>8} M={r['m']:<2} N={r['n']:<6} K={r['k']:<5} "
          f"ember {r['ember_us']:7.2f} us {r['ember_tbps']:5.2f} TB/s "
          f"({100 * r['ember_fraction_of_copy']:3.0f}% of copy) | "
          f"cuBLAS {r['cublas_us']:7.2f} us {r['cublas_tbps']:5.2f} TB/s | "
          f"x{r['speedup_vs_cublas']:.2f}  {r['check']}", flush=True)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    if not torch.cuda.is_available():
        print("skinny_gemm_probe needs a CUDA GPU")
        return 1
    import ember
    from bench.harness import environment, l2_cache_bytes

    if "cuda" not in ember.ops.available_backends("skinny_linear"):
        print("ember._C is not built: nothing to time")
        return 1

    def ember_linear(x, w):
        return ember.ops.skinny_linear(x, w, backend="cuda")

    def ember_static(x, w):
        return ember.ops.skinny_linear(x, w, static_weight=True, backend="cuda")

    def ember_fused(gate_up, w):
        return ember.ops.skinny_linear(gate_up, w, activation="silu_and_mul", static_weight=True,
                                       backend="cuda")

    def ember_unfused(gate_up, w):
        return ember_linear(ember.ops.silu_and_mul(gate_up, backend="cuda"), w)

    def cublas_unfused(gate_up, w):
        return torch.nn.functional.linear(ember.ops.silu_and_mul(gate_up, backend="cuda"), w)

    copy = copy_tbps()
    print(f"copy bandwidth {copy:.2f} TB/s", flush=True)
    rows = []
    for n, k in SHAPES:
        weights = weight_copies(n, k, l2_cache_bytes())
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            torch.cuda.synchronize()
            cublas = time_us(torch.nn.functional.linear, x, weights)
            for variant, fn in (("linear", ember_linear), ("static", ember_static)):
                status = check(fn(x, weights[0]), x, weights[0])
                r = row(variant, m, n, k, time_us(fn, x, weights), cublas, status, copy)
                print_row(r)
                rows.append(r)
            if k in DOWN_K:
                gate_up = torch.randn(m, 2 * k, device="cuda", dtype=DTYPE)
                torch.cuda.synchronize()
                hidden = ember.ops.silu_and_mul(gate_up, backend="cuda")
                cublas = time_us(cublas_unfused, gate_up, weights)
                for variant, fn in (("fused", ember_fused), ("unfused", ember_unfused)):
                    status = check(fn(gate_up, weights[0]), hidden, weights[0])
                    r = row(variant, m, n, k, time_us(fn, gate_up, weights), cublas, status, copy)
                    print_row(r)
                    rows.append(r)
        del weights
        torch.cuda.empty_cache()

    result = {"environment": environment(), "dtype": str(DTYPE), "copy_tbps": copy,
              "rotate_l2_multiple": ROTATE_L2_MULTIPLE, "rows": rows}
    with open(argv[1], "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
