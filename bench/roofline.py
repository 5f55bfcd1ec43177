"""roofline: the two ceilings of this GPU, measured at the start of every run."""

import torch

from bench import anchors, harness
from bench.harness import copy_bytes, matmul_flops, suite

COPY_BYTES = 1 << 30   # per buffer: far beyond L2, long enough to reach steady state
MATMUL_SIZE = 8192     # 8192^3 bf16 on random data (zeros would run faster than real data)


def _copy_ms(ctx) -> float:
    src = torch.randn(COPY_BYTES // 2, device=harness.DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return ctx.time(lambda: dst.copy_(src))


def _matmul_ms(ctx, n: int) -> float:
    a = torch.randn(n, n, device=harness.DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=harness.DEVICE, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=harness.DEVICE, dtype=torch.bfloat16)
    return ctx.time(lambda: anchors.cublas_matmul(a, b, out=c))


@suite("roofline", order=0, description="""
    Ceilings for every other suite of the same run: device-to-device copy bandwidth
    (TB/s = (bytes read + bytes written) / time, 1 GiB buffers) and cuBLAS bf16 matmul
    (TFLOP/s = 2·M·N·K / time, 8192³ on random data).""")
def run(ctx):
    n = MATMUL_SIZE
    copy_ms, matmul_ms = _copy_ms(ctx), _matmul_ms(ctx, n)
    ctx.roofline = {
        "copy_tbps": copy_bytes(COPY_BYTES) / copy_ms / 1e9,
        "matmul_bf16_tflops": matmul_flops(n, n, n) / matmul_ms / 1e9,
    }
    ctx.record(op="copy", params={"bytes": COPY_BYTES}, flops=0, bytes=copy_bytes(COPY_BYTES),
               times={"torch-copy": copy_ms})
    ctx.record(op="matmul_bf16", params={"m": n, "n": n, "k": n}, flops=matmul_flops(n, n, n),
               bytes=3 * n * n * 2, times={"cublas": matmul_ms})
