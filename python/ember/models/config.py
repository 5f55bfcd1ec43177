"""ModelConfig: the architecture hyper-parameters the engine needs, read from a Hugging Face
``config.json`` or from GGUF metadata.

Llama, Mistral, Qwen2, Qwen3 and Mixtral are one decoder (``models/llama.py``) that differs only
in a few switches: QKV bias (Qwen2), per-head QK RMSNorm (Qwen3), sliding-window attention
(Mistral, Mixtral, Qwen2/3 ``layer_types``) and a sparse MoE MLP (Mixtral, ``models/moe.py``).
"""

from dataclasses import dataclass, field

import torch

# Hugging Face ``architectures`` entry -> our architecture name.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
}
# "freq_factors" (per-frequency divisors, how GGUF stores Llama 3 scaling) is ours, not HF's.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    ``layer_windows[i]`` is the sliding window of layer ``i`` in Hugging Face's sense (a query
    sees the ``window`` most recent keys, itself included) or ``None`` for full attention.
    ``rope_scaling`` is ``None`` or a dict with ``rope_type`` in ("linear", "llama3") and that
    type's parameters, as in ``config.json``, or ("freq_factors", ``factors``: one divisor per
    frequency) from a GGUF. ``num_experts`` > 0 makes every MLP a sparse MoE of that many
    SwiGLU experts of ``intermediate_size``, ``num_experts_per_tok`` of them per token.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    layer_windows: list = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    torch_dtype: torch.dtype | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"model config: {len(self.layer_windows)} layer windows for "
                             f"{self.num_layers} layers")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) "
                             f"must be in [1, num_local_experts = {self.num_experts}]")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_attention_heads ({self.num_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"model config: rope scaling type {kind!r} is not supported; "
                                 f"supported: {SUPPORTED_ROPE_TYPES}")
            self.rope_scaling = None if kind == "default" else {**self.rope_scaling,
                                                                "rope_type": kind}

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict, generation_config: dict | None = None) -> "ModelConfig":
        """From the dicts of ``config.json`` and (optionally) ``generation_config.json``.

        Reads both the transformers 4 layout (``rope_theta`` / ``rope_scaling`` at the top) and
        the transformers 5 one (``rope_parameters``).
        """
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None and cfg.get("model_type") in HF_ARCHITECTURES.values():
            arch = cfg["model_type"]
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; ember supports "
                f"{sorted(HF_ARCHITECTURES)}")
        try:
            num_heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            num_layers = cfg["num_hidden_layers"]
            rope = dict(cfg.get("rope_parameters") or {})
            rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling") or rope or None
            if scaling is not None:
                scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
                head_dim=cfg.get("head_dim") or hidden // num_heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has QKV bias; Llama/Qwen3 say so with attention_bias.
                attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                qk_norm=arch == "qwen3",
                rope_scaling=scaling,
                layer_windows=_hf_layer_windows(cfg, arch, num_layers),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_eos_ids(cfg, generation_config),
                torch_dtype=_hf_dtype(cfg.get("dtype") or cfg.get("torch_dtype")),
                num_experts=cfg["num_local_experts"] if arch == "mixtral" else 0,
                num_experts_per_tok=cfg["num_experts_per_tok"] if arch == "mixtral" else 0,
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing the field {e.args[0]!r}") from None


def _hf_layer_windows(cfg: dict, arch: str, num_layers: int) -> list:
    window = cfg.get("sliding_window")
    if arch in ("mistral", "mixtral"):
        return [window] * num_layers
    if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and window:
        # transformers 5 spells the per-layer choice out; older configs use max_window_layers.
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", num_layers) else
            "full_attention" for i in range(num_layers)]
        return [window if t == "sliding_attention" else None for t in types]
    if window and cfg.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    return [None] * num_layers


def _eos_ids(cfg: dict, generation_config: dict | None) -> list:
    """All EOS ids: generation_config.json's take precedence (instruct models list several)."""
    ids = []
    for source in (generation_config or {}, cfg):
        eos = source.get("eos_token_id")
        for tok in ([eos] if isinstance(eos, int) else eos or []):
            if tok not in ids:
                ids.append(tok)
    return ids


def _hf_dtype(name) -> torch.dtype | None:
    if not isinstance(name, str):
        return None
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}.get(name.removeprefix("torch."))
