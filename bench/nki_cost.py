"""Per-kernel cost estimate of ember's NKI kernels on one NeuronCore, from the simulator.

    python -m bench.nki_cost [--target trn2] [--quick] [--out bench/results/nki_cost.md]

No Neuron hardware was available to us, so these are not measurements: each kernel runs in the
CPU simulator (``neuron_kernels/simulator.py``), which records every instruction it issues.
The table reports, per kernel and shape:

- instructions per engine (TensorE, ScalarE, VectorE, GpSimd, DMA);
- bytes moved by DMA between HBM and SBUF, and the mean contiguous run per DMA descriptor
  (runs under ~512 B use the DMA engines poorly on hardware; the time model ignores that);
- peak live SBUF per partition and PSUM banks;
- modelled busy time per engine: TensorE ``max(N, 64)`` cycles per matmul (4x for fp32),
  Vector/Scalar/GpSimd ``max(free elements, 64)`` cycles per instruction at their clocks, DMA
  bytes at the core's share of HBM bandwidth (NKI.md sections 2.1 and 7);
- the estimate: the busiest engine's time, i.e. perfect overlap of engines (a lower bound:
  dependencies, DMA latency and instruction issue overheads are not modelled), the engine that
  bounds it, and TensorE utilisation = the op's useful FLOPs / (estimate x bf16 peak).

A split-KV decode is two launches (the two-core partial pass, then the merge); its time is the
sum of the launches, each the slower of its programs.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "nki_cost.md"


def _cases(quick: bool):
    """``(kernel, shape text, useful FLOPs, run)``: run() calls the kernel once (lambdas bind
    their tensors as defaults: the names are reused case after case)."""
    from ember.neuron_kernels import attention, decode_attention, matmul, moe, quant
    from ember.ops import reference

    bf16 = torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = []
    seqs = (512,) if quick else (1024, 4096)
    for seq in seqs:
        for causal in (False, True):
            b, h, d = 1, 1, 128
            q, k, v = randn(b, seq, h, d), randn(b, seq, h, d), randn(b, seq, h, d)
            pairs = seq * (seq + 1) // 2 if causal else seq * seq
            cases.append((
                "flash_fwd", f"b{b} h{h} s{seq} d{d}{' causal' if causal else ''}",
                4 * b * h * d * pairs,
                lambda q=q, k=k, v=v, c=causal, d=d: attention.flash_attn(q, k, v, d ** -0.5, c,
                                                                    -1, 0 if c else -1)))
    gqa_seq = 256 if quick else 1024
    q, k, v = randn(1, gqa_seq, 8, 128), randn(1, gqa_seq, 2, 128), randn(1, gqa_seq, 2, 128)
    cases.append(("flash_fwd", f"b1 GQA 8:2 s{gqa_seq} d128 causal",
                  4 * 8 * 128 * gqa_seq * (gqa_seq + 1) // 2,
                  lambda q=q, k=k, v=v: attention.flash_attn(q, k, v, 128 ** -0.5, True, -1, 0)))

    batch, context, bs = (2, 512, 16) if quick else (4, 2048, 16)
    for splits in (1, 0):
        blocks = context // bs
        k_cache = randn(batch * blocks, bs, 8, 128)
        v_cache = randn(batch * blocks, bs, 8, 128)
        table = torch.randperm(batch * blocks, generator=g).reshape(batch, blocks).int()
        lengths = torch.full((batch,), context, dtype=torch.int32)
        qd = randn(batch, 1, 32, 128)
        programs = decode_attention.split_programs(splits, True, bs, context)
        cases.append((
            "decode (paged)", f"b{batch} GQA 32:8 ctx{context} d128 bs{bs}, "
                              f"{'split-KV on 2 cores + merge' if programs > 1 else '1 core'}",
            4 * batch * 32 * context * 128,
            lambda kc=k_cache, vc=v_cache, t=table, n=lengths, qd=qd, s=splits:
                decode_attention.flash_attn_with_kvcache(qd, kc, vc, n, t, 128 ** -0.5, True,
                                                         -1, 0, s, context, None, None,
                                                         None)))

    m, kk, n = (256, 1024, 1024) if quick else (2048, 2048, 2048)
    x, w = randn(m, kk), randn(n, kk)
    cases.append(("matmul", f"{m}x{kk} @ {kk}x{n}", 2 * m * n * kk,
                  lambda x=x, w=w: matmul.matmul(x, w)))

    m, kk, n = (16, 1024, 1024) if quick else (16, 4096, 4096)
    x, w = randn(m, kk), randn(n, kk, dtype=torch.float32)
    qweight, scale = reference.quantize_int8(w)
    w_fp8, w_scale = reference.quantize_fp8(w)
    w_bf16 = w.to(bf16)
    flops = 2 * m * n * kk
    cases.append(("matmul (decode-shaped)", f"{m}x{kk} @ {kk}x{n} bf16", flops,
                  lambda x=x, w=w_bf16: matmul.matmul(x, w)))
    cases.append(("w8a16_gemm", f"{m}x{kk} @ {kk}x{n} int8", flops,
                  lambda x=x: quant.w8a16_gemm(x, qweight, scale)))
    cases.append(("fp8_gemm", f"{m}x{kk} @ {kk}x{n} e4m3", flops,
                  lambda x=x: quant.fp8_gemm(x, w_fp8, w_scale)))

    rows, experts, kk, n = (256, 4, 512, 512) if quick else (1024, 8, 1024, 3584)
    x, w = randn(rows, kk), randn(experts, n, kk)
    ends = torch.linspace(0, rows, experts + 1)[1:].round().int()
    cases.append(("grouped_gemm", f"{rows} rows E{experts} K{kk} N{n}", 2 * rows * n * kk,
                  lambda x=x, w=w: moe.grouped_gemm(x, w, ends)))
    return cases


def _measure(name, shape, flops, run):
    from ember.neuron_kernels import simulator as sim

    with sim.trace() as launches:
        run()
    instructions = {e: 0 for e in sim.ENGINES}
    busy = {e: 0.0 for e in sim.ENGINES}
    read = written = descriptors = sbuf = psum = 0
    estimate = 0.0
    for programs in launches:
        summary = sim.combine_programs(programs)
        for engine, count in summary["instructions"].items():
            instructions[engine] += count
        for engine, us in summary["engine_us"].items():
            busy[engine] += us
        read += summary["dma_read_bytes"]
        written += summary["dma_write_bytes"]
        descriptors += summary["dma_descriptors"]
        estimate += summary["estimate_us"]
        sbuf = max(sbuf, summary["peak_sbuf_bytes"])
        psum = max(psum, summary["peak_psum_banks"])
    target = launches[0][0].target
    bound = max(busy, key=busy.get)
    return {
        "kernel": name, "shape": shape, "target": target, "instructions": instructions,
        "read_mb": read / 1e6, "write_mb": written / 1e6,
        "run_bytes": (read + written) / max(descriptors, 1), "busy": busy,
        "estimate_us": estimate, "bound": sim.ENGINE_NAMES[bound],
        "sbuf_kib": sbuf / 1024, "psum_banks": psum,
        "pe_util": flops / (estimate * 1e-6) / (target.bf16_tflops * 1e12),
        "tflops": flops / (estimate * 1e-6) / 1e12,
    }


def _table(rows) -> str:
    head = ("| kernel | shape | instructions PE/ACT/DVE/POOL/DMA | HBM read / write MB | "
            "B per DMA run | peak SBUF KiB/partition, PSUM banks | busy us PE/ACT/DVE/POOL/DMA | "
            "estimate us | bound by | TFLOP/s | TensorE util |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ins = "/".join(str(r["instructions"][e]) for e in ("pe", "act", "dve", "pool", "dma"))
        busy = "/".join(f"{r['busy'][e]:.1f}" for e in ("pe", "act", "dve", "pool", "dma"))
        lines.append(f"| {r['kernel']} | {r['shape']} | {ins} | {r['read_mb']:.2f} / "
                     f"{r['write_mb']:.2f} | {r['run_bytes']:.0f} | {r['sbuf_kib']:.1f}, "
                     f"{r['psum_banks']} | {busy} | "
                     f"{r['estimate_us']:.1f} | {r['bound']} | {r['tflops']:.1f} | "
                     f"{100 * r['pe_util']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nki_cost", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--target", default="trn2", choices=("trn1", "trn2", "trn3"),
                        help="NeuronCore generation whose limits, clocks and peaks apply")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    args = parser.parse_args(argv)
    os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] = args.target

    from ember.neuron_kernels import nki_api

    if not nki_api.SIMULATED:
        print("real NKI is installed: profile on the device (neuron-explorer) instead",
              file=sys.stderr)
        return 1
    rows = [_measure(*case) for case in _cases(args.quick)]
    target = rows[0]["target"]
    table = _table(rows)
    print(table)
    text = "\n".join([
        "# NKI kernels: cost estimate from the simulator",
        "",
        f"Target {target.name} ({target.core}, one core): TensorE {target.pe_ghz} GHz, "
        f"{target.bf16_tflops:g} TFLOP/s bf16 peak; VectorE {target.vector_ghz} GHz, "
        f"ScalarE {target.scalar_ghz} GHz, GpSimd {target.gpsimd_ghz} GHz; "
        f"{target.hbm_gbps:.0f} GB/s of HBM per core.",
        "",
        "**No Neuron hardware was available to us: these are estimates from the instruction "
        "trace of the simulator, not measurements.** The model (see `bench/nki_cost.py`): "
        "TensorE max(N, 64) cycles per matmul (x4 for fp32), Vector/Scalar/GpSimd "
        "max(elements per partition, 64) cycles per instruction, DMA bytes at the core's "
        "bandwidth share; engines overlap perfectly (a lower bound on time). "
        "TensorE util = useful FLOPs / (estimate x peak).",
        "",
        f"Generated by `python -m bench.nki_cost --target {target.name}"
        f"{' --quick' if args.quick else ''}`.",
        "",
        table,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

