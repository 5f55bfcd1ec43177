"""Tiny random checkpoints of each supported architecture, saved the way Hugging Face saves
them (config.json + safetensors), and transformers' greedy decoding as the oracle.

Imported by the conftest files of tests/models and tests/engine.
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
)

TINY_VOCAB = 300

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              # Larger than the default 0.02 so greedy choices are not near-ties.
              initializer_range=0.15, bos_token_id=None, eos_token_id=None, pad_token_id=None)

ARCHITECTURES = {
    # Llama 3.1 rope scaling and tied embeddings.
    "llama": (LlamaConfig, dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen2": (Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=5000.0))),
    # head_dim decoupled from hidden_size / heads, and per-head QK norm.
    "qwen3": (Qwen3Config, dict(head_dim=24)),
    # Sliding window shorter than the tests' sequences.
    "mistral": (MistralConfig, dict(sliding_window=12, head_dim=16)),
    # Sparse MoE MLP: 4 experts, 2 per token.
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def save_tiny_checkpoint(folder, arch: str, vocab_size: int = TINY_VOCAB, seed: int = 0,
                         **overrides):
    """Save a random ``arch`` model to ``folder``; returns the transformers model (float32)."""
    config_cls, extra = ARCHITECTURES[arch]
    config = config_cls(vocab_size=vocab_size, **{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if arch == "qwen2":  # its biases start at zero; make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt_ids: list, max_new_tokens: int) -> list:
    """transformers' greedy continuation of one prompt (stops early only at its EOS ids)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        # An explicit mask: otherwise transformers masks prompt tokens equal to the pad id.
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(count: int, vocab_size: int, lengths, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(count)]
