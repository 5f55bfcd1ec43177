"""The inference engine: scheduler, block manager, model runner and the LLM facade.

One file per job: ``config`` (EngineConfig), ``sampling_params``, ``sequence`` (request state),
``block_manager`` (paged KV blocks, prefix cache), ``scheduler`` (continuous batching, chunked
prefill, preemption), ``model_runner`` (flat batch metadata, KV cache, CUDA graphs),
``sampler``, ``detokenizer`` (incremental text, stop strings), ``outputs`` and ``llm`` (LLM).
"""

from ember.engine.llm import LLM
from ember.engine.outputs import CompletionOutput, RequestOutput
from ember.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
