"""The ``e2e`` suite: ember.LLM against transformers ``generate`` on one GPU.

- ``decode``: one request (128-token prompt, 256 new tokens, greedy, EOS ignored) on
  SmolLM2-135M, Llama-3.2-1B and Llama-3-8B shapes. Time per output token; the roofline is the
  weight bytes a decode step reads over the copy bandwidth measured in the same run
  (``frac_of_roofline``). Bars: >= 70% of it for the 1B and 8B shapes, >= 1,000 tok/s on
  SmolLM2.
- ``decode_speculative``: SmolLM2 (its GGUF) on one chat request that asks for a passage to be
  copied, greedy, 256 new tokens: tok/s with speculative decoding (4 n-gram drafts per step;
  4 drafts of an int4 copy of the model) against the same engine without it, with the drafts
  accepted and the steps taken. Steps that verify drafts run eagerly (no CUDA graph).
- ``throughput``: 256 requests, prompt and output lengths uniform in 100..1024, EOS ignored,
  temperature 1, on the 1B shape, all submitted at once; time per output token. transformers
  runs static batches of 64 (left-padded, each batch as long as its longest output; only the
  requested tokens count). Bar: >= 12,000 output tok/s.

Rows also carry time to first token, peak memory, prefix-cache hit rate, preemptions and CUDA
graph capture time. ``--quick``: shorter outputs, 64 requests, no 8B shape.
"""

import gc
import importlib.util
import random
import tempfile
import time

import torch

from bench.e2e.shapes import hf_config, write_config_folder
from bench.harness import suite

DECODE_MODELS = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
THROUGHPUT_MODEL = "llama-3.2-1b"
BARS = {"llama-3.2-1b": ("frac_of_roofline", 0.70), "llama-3-8b": ("frac_of_roofline", 0.70),
        "smollm2-135m": ("tok_s", 1000.0), "throughput": ("output_tok_s", 12000.0)}
HF_BATCH = 64


def _free_gpu():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _weights(model) -> tuple:
    """(bytes a decode step reads, parameters in its matmuls): every weight once (a tied
    embedding as the LM head); an untied embedding table is only indexed, one row a token."""
    params = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        params -= model.embed_tokens.weight.numel()
    return params * model.embed_tokens.weight.element_size(), params


def _ember_llm(name: str, root, **kwargs):
    import ember

    if name == "smollm2-135m" and importlib.util.find_spec("gguf") is not None:
        return ember.LLM("smollm2-135m", dtype="bfloat16", **kwargs), "gguf"
    return ember.LLM(write_config_folder(name, root), dtype="bfloat16", load_format="dummy",
                     **kwargs), "random"


def _hf_model(name: str):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.bfloat16).eval()


def _hf_decode_tok_s(model, input_len: int, output_len: int) -> float:
    """transformers' greedy generate at batch 1: decode tok/s from a full and a 1-token run."""
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (1, input_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(8)  # warm-up
    return (output_len - 1) / (run(output_len) - run(1))


def _hf_static_batch_tok_s(model, lengths: list) -> float:
    """transformers with static batching: one left-padded batch of (prompt, output) lengths;
    output tok/s counting only the requested tokens."""
    vocab = model.config.vocab_size
    longest = max(p for p, _ in lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for row, (p, _) in enumerate(lengths):
        ids[row, longest - p:] = torch.randint(1000, vocab, (p,))
        mask[row, longest - p:] = 1
    new = max(o for _, o in lengths)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                       top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    torch.cuda.synchronize()
    return sum(o for _, o in lengths) / (time.perf_counter() - start)


def _check_bar(ctx, key, value):
    field, bar = BARS[key]
    if value is None:  # no roofline measured in this run
        ctx.note(f"bar {key}: {field} unknown, bar {bar:g} not checked")
        return
    verdict = "meets" if value >= bar else "MISSES"
    ctx.note(f"bar {key}: {field} {value:.3g} {verdict} the bar {bar:g}")


def _decode(ctx, name, root, input_len, output_len):
    from ember.engine import benchmark

    _free_gpu()
    llm, weights = _ember_llm(name, root)
    stats = llm.stats()
    result = benchmark.measure_latency(llm, input_len, output_len)
    nbytes, params = _weights(llm.model)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del llm
    _free_gpu()
    hf = _hf_model(name)
    hf_tok_s = _hf_decode_tok_s(hf, input_len, output_len)
    del hf
    _free_gpu()
    rows = ctx.record(
        op="decode", params={"model": name, "batch": 1, "input_len": input_len,
                             "output_len": output_len},
        flops=2.0 * params, bytes=float(nbytes),
        times={"ember": 1e3 / result["decode_tok_s"], "transformers": 1e3 / hf_tok_s},
        anchors=("transformers",),
        extras={"ember": {"tok_s": result["decode_tok_s"], "ttft_ms": 1e3 * result["ttft_s"],
                          "weights": weights, "peak_memory_gb": peak,
                          "graph_capture_s": stats["graph_capture_seconds"]},
                "transformers": {"tok_s": hf_tok_s, "weights": "random"}})
    _check_bar(ctx, name, rows[0].get(BARS[name][0]))


def _throughput(ctx, root, num_requests, min_len, max_len):
    from ember.engine import benchmark

    _free_gpu()
    llm, _ = _ember_llm(THROUGHPUT_MODEL, root, max_model_len=2 * max_len + 64)
    result = benchmark.measure_throughput(llm, num_requests, min_len, max_len)
    stats = llm.stats()
    _, params = _weights(llm.model)
    del llm
    _free_gpu()
    hf = _hf_model(THROUGHPUT_MODEL)
    rng = random.Random(1)
    batch = [(rng.randint(min_len, max_len), rng.randint(min_len, max_len))
             for _ in range(min(HF_BATCH, num_requests))]
    hf_tok_s = _hf_static_batch_tok_s(hf, batch)
    del hf
    _free_gpu()
    # Per output token: the matmul FLOPs of all tokens processed, prompts included.
    tokens_per_output = (result["input_tokens"] + result["output_tokens"]) / result[
        "output_tokens"]
    ctx.record(
        op="throughput", params={"model": THROUGHPUT_MODEL, "requests": num_requests,
                                 "lengths": f"{min_len}-{max_len}"},
        flops=2.0 * params * tokens_per_output, bytes=0.0,
        times={"ember": 1e3 / result["output_tok_s"],
               f"transformers-static-b{HF_BATCH}": 1e3 / hf_tok_s},
        anchors=(f"transformers-static-b{HF_BATCH}",),
        extras={"ember": {"output_tok_s": result["output_tok_s"],
                          "ttft_median_ms": 1e3 * result["ttft_median_s"],
                          "prefix_cache_hit_rate": result["prefix_cache_hit_rate"],
                          "num_preemptions": result["num_preemptions"],
                          "peak_memory_gb": result["peak_memory_gb"],
                          "graph_capture_s": stats["graph_capture_seconds"]},
                f"transformers-static-b{HF_BATCH}": {"output_tok_s": hf_tok_s}})
    _check_bar(ctx, "throughput", result["output_tok_s"])


SPEC_SETTINGS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                 "prompt_lookup_min": 2}
COPY_PASSAGE = (
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion, the members agreed to increase funding for the library, to repair the roof "
    "of the town hall, and to hire two more teachers for the primary school. The proposal "
    "to build a new swimming pool was postponed until the spring, when the cost estimates "
    "will be ready. The meeting ended at nine in the evening.")


def _speculative(ctx, output_len):
    import ember
    from ember.engine import benchmark

    if importlib.util.find_spec("gguf") is None:
        ctx.note("decode_speculative skipped: SmolLM2's weights need the gguf package")
        return
    results = {}
    int4_draft = {"method": "draft_model", "quantization": "int4",
                  "num_speculative_tokens": SPEC_SETTINGS["num_speculative_tokens"]}
    for name, spec in (("ember", None), ("ember-ngram", SPEC_SETTINGS),
                       ("ember-int4-draft", int4_draft)):
        _free_gpu()
        llm = ember.LLM("smollm2-135m", dtype="bfloat16", speculative=spec)
        prompt = llm.apply_chat_template([{"role": "user", "content": (
            "Copy the following text exactly, twice.\n\n" + COPY_PASSAGE)}])
        results[name] = benchmark.measure_latency(llm, output_len=output_len, prompt=prompt)
        nbytes, params = _weights(llm.model)
        del llm
    _free_gpu()
    # Rates per output token as in ``decode``: a step that accepts drafts reads the weights
    # once for several tokens, so the fraction of the weight-bandwidth roofline may pass 1.
    ctx.record(
        op="decode_speculative",
        params={"model": "smollm2-135m", "prompt": "copy a passage", "batch": 1,
                "output_len": output_len, "num_speculative_tokens":
                    SPEC_SETTINGS["num_speculative_tokens"]},
        flops=2.0 * params, bytes=float(nbytes),
        times={name: 1e3 / r["decode_tok_s"] for name, r in results.items()},
        anchors=("ember",),
        extras={name: {"tok_s": r["decode_tok_s"], "decode_steps": r["decode_steps"],
                       "drafts": r["spec_draft_tokens"], "accepted": r["spec_accepted_tokens"]}
                for name, r in results.items()})


QUANT_MODELS = ("llama-3.2-1b", "llama-3-8b")
QUANT_METHODS = ("int8", "int4")


def _quantized_step_bytes(model) -> int:
    """Bytes a decode step reads: as ``_weights``, plus the quantized layers' codes, scales and
    zero points (buffers, not parameters)."""
    nbytes, _ = _weights(model)
    return nbytes + sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                        if name.rpartition(".")[2] in ("qweight", "scale", "zeros"))


@suite("e2e_quant", order=91, description="""
    Single-stream decode (batch 1, 128 + 256 tokens, greedy, random weights) of the Llama-3.2-1B
    and Llama-3-8B shapes with the linear layers quantized by the engine (int8 per channel, int4
    per group of 128) against bf16 in the same run; TB/s and the roofline fraction count the
    bytes a step reads (quantized codes, scales and zeros; the rest in bf16).""")
def run_quantized(ctx):
    from ember.engine import benchmark

    output_len = 64 if ctx.quick else 256
    with tempfile.TemporaryDirectory() as root:
        for name in QUANT_MODELS[:1] if ctx.quick else QUANT_MODELS:
            times, extras, step_bytes = {}, {}, {}
            for method in (None, *QUANT_METHODS):
                label = f"ember-{method}" if method else "ember-bf16"
                _free_gpu()
                llm, _ = _ember_llm(name, root, quantization=method)
                result = benchmark.measure_latency(llm, 128, output_len)
                step_bytes[label] = _quantized_step_bytes(llm.model)
                times[label] = 1e3 / result["decode_tok_s"]
                extras[label] = {"tok_s": result["decode_tok_s"],
                                 "step_bytes": step_bytes[label]}
                del llm
            _free_gpu()
            for label, ms in times.items():  # one row each: the bytes differ
                ctx.record(op="decode_quantized",
                           params={"model": name, "batch": 1, "output_len": output_len,
                                   "weights": label.removeprefix("ember-")},
                           flops=0.0, bytes=float(step_bytes[label]), times={label: ms},
                           extras={label: {**extras[label],
                                           "speedup_vs_bf16": times["ember-bf16"] / ms}})


@suite("e2e", order=90, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
def run(ctx):
    quick = ctx.quick
    output_len = 64 if quick else 256
    models = DECODE_MODELS[:2] if quick else DECODE_MODELS
    with tempfile.TemporaryDirectory() as root:
        for name in models:
            ctx.guarded(f"decode {name}", lambda n=name: _decode(ctx, n, root, 128, output_len))
        ctx.guarded("decode_speculative", lambda: _speculative(ctx, output_len))
        ctx.guarded("throughput", lambda: _throughput(
            ctx, root, 64 if quick else 256, 100, 256 if quick else 1024))
