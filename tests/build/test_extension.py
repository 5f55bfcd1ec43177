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


# Every op of DESIGN.md §2, each with at least its torch reference.
DESIGN_OPS = """
flash_attn_func flash_attn_varlen_func flash_attn_with_kvcache store_kvcache merge_attn_states
moe_align grouped_gemm fused_moe quantize_int8 w8a16_gemm quantize_int4 w4a16_gemm quantize_fp8
fp8_gemm prune_24 compress_24 sparse24_gemm rms_norm fused_add_rms_norm rotary_embedding
silu_and_mul sample speculative_accept
""".split()


def test_every_design_op_is_public_and_has_a_reference():
    from ember.ops import reference

    for name in DESIGN_OPS:
        assert callable(getattr(ember.ops, name)), name
        assert callable(getattr(reference, name)), name
        assert "torch" in ember.ops.available_backends(name), name
