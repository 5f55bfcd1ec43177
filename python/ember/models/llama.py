"""The Llama decoder, also covering Mistral, Qwen2 (QKV bias), Qwen3 (per-head QK RMSNorm) and
Mixtral (a sparse MoE MLP, ``models/moe.py``).

Written with ``ember.ops`` over a flat batch of tokens (no batch/padding dimension): the model
runner hands in token ids, their positions, the attention metadata of the step and the paged KV
cache of every layer. Q/K/V and gate/up are single fused projections; ``load_weights`` stacks
Hugging Face's separate ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` into them,
and Mixtral's per-expert ``w1``/``w3``/``w2`` into the experts' stacked weights.
"""

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ember import ops
from ember.models.attention import AttentionMetadata, paged_attention
from ember.models.config import ModelConfig
from ember.models.moe import SparseMoeBlock
from ember.models.rope import cos_sin_cache
from ember.ops.linear import SKINNY_K_MULTIPLE

# Hugging Face projection name -> (our fused parameter, shard index inside it).
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Weight-only quantization of the decoder's linear layers (LLM(quantization=...)).
QUANTIZATION_METHODS = ("int8", "int4")


def check_quantization(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is None or one of QUANTIZATION_METHODS."""
    if value is not None and value not in QUANTIZATION_METHODS:
        choices = ["None", *map(repr, QUANTIZATION_METHODS)]
        raise ValueError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got "
                         f"{value!r}")

INT4_GROUP_SIZES = (128, 64, 32)
# Mixtral's MoE tensors: layers.{i}.block_sparse_moe.gate.weight (the router) and
# layers.{i}.block_sparse_moe.experts.{e}.{w1,w2,w3}.weight.
MOE_TENSOR = re.compile(r"(layers\.\d+)\.block_sparse_moe\."
                        r"(?:gate\.weight|experts\.(\d+)\.(w[123])\.weight)")


class Linear(nn.Linear):
    """``nn.Linear`` whose single-row calls on CUDA (a batch-1 decode step) go through
    ``ember.ops.skinny_linear``; other batches use torch's matmul.

    ``forward(x, activation="silu_and_mul")`` takes ``[gate | up]`` and applies
    ``silu_and_mul`` first (fused into the skinny kernel's prologue). The weights are constant
    during inference, hence ``static_weight``: under programmatic dependent launch the kernel
    streams its weight while the kernel before it still runs. On the H100, Llama-3.2-1B shape
    (bench/skinny_gemm_probe.py, graph-timed, weights past the L2), the skinny kernels against
    cuBLAS at one row: QKV 5.6 / 7.2 us, gate/up 24.3 / 25.1, down with silu 14.1 / 18.2 (silu
    then cuBLAS), LM head 169 / 188.

    ``skinny_decode=False`` keeps a layer's single-row calls on cuBLAS: the attention's output
    projection. Launched early behind the decode attention (a latency-bound kernel on a few
    SMs), the skinny kernel's weight traffic and resident CTAs cost the attention more than
    they save: 1B decode step, QKV, gate/up and down on the skinny kernels, O projection on
    ember's bulk kernel 838 tok/s, on cuBLAS 866-870 (session 22; the prefetch probe of
    session 21 found the same for any weight traffic issued during the attention).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, backend: str,
                 skinny_decode: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend
        self.skinny = (skinny_decode and backend in ("auto", "cuda")
                       and "cuda" in ops.available_backends("skinny_linear")
                       and in_features % SKINNY_K_MULTIPLE == 0)
        self.quantization = None  # or (method, group size), set by ``quantize``

    def quantize(self, method: str) -> None:
        """Replace the weight by its weight-only quantization: "int8" (a scale per output
        channel) or "int4" (a scale and zero point per group of the largest of 128, 64, 32
        input features that divides them); the products then run on w8a16_gemm/w4a16_gemm."""
        weight = self.weight.detach()
        if method == "int8":
            group_size = None
            qweight, scale = ops.quantize_int8(weight, backend=self.backend)
            self.register_buffer("qweight", qweight)
            self.register_buffer("scale", scale)
        else:
            group_size = next((g for g in INT4_GROUP_SIZES if self.in_features % g == 0), None)
            if group_size is None:
                raise ValueError(f"int4 quantization needs input features divisible by one of "
                                 f"{INT4_GROUP_SIZES}, got {self.in_features}")
            packed, scales, zeros = ops.quantize_int4(weight, group_size, backend=self.backend)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scales)
            self.register_buffer("zeros", zeros)
        del self.weight
        self.quantization = (method, group_size)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        if self.quantization is not None:
            if activation == "silu_and_mul":
                x = ops.silu_and_mul(x, backend=self.backend)
            method, group_size = self.quantization
            if method == "int8":
                out = ops.w8a16_gemm(x, self.qweight, self.scale, backend=self.backend)
            else:
                out = ops.w4a16_gemm(x, self.qweight, self.scale, self.zeros, group_size,
                                     backend=self.backend)
            return out if self.bias is None else out + self.bias
        if (self.skinny and x.shape[0] == 1 and x.is_cuda
                and x.dtype in (torch.float16, torch.bfloat16)):
            return ops.skinny_linear(x, self.weight, self.bias, activation=activation,
                                     static_weight=True, backend="cuda")
        if activation == "silu_and_mul":
            x = ops.silu_and_mul(x, backend=self.backend)
        return F.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """A Linear whose output rows are several projections stacked (``shard_sizes`` rows each)."""

    def __init__(self, in_features: int, shard_sizes: list, bias: bool, backend: str):
        super().__init__(in_features, sum(shard_sizes), bias, backend)
        self.shard_sizes = list(shard_sizes)

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.shard_sizes[:index])
        return param.narrow(0, start, self.shard_sizes[index])


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``rms_norm(x)``, or with ``residual``: ``(rms_norm(x + residual), x + residual)``."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = FusedLinear(config.hidden_size,
                                    [config.q_size, config.kv_size, config.kv_size],
                                    bias=config.attention_bias, backend=backend)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False, backend=backend,
                             skinny_decode=False)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, backend)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, backend)
        self.scale = config.head_dim ** -0.5
        self.window = window
        self.backend = backend

    def forward(self, positions, x, meta: AttentionMetadata, kv_cache, cos_sin):
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = paged_attention(positions, q, k, v, kv_cache, cos_sin, meta,
                              softmax_scale=self.scale, window=self.window, backend=self.backend)
        return self.o_proj(out.reshape(n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = FusedLinear(config.hidden_size, [size, size], bias=False,
                                        backend=backend)
        self.down_proj = Linear(size, config.hidden_size, bias=False, backend=backend)

    def forward(self, x):
        return self.down_proj(self.gate_up_proj(x), activation="silu_and_mul")


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None, backend: str):
        super().__init__()
        self.self_attn = LlamaAttention(config, window, backend)
        if config.num_experts:
            self.mlp = SparseMoeBlock(config.hidden_size, config.intermediate_size,
                                      config.num_experts, config.num_experts_per_tok, backend)
        else:
            self.mlp = LlamaMLP(config, backend)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)

    def forward(self, positions, x, residual, meta, kv_cache, cos_sin):
        # The residual stream is carried separately so each norm fuses the preceding add.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, kv_cache, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Decoder over a flat batch.

    ``forward(input_ids, positions, meta, kv_caches)``: input_ids and positions int64
    ``[num_tokens]``; ``kv_caches[i]`` the KVCache of layer ``i``; returns the
    final hidden states ``[num_tokens, hidden]``. ``compute_logits(hidden)`` gives ``[rows,
    vocab]`` in the weights' dtype. ``max_positions`` bounds the rotary table (the engine's
    max_model_len).
    """

    def __init__(self, config: ModelConfig, max_positions: int, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, config.layer_windows[i], backend)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, backend=backend)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Angles in float32, cos/sin rounded to the weights' dtype as transformers does.
        table = cos_sin_cache(config, max_positions).to(self.embed_tokens.weight.dtype)
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, meta, kv_cache, self.cos_sin_cache)
        x, _ = self.norm(x, residual)
        return x

    def quantize(self, method: str) -> None:
        """Weight-only quantization ("int8" or "int4", see ``Linear.quantize``) of every layer's
        attention and dense MLP projections; the embedding, the LM head, the norms and MoE
        experts keep the model's dtype."""
        check_quantization("quantization", method)
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, Linear):
                    module.quantize(method)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the weights' dtype: the sampler reads bf16/fp16 logits in float32 itself, so a
        # float32 copy of a 128k-token row would be one more kernel per step for nothing.
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable) -> None:
        """Copy Hugging Face-named tensors ``(name, tensor)`` into the parameters.

        Raises ValueError on an unknown name, a shape mismatch or a parameter left unset.
        """
        params = dict(self.named_parameters())
        # Every (parameter, shard) that a checkpoint tensor fills; shard None is a whole
        # parameter.
        pieces = set()
        for pname in params:
            owner_name, _, short = pname.rpartition(".")
            pieces.update((pname, shard) for shard in _shards(self.get_submodule(owner_name),
                                                              short))
        unset = set(pieces)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the head anyway
            target, shard = _destination(name)
            if (target, shard) not in pieces:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a "
                                 f"{self.config.architecture} model")
            param = params[target]
            if shard is not None:
                param = self.get_submodule(target.rpartition(".")[0]).shard(param, shard)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            unset.discard((target, shard))
        if unset:
            names = sorted(f"{p}[shard {s}]" if s is not None else p for p, s in unset)
            raise ValueError(f"checkpoint lacks tensors for {names[:8]} ({len(names)} unset)")


def _destination(name: str) -> tuple:
    """``(our parameter name, shard or None)`` that the Hugging Face tensor ``name`` fills."""
    for hf_proj, (fused, index) in STACKED_PROJECTIONS.items():
        if f".{hf_proj}." in name:
            return name.replace(f".{hf_proj}.", f".{fused}."), index
    moe = MOE_TENSOR.fullmatch(name)
    if moe is None:
        return name, None
    layer, expert, proj = moe.groups()
    if expert is None:
        return f"{layer}.mlp.gate.weight", None
    stacked, half = SparseMoeBlock.EXPERT_PROJECTIONS[proj]
    return f"{layer}.mlp.{stacked}", (int(expert), half)


def _shards(owner: nn.Module, param_name: str) -> list:
    """The pieces of parameter ``param_name`` of ``owner`` that checkpoint tensors fill."""
    if isinstance(owner, FusedLinear):
        return list(range(len(owner.shard_sizes)))
    if isinstance(owner, SparseMoeBlock) and param_name in ("w13", "w2"):
        return owner.shards(param_name)
    return [None]

