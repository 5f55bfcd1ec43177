"""The end-to-end benchmark's plumbing on CPU: model shapes read the same by ember and
transformers, and the measurements of ``ember.engine.benchmark`` / ``ember bench``."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the bench package
import ember  # noqa: E402
from bench.e2e.shapes import SHAPES, config_dict, hf_config, write_config_folder  # noqa: E402
from ember.engine import benchmark  # noqa: E402
from ember.models.config import ModelConfig  # noqa: E402
from ember.models.llama import LlamaForCausalLM  # noqa: E402


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_have_the_same_parameters_in_ember_and_transformers(name):
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_hf(config_dict(name))
    with torch.device("meta"):
        ours = LlamaForCausalLM(config, max_positions=16)
        theirs = AutoModelForCausalLM.from_config(hf_config(name))
    ours_params = {n: p.shape for n, p in ours.named_parameters()}
    theirs_count = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == theirs_count
    assert config.tie_word_embeddings == ("lm_head.weight" not in ours_params)
    if name == "llama-3.2-1b":
        assert config.rope_scaling["rope_type"] == "llama3"


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """A config.json-only folder of a tiny Llama shape (random weights)."""
    folder = tmp_path_factory.mktemp("shape")
    cfg = {**config_dict("smollm2-135m"), "hidden_size": 64, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 2048}
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_measurements_on_a_tiny_random_model(tiny_random):
    llm = ember.LLM(tiny_random, load_format="dummy", num_kv_blocks=64)
    latency = benchmark.measure_latency(llm, input_len=12, output_len=6)
    assert latency["ttft_s"] > 0 and latency["decode_tok_s"] > 0
    assert latency["decode_steps"] == 5 and latency["spec_draft_tokens"] == 0
    # A given prompt that repeats itself: prompt-lookup drafts are verified.
    spec = ember.LLM(tiny_random, load_format="dummy", num_kv_blocks=64,
                     speculative={"num_speculative_tokens": 3})
    latency = benchmark.measure_latency(spec, output_len=12, prompt=[7, 8, 9, 10] * 4)
    assert latency["input_len"] == 16 and latency["spec_draft_tokens"] > 0
    assert latency["decode_steps"] <= 11
    assert not llm.has_unfinished_requests()
    result = benchmark.measure_throughput(llm, num_requests=6, min_len=3, max_len=9)
    assert result["requests"] == 6 and 18 <= result["output_tokens"] <= 54
    assert result["output_tok_s"] > 0 and result["peak_memory_gb"] is None


def test_cli_bench_prints_json(tiny_random, capsys):
    from ember import cli

    cli.main(["bench", "latency", "--model", tiny_random, "--load-format", "dummy",
              "--input-len", "8", "--output-len", "4", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["output_len"] == 4 and result["engine"]["num_kv_blocks"] > 0


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from ember import cli

    with pytest.raises(SystemExit, match="ember: error: model .* not found"):
        cli.main(["generate", "hi", "--model", str(tmp_path / "missing")])


def test_write_config_folder(tmp_path):
    folder = write_config_folder("llama-3-8b", tmp_path)
    config = ember.models.loader.Checkpoint(folder).config
    assert (config.hidden_size, config.num_layers, config.head_dim) == (4096, 32, 128)


def test_quantized_step_bytes(tiny_random):
    """e2e_quant's byte count: bf16-style parameters (here float32) plus int8 codes and float32
    scales of the 4 quantized projections of each of the 2 layers."""
    from bench.e2e.suite import _quantized_step_bytes, _weights

    plain = ember.LLM(tiny_random, load_format="dummy", num_kv_blocks=16)
    quantized = ember.LLM(tiny_random, load_format="dummy", num_kv_blocks=16, quantization="int8")
    # hidden 64, 4 heads x 16 (q 64, k/v 32 each), intermediate 64
    shapes = [(64 + 32 + 32, 64), (64, 64), (128, 64), (64, 64)]  # qkv, o, gate_up, down
    codes = sum(n * k for n, k in shapes) * 2
    scales = sum(n for n, _ in shapes) * 2 * 4
    linear_params = codes * 4  # the same weights in float32
    assert _quantized_step_bytes(quantized.model) == (
        _weights(plain.model)[0] - linear_params + codes + scales)
