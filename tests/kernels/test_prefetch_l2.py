"""prefetch_l2: a hint that warms the L2 cache with the leading bytes of every row of a tensor.

It has no result to compare, so the tests check what it must not do: change the tensor, break
the order of the kernels around it (the CUDA kernel is launched early under programmatic
dependent launch and must still hold back the kernels after it until those before it are done),
or accept arguments it cannot honour.
"""

import pytest
import torch

import ember

cuda = pytest.mark.cuda


def test_torch_backend_leaves_the_tensor_alone():
    t = torch.randn(6, 40)
    before = t.clone()
    assert ember.ops.prefetch_l2(t, 64) is None
    assert ember.ops.prefetch_l2(t) is None
    assert torch.equal(t, before)


@pytest.mark.parametrize("prefix, message", [
    (0, "positive multiple of 16"),
    (24, "positive multiple of 16"),
    (176, "at most a row's 160 bytes"),
    (True, "positive multiple of 16"),
    (32.0, "positive multiple of 16"),
])
def test_bad_prefix_raises(prefix, message):
    with pytest.raises(ValueError, match=message):
        ember.ops.prefetch_l2(torch.zeros(3, 40), prefix)


@pytest.mark.parametrize("t, message", [
    (torch.zeros(2, 3, 8), "1 or 2 dims"),
    (torch.zeros(8, 16).t(), "contiguous last dim"),
    ([1.0, 2.0], "must be a torch.Tensor"),
])
def test_bad_tensor_raises(t, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ember.ops.prefetch_l2(t)


@cuda
@pytest.mark.parametrize("shape, prefix", [
    ((16384, 2048), 1536), ((33, 520), 1040), ((7, 96), 16), ((1000,), None)])
def test_cuda_kernel_leaves_the_tensor_alone(shape, prefix):
    t = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    before = t.clone()
    ember.ops.prefetch_l2(t, prefix, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(t, before)


@cuda
def test_cuda_kernel_takes_row_slices_with_a_stride():
    table = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    before = table.clone()
    ember.ops.prefetch_l2(table[3:50, :128], 256, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(table, before)


@cuda
def test_cuda_kernel_rejects_rows_off_16_byte_boundaries():
    t = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte boundaries"):
        ember.ops.prefetch_l2(t[:, 1:], 32, backend="cuda")


@cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_kernels_after_it_wait_for_the_kernels_before_it(graph):
    # A slow ember kernel produces y, the prefetch follows, and a skinny GEMM that may start
    # early (static weight) consumes y. If the prefetch let its dependents go before its own
    # predecessor finished, the consumer would read y's memory before y was written: the
    # allocator hands the producer a block just filled with NaNs.
    torch.manual_seed(0)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    w_slow = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) / 90
    w_next = torch.randn(512, 8192, device="cuda", dtype=torch.bfloat16) / 90
    expected = ember.ops.skinny_linear(ember.ops.skinny_linear(x, w_slow), w_next)

    def chain():
        torch.full((1, 8192), float("nan"), device="cuda", dtype=torch.bfloat16)  # freed again
        y = ember.ops.skinny_linear(x, w_slow, static_weight=True, backend="cuda")
        ember.ops.prefetch_l2(w_next, 1024, backend="cuda")
        return ember.ops.skinny_linear(y, w_next, static_weight=True, backend="cuda")

    if graph:
        chain()  # warm-up outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain()
        for _ in range(20):
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected)
    else:
        for _ in range(20):
            assert torch.equal(chain(), expected)
