"""GGUF checkpoints: configuration from the metadata, weights dequantised to float32 under
Hugging Face tensor names, so they go through the same ``load_weights`` as safetensors.

Reading and dequantisation belong to the ``gguf`` package. llama.cpp's converter stores the
Q and K projection rows of Llama models permuted (each head's two rotary halves interleaved, for
its GPT-J style rope kernel); we rotate in the Neox/Hugging Face style, so they are un-permuted.
Qwen2/Qwen3 GGUFs are stored unpermuted.
"""

import os
from collections.abc import Iterator

import numpy as np
import torch

from ember.models.config import ModelConfig

# GGUF architecture -> ours (llama.cpp also writes Mistral checkpoints as "llama").
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                  "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` over ``path``; ValueError if it is not a readable GGUF file."""
    gguf = _gguf()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on damaged files
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") \
            from None


def _field(reader, key: str, default=None):
    """A scalar or string metadata value (the field layout is stable across gguf versions)."""
    gguf = _gguf()
    field = reader.fields.get(key)
    if field is None:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def gguf_config(reader, path: str) -> ModelConfig:
    """The ModelConfig described by the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; ember supports "
                         f"{sorted(GGUF_ARCHITECTURES)}")

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    if _field(reader, f"{arch}.expert_count", 0):
        raise ValueError(f"{path}: MoE GGUF files (Mixtral) are not supported; load the "
                         f"Hugging Face folder instead")
    hidden, num_heads = meta("embedding_length"), meta("attention.head_count")
    names = {t.name for t in reader.tensors}
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    if "rope_freqs.weight" in names:
        # Llama 3.1+ GGUFs carry the rope scaling as per-frequency divisors.
        (freqs,) = (t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "freq_factors", "factors": freqs.data.astype(np.float32).tolist()}
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_layers=meta("block_count"),
        num_heads=num_heads,
        num_kv_heads=meta("attention.head_count_kv", num_heads),
        head_dim=meta("attention.key_length", hidden // num_heads),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon"),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=meta("context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_scaling=scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(e for e in eos if e is not None)),
        torch_dtype=None,
    )


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    Per head, llama.cpp stores row ``2*i + r`` for Hugging Face's row ``r*half + i`` (``half``
    = head_dim / 2, ``r`` in {0, 1}); we read the ``(i, r)`` grid back as ``(r, i)``.
    """
    rows_per_head = w.shape[0] // num_heads
    grid = w.reshape(num_heads, rows_per_head // 2, 2, *w.shape[1:])
    return grid.transpose(1, 2).reshape(w.shape)


def gguf_weights(reader, config: ModelConfig) -> Iterator:
    """``(hf_name, float32 tensor)`` for every tensor, dequantised one at a time."""
    gguf = _gguf()
    permuted = config.architecture == "llama"
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # part of the config (rope scaling), not a parameter
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        tensor = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy
        name = hf_name(t.name)
        if permuted and ".q_proj." in name:
            tensor = unpermute_rope_rows(tensor, config.num_heads)
        elif permuted and ".k_proj." in name:
            tensor = unpermute_rope_rows(tensor, config.num_kv_heads)
        yield name, tensor


def gguf_tokenizer(reader, path: str):
    """The tokenizer (with its chat template) that transformers builds from the GGUF, or
    None if the file has no vocabulary."""
    from transformers import AutoTokenizer

    if "tokenizer.ggml.model" not in reader.fields:
        return None
    folder, name = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)
