"""Engine tests run on a tiny random Llama saved as a Hugging Face folder."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_checkpoints import save_tiny_checkpoint  # noqa: E402

import ember  # noqa: E402


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every engine test runs the tiny model on one thread (see tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """``(folder, transformers model)`` of a tiny random Llama without EOS ids."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_checkpoint(folder, "llama")
    return folder, model


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_llm(request, tiny_llama):
    """``make_llm(**engine_args)``: an LLM on the tiny Llama (CPU, float32 by default). Every
    test using it runs twice: without and with async scheduling (which CUDA turns on by
    default; on CPU it is exercised here)."""

    def make(**kwargs):
        kwargs.setdefault("num_kv_blocks", 256)
        kwargs.setdefault("async_scheduling", request.param)
        return ember.LLM(str(tiny_llama[0]), **kwargs)

    return make
