"""The CUDA extension is built wherever nvcc is present (CI has nvcc but no GPU)."""

import importlib
import shutil

import pytest

import ember.ops


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_extension_built_when_nvcc_present():
    ext = importlib.import_module("ember._C")
    assert hasattr(ext, "store_kvcache")


def test_package_layout():
    # triton_kernels/ and neuron_kernels/ install as subpackages of ember.
    assert importlib.util.find_spec("ember.triton_kernels") is not None
    assert importlib.util.find_spec("ember.neuron_kernels") is not None
    assert "store_kvcache" in ember.ops.ops()
