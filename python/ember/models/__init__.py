"""Decoder-only model definitions and checkpoint loaders.

``config`` (ModelConfig from config.json or GGUF metadata), ``llama`` (Llama / Mistral / Qwen2 /
Qwen3 written with ``ember.ops``), ``attention`` (paged attention of a flat batch), ``rope``
(rotary tables with Llama 3 scaling), ``loader`` (built-in aliases, Hugging Face folders,
GGUF files; weights and tokenizer) and ``gguf_file`` (GGUF reading through the gguf package).
"""
