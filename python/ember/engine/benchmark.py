"""End-to-end measurements of an LLM: single-stream latency and batch throughput.

Shared by ``ember bench`` and ``bench/e2e``. Prompts are random token ids (unless given) and
outputs run to their length (``ignore_eos``), so results depend only on shapes, not on weights
or text.
"""

import random
import time

import torch

from ember.engine.llm import LLM
from ember.engine.sampling_params import SamplingParams


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> list:
    # Skip the first ids: special tokens of real vocabularies live there.
    return [rng.randrange(min(1000, vocab_size // 2), vocab_size) for _ in range(length)]


def _sync(llm: LLM) -> None:
    if llm.config.device.type == "cuda":
        torch.cuda.synchronize()


def measure_latency(llm: LLM, input_len: int = 128, output_len: int = 256, seed: int = 0,
                    warmup: bool = True, prompt: list | None = None) -> dict:
    """One request alone: time to first token and decode tokens/s (batch 1, greedy).

    ``prompt``: token ids to use instead of a random prompt of ``input_len`` tokens (a text
    worth speculating on, say). The result also counts the engine steps after the first token
    and, with speculative decoding, the drafts verified and accepted."""
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    if warmup:
        length = input_len if prompt is None else len(prompt)
        llm.generate([random_prompt(length, vocab, rng)],
                     SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
    if prompt is None:
        prompt = random_prompt(input_len, vocab, rng)
    before = llm.stats()
    _sync(llm)
    start = time.perf_counter()
    llm.add_request(prompt, params)
    first, steps = None, 0
    while llm.has_unfinished_requests():
        llm.step()  # returns after the sampled tokens reached the host
        if first is None:
            first = time.perf_counter()
        else:
            steps += 1
    end = time.perf_counter()
    after = llm.stats()
    return {
        "input_len": len(prompt),
        "output_len": output_len,
        "ttft_s": first - start,
        "decode_tok_s": (output_len - 1) / (end - first),
        "decode_steps": steps,
        "spec_draft_tokens": after["spec_draft_tokens"] - before["spec_draft_tokens"],
        "spec_accepted_tokens": after["spec_accepted_tokens"] - before["spec_accepted_tokens"],
        "total_s": end - start,
    }


def _throughput_workload(llm: LLM, num_requests: int, min_len: int, max_len: int,
                         rng: random.Random, max_tokens: int | None = None):
    vocab = llm.model_config.vocab_size
    prompts, params = [], []
    for _ in range(num_requests):
        prompts.append(random_prompt(rng.randint(min_len, max_len), vocab, rng))
        params.append(SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True,
                                     max_tokens=max_tokens or rng.randint(min_len, max_len)))
    return prompts, params


def measure_throughput(llm: LLM, num_requests: int = 256, min_len: int = 100,
                       max_len: int = 1024, seed: int = 0, warmup: bool = True) -> dict:
    """``num_requests`` requests submitted at once, prompt and output lengths uniform in
    ``[min_len, max_len]``, sampled at temperature 1 (vLLM's benchmark_throughput).

    ``warmup`` first runs the same mix of prompts (other tokens, 8 output tokens each), so
    that first-use costs (kernels loaded and tuned for each new prompt-chunk shape) stay out of
    the timing: on the H100, the 1B shape's first run in a fresh process measured 10.7k to 20k
    output tokens/s for the same code, a second run in the same process 20k to 23k.
    """
    rng = random.Random(seed)
    if warmup:
        llm.generate(*_throughput_workload(llm, num_requests, min_len, max_len, rng,
                                           max_tokens=8), use_tqdm=False)
    prompts, params = _throughput_workload(llm, num_requests, min_len, max_len, rng)
    if llm.config.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = llm.stats()
    _sync(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    queried = after["prefix_cache_query_tokens"] - before["prefix_cache_query_tokens"]
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    ttfts = sorted(o.metrics.time_to_first_token for o in outputs)
    return {
        "requests": num_requests,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "elapsed_s": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (in_tokens + out_tokens) / elapsed,
        "ttft_median_s": ttfts[len(ttfts) // 2],
        "prefix_cache_hit_rate": hits / max(queried, 1),
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30
                           if llm.config.device.type == "cuda" else None),
    }
