"""ember.ops: the public kernel API, and the only entry point to kernels.

Every op has a torch reference (``ember.ops.reference``) and up to three hand-written backends
(``cuda``, ``triton``, ``nki``), chosen by the ``backend=`` keyword ("auto" by default, or the
``EMBER_BACKEND`` environment variable); ``available_backends(op)`` lists what can run here,
``resolve_backend(op, backend, device)`` names the one a call would take.

How an op module is laid out (see kvcache.py):
1. the public function: docstring with shapes and dtypes, validation through _validation.py,
   ``_registry.resolve`` for the backend, then the ``torch.ops.ember.<op>`` custom op;
2. the ``torch.library.custom_op`` and its fake implementation (torch.compile, CUDA graphs);
3. ``_registry.register(op, cuda=..., triton="module:function", torch=...)``.
"""

from ember.ops._registry import available_backends, ops
from ember.ops._registry import resolve as resolve_backend
from ember.ops._validation import skip_value_checks
from ember.ops.activation import silu_and_mul
from ember.ops.attention import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    merge_attn_states,
)
from ember.ops.copy import multi_copy, prefetch_l2
from ember.ops.kvcache import store_kvcache
from ember.ops.linear import skinny_linear
from ember.ops.moe import fused_moe, grouped_gemm, moe_align
from ember.ops.norm import fused_add_rms_norm, rms_norm
from ember.ops.quant import (
    fp8_gemm,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    w4a16_gemm,
    w8a16_gemm,
)
from ember.ops.rotary import rotary_embedding, rotary_embedding_and_store_kvcache
from ember.ops.sampling import sample, speculative_accept
from ember.ops.sparse import compress_24, prune_24, sparse24_gemm

__all__ = [
    "available_backends",
    "resolve_backend",
    "skip_value_checks",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "merge_attn_states",
    "ops",
    "store_kvcache",
    # Dense linear layers
    "skinny_linear",
    # MoE
    "fused_moe",
    "grouped_gemm",
    "moe_align",
    # Quantized GEMMs
    "fp8_gemm",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "w4a16_gemm",
    "w8a16_gemm",
    # 2:4 sparsity
    "compress_24",
    "prune_24",
    "sparse24_gemm",
    # Engine glue
    "fused_add_rms_norm",
    "multi_copy",
    "prefetch_l2",
    "rms_norm",
    "rotary_embedding",
    "rotary_embedding_and_store_kvcache",
    "silu_and_mul",
    # Sampling
    "sample",
    "speculative_accept",
]
