"""Probe (not a suite, not run by CI): what ``ember.ops.prefetch_l2`` buys a decode step.

    python -m bench.prefetch_probe [--e2e [--short]] [OUT.json]

1. The mechanism, kernel level: the Llama-3.2-1B gate/up projection on cuBLAS (``F.linear`` of
   1 x 2048 by 16384 x 2048, bf16) after an idle gap (``torch.cuda._sleep``, standing in for a
   decode step's attention), with and without a prefetch of the first bytes of every weight row
   queued before the gap. Weights rotate through copies past the L2 cache, so without the
   prefetch every byte comes from DRAM. The GEMM's time is the graph time less that of the
   gaps (and prefetches) alone.
2. ``--e2e``: single-stream decode tok/s (``measure_latency``: 128-token prompt, 256 new tokens,
   twice per engine) of the 1B shape (bf16 and fp8 KV caches) and the 8B shape, random weights,
   with ``budget`` bytes of each layer's gate/up weight requested by ``ember.ops.prefetch_l2``
   right after the layer's O projection (0: no prefetch), the 1B's budgets twice in alternating
   order, each a fresh ``ember.LLM`` in this process.
"""

import json
import math
import sys
import tempfile

import torch
import torch.nn.functional as F

from bench.harness import graph_time_ms, l2_cache_bytes

GAP_CYCLES = 20_000  # ~10 us at the H100's clock: the attention, O projection and norm
PREFIXES = (0, 512, 1024, 1536, 2048)  # bytes of each 4 KB row: 0, 8, 16, 24, 32 MB
BUDGETS_MB = (0, 16, 24, 32)
# (model shape, kv cache dtype, [budget MB], passes): the second pass runs the budgets in
# reverse order.
E2E_RUNS = (("llama-3.2-1b", "auto", list(BUDGETS_MB), 2), ("llama-3.2-1b", "fp8", [0, 24], 2),
            ("llama-3-8b", "auto", [0, 24], 1))
# --short: the 1B bf16 rows with 24 MB prefetched and without.
E2E_SHORT = (("llama-3.2-1b", "auto", [0, 24], 2),)


def kernel_rows() -> list:
    import ember

    n, k = 16384, 2048
    count = max(2, math.ceil(4 * l2_cache_bytes() / (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    rows = []
    for prefix in PREFIXES:
        def gaps(with_gemm, prefix=prefix):
            for w in weights:
                if prefix:
                    ember.ops.prefetch_l2(w, prefix, backend="cuda")
                torch.cuda._sleep(GAP_CYCLES)
                if with_gemm:
                    F.linear(x, w)
        total = graph_time_ms(lambda: gaps(True)) * 1e3 / count
        alone = graph_time_ms(lambda: gaps(False)) * 1e3 / count
        rows.append({"prefix_bytes": prefix, "prefetched_mb": n * prefix / 2**20,
                     "step_us": total, "gap_us": alone, "gemm_us": total - alone,
                     "gemm_tb_s": n * k * 2 / (total - alone) / 1e6})
        print(f"prefix {prefix:5d} B ({rows[-1]['prefetched_mb']:4.0f} MB): gap+gemm "
              f"{total:6.2f} us, gap {alone:6.2f} us, gemm {total - alone:6.2f} us "
              f"({rows[-1]['gemm_tb_s']:.2f} TB/s)", flush=True)
    return rows


class GateUpPrefetch:
    """Makes every Llama layer built while it is active request the first bytes of its gate/up
    weight's rows (``budget_mb`` in all; 0: none) with ``ember.ops.prefetch_l2`` right after its
    attention's O projection, in eager steps and in the CUDA graphs alike: the variant the
    engine measured and did not keep."""

    def __init__(self, budget_mb: int):
        self.budget = budget_mb << 20

    def __enter__(self):
        import ember.models.llama as llama

        init = self.init = llama.LlamaDecoderLayer.__init__

        def layer_init(layer, *args, **kwargs):
            init(layer, *args, **kwargs)
            layer.self_attn.probe_mlp = layer.mlp

        llama.LlamaDecoderLayer.__init__ = layer_init
        self.hook = torch.nn.modules.module.register_module_forward_hook(self.after_module)
        return self

    def after_module(self, module, args, output):
        import ember

        mlp = getattr(module, "probe_mlp", None)
        if mlp is None or not self.budget or not output.is_cuda or output.shape[0] != 1:
            return
        weight = mlp.gate_up_proj.weight
        rows, row_bytes = weight.shape[0], weight.shape[1] * weight.element_size()
        prefix = min(row_bytes, self.budget // rows) // 16 * 16
        if prefix:
            ember.ops.prefetch_l2(weight, prefix, backend="cuda")

    def __exit__(self, *exc):
        import ember.models.llama as llama

        llama.LlamaDecoderLayer.__init__ = self.init
        self.hook.remove()


def e2e_rows(runs) -> list:
    import ember
    from bench.e2e.shapes import write_config_folder
    from ember.engine.benchmark import measure_latency

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, cache, variants, passes in runs:
            for budget in (variants + variants[::-1])[:len(variants) * passes]:
                with GateUpPrefetch(budget):
                    llm = ember.LLM(write_config_folder(name, root), dtype="bfloat16",
                                    load_format="dummy", kv_cache_dtype=cache)
                    tok_s = [measure_latency(llm)["decode_tok_s"] for _ in range(2)]
                rows.append({"model": name, "kv": cache, "budget_mb": budget, "tok_s": tok_s})
                print(f"{name} kv {cache} prefetch {budget:2d} MB: "
                      + ", ".join(f"{t:.1f}" for t in tok_s) + " tok/s", flush=True)
                del llm
                torch.cuda.empty_cache()
    return rows


def main(argv: list) -> None:
    result = {"gpu": torch.cuda.get_device_name(), "kernel": kernel_rows(),
              "e2e": e2e_rows(E2E_SHORT if "--short" in argv else E2E_RUNS)
              if "--e2e" in argv else []}
    paths = [a for a in argv if a.endswith(".json")]
    if paths:
        with open(paths[0], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
