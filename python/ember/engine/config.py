"""EngineConfig: the engine's knobs, validated once (ValueError naming the bad one)."""

from dataclasses import dataclass

import torch

from ember.engine.speculative import SpeculativeConfig
from ember.models.llama import check_quantization

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass
class EngineConfig:
    """Engine settings (vLLM's names).

    dtype: "auto" (float32 on CPU; on a GPU the checkpoint's fp16/bf16, else bfloat16) or one
        of DTYPES (or the torch dtype).
    device: "cuda" / "cpu" / a torch.device; None picks cuda when available.
    max_num_seqs: most sequences running at once.
    max_num_batched_tokens: most tokens computed per step (prompt chunks plus decodes).
    max_model_len: longest sequence (prompt + output); None: the model's context length, capped
        by what the KV cache holds.
    block_size: tokens per KV block (the kernels take multiples of 16).
    enable_prefix_caching: share KV blocks of common prompt prefixes.
    enable_chunked_prefill: split long prompts over steps and mix them with decodes; without
        it a prompt is prefilled whole (so max_num_batched_tokens >= max_model_len).
    enforce_eager: never capture CUDA graphs: a decode step launches the ops a graph would
        replay, one by one, on the same inputs (so eager and graph modes give the same bits).
    async_scheduling: while a decode step runs on the device, schedule and launch the next one
        (its input tokens are the running step's sampled ids, copied on the device), so the
        host's per-step work overlaps the GPU's; None turns it on for CUDA devices without
        speculative decoding (whose next step depends on how many drafts were accepted). Rows
        of requests that the running step finishes (EOS, stop strings) are computed once more
        and dropped.
    kernel_backend: ``backend=`` of every ember.ops call ("auto", "cuda", "triton", "torch").
    gpu_memory_utilization: fraction of GPU memory the engine may use (weights, activations
        and the KV cache).
    num_kv_blocks: KV blocks to allocate, overriding the memory-based sizing.
    kv_cache_memory_cpu: bytes of KV cache on CPU when num_kv_blocks is None.
    load_format: "auto" (read the weights) or "dummy" (random weights, for benchmarks).
    seed: seeds the per-request sampling seeds of requests that give none.
    quantization: None, or weight-only quantization of the linear layers once loaded: "int8"
        (a scale per output channel) or "int4" (a scale and zero point per group of input
        features), run by ember.ops.w8a16_gemm / w4a16_gemm.
    speculative: None, or speculative decoding settings (a dict of SpeculativeConfig's fields,
        e.g. ``{"method": "ngram", "num_speculative_tokens": 4}``; see speculative.py).
    kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (float8_e4m3fn with
        scales of 1.0, vLLM's default without calibrated scales: K/V values past +-448
        saturate); half the bytes of a bf16 cache, so twice the tokens in the same memory.
    """

    model: str
    dtype: str | torch.dtype = "auto"
    device: str | torch.device | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    kernel_backend: str = "auto"
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    kv_cache_memory_cpu: int = 2 << 30
    load_format: str = "auto"
    seed: int = 0
    quantization: str | None = None
    speculative: dict | SpeculativeConfig | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        self.speculative = SpeculativeConfig.from_arg(self.speculative)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "kv_cache_memory_cpu"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence "
                             f"decodes each step")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        check_quantization("quantization", self.quantization)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.kernel_backend not in ("auto", "cuda", "triton", "torch"):
            raise ValueError(f"kernel_backend must be 'auto', 'cuda', 'triton' or 'torch', got "
                             f"{self.kernel_backend!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is cuda but no CUDA GPU is available")
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device}")
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda" and self.speculative is None
        elif not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool or None, got "
                             f"{self.async_scheduling!r}")
        elif self.async_scheduling and self.speculative is not None:
            raise ValueError("async_scheduling cannot be combined with speculative decoding: "
                             "each step depends on how many drafts the last one accepted")
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device.type == "cpu":
            return torch.float32
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
