"""Probe (not a suite, not run by CI): one backend's decode kernel on bf16 and fp8 caches, and
the engine's single-stream decode, in one short GPU call.

    python -m bench.decode_probe [--backend cuda|triton] [--e2e] [--splits] [OUT.json]

For A/B runs of a kernel change on one machine (build, probe, change, rebuild, probe again):
the full ``decode`` suite takes minutes, this about one. Each row is a decode shape (GQA,
head dim, batch x cache length, contiguous or paged-16 cache) timed on bf16 and on fp8 caches:
GB/s over the bytes the call must move (``bench.decode.decode_bytes``), the fp8 speed-up in
time (issue 4's bar: 1.6x) and each output's relative error against the float32 reference.
The last row is the engine's batch-1 shape: 384 cached keys. ``--e2e`` adds single-stream
decode tok/s (``measure_latency``: a 128-token prompt, 256 new tokens, twice) of the
Llama-3.2-1B shape (bf16 and fp8 KV caches) and the SmolLM2-135M shape, random weights.
``--splits`` adds a sweep of forced split counts over the shapes where the plan splits (the
plan's own count, then the counts that fill k waves of one program per SM, k = 1..4): the
data behind ``ember.ops._split_kv``'s rule.

Timing as in the ``decode`` suite: CUDA-graph replay of back-to-back calls of the kernel
backend (no host-side validation), inputs rotated through copies past the L2 cache.
"""

import json
import sys
import tempfile

import torch

from bench import decode
from bench.harness import Rotation, graph_time_ms, relative_error

# (heads_q, heads_kv, head_dim, batch, cache length, paged)
SHAPES = (
    (32, 8, 64, 8, 8192, False), (32, 8, 64, 32, 4096, False), (32, 8, 64, 1, 131072, False),
    (9, 3, 64, 32, 4096, False), (9, 3, 64, 1, 131072, False), (9, 3, 64, 16, 32768, False),
    (9, 3, 128, 1, 131072, False), (9, 3, 128, 32, 4096, False),
    (32, 8, 128, 32, 4096, False), (32, 8, 128, 1, 32768, False), (32, 8, 128, 16, 32768, False),
    (32, 8, 128, 32, 4096, True), (32, 8, 64, 32, 4096, True), (9, 3, 64, 32, 4096, True),
    (32, 8, 64, 128, 1024, False), (32, 8, 64, 128, 1024, True), (32, 8, 64, 1, 384, True),
)
CACHES = (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn))
# (heads_q, heads_kv, head_dim, batch, cache length, paged, cache dtype) of the split sweep.
SPLIT_SHAPES = tuple(
    (hq, hkv, d, b, n, False, torch.bfloat16)
    for hq, hkv in ((32, 8), (9, 3)) for d in (64, 128)
    for b, n in ((1, 4096), (1, 32768), (1, 131072), (8, 8192))) + (
    (9, 3, 64, 32, 4096, False, torch.bfloat16), (9, 3, 128, 32, 4096, False, torch.bfloat16),
    (9, 3, 64, 1, 131072, True, torch.bfloat16), (32, 8, 64, 1, 32768, True, torch.bfloat16),
    (9, 3, 64, 1, 131072, False, torch.float8_e4m3fn),
    (32, 8, 64, 1, 32768, False, torch.float8_e4m3fn),
    (9, 3, 128, 1, 131072, False, torch.float8_e4m3fn),
    (9, 3, 64, 32, 4096, False, torch.float8_e4m3fn))
# (model shape, kv_cache_dtype)
E2E_RUNS = (("llama-3.2-1b", "auto"), ("llama-3.2-1b", "fp8"), ("smollm2-135m", "auto"))


def kernel_rows(backend: str) -> list:
    rows = []
    for shape in SHAPES:
        heads_q, heads_kv, head_dim, batch, length, paged = shape
        row = {"shape": f"{heads_q}:{heads_kv} d={head_dim} {batch}x{length} "
                        f"{'paged' if paged else 'contiguous'}"}
        # The backend alone, called as the decode suite's kernel rows call it.
        kernel = decode._ember_providers([backend], head_dim, public=False)[
            f"ember-{backend}-kernel"]
        for name, cache_dtype in CACHES:
            us, gb_s, error = time_kernel(kernel, shape, cache_dtype)
            row.update({f"{name}_us": us, f"{name}_gb_s": gb_s, f"{name}_error": error})
        row["fp8_speedup"] = row["bf16_us"] / row["fp8_us"]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def split_rows(backend: str) -> list:
    """Forced split counts against the plan's (0) on SPLIT_SHAPES, GB/s of the kernel."""
    from ember.ops._split_kv import MAX_AUTO_SPLITS, sm_count

    sms = sm_count(torch.device("cuda"))
    rows = []
    for heads_q, heads_kv, head_dim, batch, length, paged, cache_dtype in SPLIT_SHAPES:
        work = batch * heads_kv
        counts = [0] + sorted({min(MAX_AUTO_SPLITS, max(1, k * sms // work))
                                 for k in (1, 2, 3, 4)})
        for splits in counts:
            kernel = decode._ember_providers([backend], head_dim, public=False,
                                             num_splits=splits)[f"ember-{backend}-kernel"]
            us, gb_s, error = time_kernel(
                kernel, (heads_q, heads_kv, head_dim, batch, length, paged), cache_dtype)
            rows.append({"shape": f"{heads_q}:{heads_kv} d={head_dim} {batch}x{length} "
                                  f"{'paged' if paged else 'contiguous'} {cache_dtype}",
                         "splits": splits, "us": us, "gb_s": gb_s, "error": error})
            print(f"{rows[-1]['shape']:48s} splits {splits:3d}  {us:7.1f} us  {gb_s:5.0f} GB/s",
                  flush=True)
        torch.cuda.empty_cache()
    return rows


def time_kernel(kernel, shape: tuple, cache_dtype: torch.dtype) -> tuple:
    """``(microseconds, GB/s, relative error)`` of one decode shape on one cache type."""
    heads_q, heads_kv, head_dim, batch, length, paged = shape
    rotation = Rotation(lambda: decode._cache_inputs(
        batch, 1, length, heads_q, heads_kv, head_dim, paged=paged, cache_dtype=cache_dtype))
    error = relative_error(kernel(*rotation.inputs[0])[0],
                           decode._reference(*rotation.inputs[0]))
    ms = graph_time_ms(rotation.bind(kernel), rep_ms=40)
    bytes_moved = decode.decode_bytes(batch, 1, length, heads_q, heads_kv, head_dim,
                                      cache_dtype.itemsize)
    return ms * 1e3, bytes_moved / ms / 1e6, error


def e2e_tok_s() -> dict:
    import ember
    from bench.e2e.shapes import write_config_folder
    from ember.engine.benchmark import measure_latency

    out = {}
    with tempfile.TemporaryDirectory() as root:
        for name, cache in E2E_RUNS:
            llm = ember.LLM(write_config_folder(name, root), dtype="bfloat16",
                            load_format="dummy", kv_cache_dtype=cache)
            out[f"{name} kv {cache}"] = [measure_latency(llm)["decode_tok_s"] for _ in range(2)]
            del llm
            torch.cuda.empty_cache()
    return out


def main(argv: list) -> None:
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "cuda"
    paths = [a for a in argv if a.endswith(".json")]
    result = {"gpu": torch.cuda.get_device_name(), "backend": backend,
              "rows": kernel_rows(backend), "e2e": e2e_tok_s() if "--e2e" in argv else {},
              "splits": split_rows(backend) if "--splits" in argv else []}
    for r in result["rows"]:
        print(f"{r['shape']:32s} bf16 {r['bf16_gb_s']:5.0f} GB/s  fp8 {r['fp8_gb_s']:5.0f} GB/s"
              f"  fp8 speed-up {r['fp8_speedup']:.2f}  error {r['bf16_error']:.1e} "
              f"{r['fp8_error']:.1e}")
    for name, tok_s in result["e2e"].items():
        print(f"{name}: " + ", ".join(f"{t:.1f}" for t in tok_s) + " tok/s")
    if paths:
        with open(paths[0], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
