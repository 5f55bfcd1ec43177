"""Model shapes of the end-to-end benchmarks, as Hugging Face ``config.json`` dicts.

Decode speed depends on the shapes only, so the Llama shapes run with random weights
(``load_format="dummy"``); SmolLM2 runs from its GGUF when the ``gguf`` package is present.
"""

import json
from pathlib import Path

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    # SmolLM2-135M-Instruct (the built-in model).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                         rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
}


def config_dict(name: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **SHAPES[name]}


def hf_config(name: str):
    """The same shape as a transformers LlamaConfig (transformers 5 names rope settings
    ``rope_parameters``)."""
    from transformers import LlamaConfig

    cfg = config_dict(name)
    rope = {"rope_type": "default", **cfg.pop("rope_scaling", {}), "rope_theta": cfg["rope_theta"]}
    return LlamaConfig(**cfg, rope_parameters=rope)


def write_config_folder(name: str, root: Path) -> str:
    """A folder holding only ``config.json``: enough for ``load_format="dummy"``."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict(name), indent=1))
    return str(folder)
