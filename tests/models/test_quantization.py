"""Weight-only quantization of the engine's linear layers (LLM(quantization="int8"|"int4")).

The oracle: the same model in float32 whose linear weights are the quantized weights'
dequantised values. Its greedy tokens must be the quantized engine's (the products differ only
in float32 rounding), which checks that every projection runs on its quantized weight, with
its own scales, and nothing else changed.
"""

import pytest
import torch
from tiny_checkpoints import TINY_VOCAB as VOCAB
from tiny_checkpoints import random_prompts, save_tiny_checkpoint

import ember
from ember.models.llama import Linear
from ember.ops import reference

GREEDY = ember.SamplingParams(temperature=0.0, max_tokens=24)

pytestmark = pytest.mark.usefixtures("one_thread")


def dequantized_copy(quantized: ember.LLM, plain: ember.LLM) -> None:
    """Load ``plain``'s linear weights with ``quantized``'s dequantised ones."""
    for name, module in quantized.model.named_modules():
        if isinstance(module, Linear) and module.quantization is not None:
            method, group_size = module.quantization
            if method == "int8":
                weight = reference.dequantize_int8(module.qweight, module.scale)
            else:
                weight = reference.dequantize_int4(module.qweight, module.scale, module.zeros,
                                                   group_size)
            plain.model.get_submodule(name).weight.copy_(weight)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_quantized_engine_matches_its_dequantized_weights(arch, method, tmp_path):
    save_tiny_checkpoint(tmp_path, arch, vocab_size=VOCAB, seed=7)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, VOCAB, [1, 17, 40], seed=8)]
    quantized = ember.LLM(str(tmp_path), num_kv_blocks=64, quantization=method)
    plain = ember.LLM(str(tmp_path), num_kv_blocks=64)
    layers = [m for m in quantized.model.modules() if isinstance(m, Linear)]
    quantized_layers = [m for m in layers if m.quantization is not None]
    # Every attention projection and dense MLP projection; not the LM head.
    per_layer = 2 if arch == "mixtral" else 4
    assert len(quantized_layers) == per_layer * quantized.model_config.num_layers
    assert quantized.model.lm_head.quantization is None
    with torch.no_grad():
        dequantized_copy(quantized, plain)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in quantized.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    # The quantized weights replace the float ones: int8 holds 1 byte per weight, int4 half.
    for module in quantized_layers:
        assert not hasattr(module, "weight")
        assert module.qweight.numel() == module.in_features * module.out_features // (
            1 if method == "int8" else 2)


def test_bad_quantization_settings(tmp_path):
    save_tiny_checkpoint(tmp_path / "ok", "llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="quantization must be None, 'int8' or 'int4'"):
        ember.LLM(str(tmp_path / "ok"), num_kv_blocks=8, quantization="int3")
    # int4 groups need input features divisible by 32 (this model's MLP has 40).
    save_tiny_checkpoint(tmp_path / "odd", "llama", vocab_size=VOCAB, intermediate_size=40)
    with pytest.raises(ValueError, match="int4 quantization needs input features divisible"):
        ember.LLM(str(tmp_path / "odd"), num_kv_blocks=8, quantization="int4")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_on_the_gpu(method, tmp_path):
    """On CUDA the projections run the Triton w8a16/w4a16 kernels: in float32 (full-precision
    products) the tokens are those of the dequantised float32 model; in bf16 with CUDA graphs
    the engine runs and fills its outputs."""
    save_tiny_checkpoint(tmp_path, "llama", vocab_size=VOCAB, seed=9)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, VOCAB, [3, 40], seed=10)]
    args = dict(device="cuda", num_kv_blocks=64, enforce_eager=True)
    quantized = ember.LLM(str(tmp_path), dtype="float32", quantization=method, **args)
    plain = ember.LLM(str(tmp_path), dtype="float32", **args)
    with torch.no_grad():
        dequantized_copy(quantized, plain)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in quantized.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    # CUDA graphs need a head dim the attention kernels take (the torch reference syncs).
    save_tiny_checkpoint(tmp_path / "d64", "llama", vocab_size=VOCAB, seed=9, head_dim=64)
    graphs = ember.LLM(str(tmp_path / "d64"), dtype="bfloat16", device="cuda", num_kv_blocks=64,
                       quantization=method)
    assert graphs.stats()["cuda_graph_batch_sizes"]
    outs = graphs.generate(prompts, GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24] * 4
