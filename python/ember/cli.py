"""The ``ember`` command.

    ember generate "The capital of France is" [--model smollm2-135m] [--max-tokens N]
                   [--temperature T] [--top-p P] [--top-k K] [--seed S] [--chat]
                   [--speculative-tokens K] [--quantization int8|int4] [--kv-cache-dtype fp8]
    ember bench latency|throughput [--model M] [--load-format dummy] ...

Runs on cuda when a GPU is present, else on the CPU (``--device`` overrides).
"""

import argparse
import json
import sys


def _engine_args(args) -> dict:
    engine = {"device": args.device, "dtype": args.dtype}
    if getattr(args, "load_format", None):
        engine["load_format"] = args.load_format
    if getattr(args, "enforce_eager", False):
        engine["enforce_eager"] = True
    if getattr(args, "max_model_len", None):
        engine["max_model_len"] = args.max_model_len
    if getattr(args, "quantization", None):
        engine["quantization"] = args.quantization
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        engine["kv_cache_dtype"] = args.kv_cache_dtype
    if getattr(args, "speculative_tokens", 0):
        engine["speculative"] = {"method": "ngram",
                                 "num_speculative_tokens": args.speculative_tokens}
    return engine


def _generate(args) -> None:
    import ember

    llm = ember.LLM(args.model, **_engine_args(args))
    params = ember.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    if args.chat:
        prompt = {"prompt_token_ids": llm.apply_chat_template(
            [{"role": "user", "content": args.prompt}])}
    else:
        prompt = args.prompt
        sys.stdout.write(args.prompt)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _bench(args) -> None:
    import ember
    from ember.engine import benchmark

    llm = ember.LLM(args.model, **_engine_args(args))
    if args.kind == "latency":
        result = benchmark.measure_latency(llm, args.input_len, args.output_len)
    else:
        result = benchmark.measure_throughput(llm, args.num_prompts, args.min_len, args.max_len)
    result["engine"] = llm.stats()
    print(json.dumps(result, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="smollm2-135m",
                       help="built-in alias, Hugging Face folder or .gguf file")
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
        p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
        p.add_argument("--max-model-len", type=int, default=None)
        p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
        p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                       help="weight-only quantization of the linear layers")
        p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                       help="KV cache elements: the model's dtype, or fp8 e4m3 (half the bytes)")
        p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                       help="speculative decoding with up to K prompt-lookup (n-gram) drafts "
                            "per step (default 0: off)")

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    gen.add_argument("prompt")
    common(gen)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="end-to-end latency or throughput (JSON)")
    bench.add_argument("kind", choices=["latency", "throughput"])
    common(bench)
    bench.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights (a folder with only config.json will do)")
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=256)
    bench.add_argument("--num-prompts", type=int, default=256)
    bench.add_argument("--min-len", type=int, default=100)
    bench.add_argument("--max-len", type=int, default=1024)
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # Bad input (a missing model, an invalid option): the message, not a traceback.
        sys.exit(f"ember: error: {e}")


if __name__ == "__main__":
    main()
