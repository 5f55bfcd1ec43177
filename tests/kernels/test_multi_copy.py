"""multi_copy: several copies between device memory and pinned host memory in one launch.

Each test fills the destinations with a poison pattern and the sources with fresh random bytes,
then compares bit for bit (a copy has no tolerance). The CUDA kernel is checked in every
direction (pinned host -> device, device -> pinned host, device -> device), on 2-D column slices
with row strides (a block table's used columns), on sizes and offsets that are not multiples of
16 bytes (its byte path), and with more regions than one launch takes.
"""

import pytest
import torch

import ember

cuda = pytest.mark.cuda


def random_bytes(shape, dtype, device="cpu", pin=False):
    raw = torch.randint(0, 256, (*shape, torch.empty((), dtype=dtype).element_size()),
                        dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape).to(device)
    return t.pin_memory() if pin else t


def same_bytes(a, b):
    """Bitwise equality (random bytes may spell NaNs, which compare unequal as floats)."""
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


def poison(t):
    return t.fill_(-7)


def test_cpu_tensors_copy_with_the_torch_backend():
    src = [random_bytes((5, 9), torch.int32), random_bytes((13,), torch.float16),
           random_bytes((), torch.int64)]
    dst = [poison(torch.empty_like(s)) for s in src]
    ember.ops.multi_copy(dst, src)
    for d, s in zip(dst, src, strict=True):
        assert same_bytes(d, s)


def test_column_slices_keep_the_rest_of_the_table():
    table = torch.arange(40, dtype=torch.int32).reshape(5, 8)
    src = torch.full((5, 8), -1, dtype=torch.int32)
    ember.ops.multi_copy([table[1:4, :3]], [src[1:4, :3]])
    expected = torch.arange(40, dtype=torch.int32).reshape(5, 8)
    expected[1:4, :3] = -1
    assert torch.equal(table, expected)


@pytest.mark.parametrize("case, message", [
    ("length", "same length"),
    ("shape", "same shape and dtype"),
    ("dtype", "same shape and dtype"),
    ("ndim", "0 or 1 or 2 dims"),
    ("last_dim", "contiguous last dimension"),
    ("type", "must be a torch.Tensor"),
])
def test_bad_arguments_raise(case, message):
    a, b = torch.zeros(4, 6), torch.zeros(4, 6)
    args = {
        "length": ([a, b], [a]),
        "shape": ([a], [b[:3]]),
        "dtype": ([a], [b.double()]),
        "ndim": ([a.view(2, 2, 6)], [b.view(2, 2, 6)]),
        "last_dim": ([a.t()], [b.t()]),
        "type": ([a], [[1.0] * 24]),
    }[case]
    with pytest.raises((ValueError, TypeError), match=message):
        ember.ops.multi_copy(*args)


@cuda
def test_pageable_host_memory_with_cuda_tensors_raises():
    with pytest.raises(ValueError, match="pinned"):
        ember.ops.multi_copy([torch.zeros(8, device="cuda")], [torch.ones(8)])


@cuda
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_every_direction_and_layout(backend):
    if backend not in ember.ops.available_backends("multi_copy"):
        pytest.skip(f"no {backend} backend here")
    dev = "cuda"
    # (destination, source): aligned and odd sizes, 2-D column slices, a 0-d tensor.
    host_table = random_bytes((9, 100), torch.int32, pin=True)
    dev_table = poison(torch.empty(9, 100, dtype=torch.int32, device=dev))
    pairs = [
        (poison(torch.empty(3, 257, dtype=torch.int64, device=dev)),
         random_bytes((3, 257), torch.int64, pin=True)),                        # host -> device
        (poison(torch.empty(1000, dtype=torch.uint8, pin_memory=True))[1:],
         random_bytes((999,), torch.uint8, dev)),                       # device -> host, odd size
        (poison(torch.empty(7, 5, dtype=torch.float16, device=dev)),
         random_bytes((7, 5), torch.float16, dev)),                             # device -> device
        (dev_table[:7, :13], host_table[:7, :13]),                              # strided columns
        (poison(torch.empty((), dtype=torch.float32, device=dev)),
         random_bytes((), torch.float32, pin=True)),                            # 0-d
        (poison(torch.empty(0, dtype=torch.int32, device=dev)),
         torch.empty(0, dtype=torch.int32, pin_memory=True)),                   # empty
    ]
    untouched = dev_table.clone()
    ember.ops.multi_copy([d for d, _ in pairs], [s for _, s in pairs], backend=backend)
    torch.cuda.synchronize()
    for i, (d, s) in enumerate(pairs):
        assert same_bytes(d, s), f"pair {i}"
    outside = torch.ones(9, 100, dtype=torch.bool)
    outside[:7, :13] = False
    assert torch.equal(dev_table[outside], untouched[outside])


@cuda
def test_more_regions_than_one_launch():
    n = ember.ops.copy.MAX_REGIONS_PER_LAUNCH * 2 + 3
    srcs = [random_bytes((i + 1, 17), torch.int16, pin=True) for i in range(n)]
    dsts = [poison(torch.empty_like(s, device="cuda")) for s in srcs]
    ember.ops.multi_copy(dsts, srcs)
    torch.cuda.synchronize()
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d.cpu(), s)


@cuda
def test_ordered_on_the_stream_and_capturable():
    # A kernel writes the source just before; the copy must see its result, inside a graph too.
    src = torch.zeros(4096, dtype=torch.float32, device="cuda")
    host = torch.empty(4096, dtype=torch.float32, pin_memory=True)
    value = torch.zeros((), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        src.copy_(value.expand(4096) + torch.arange(4096, device="cuda"))
        ember.ops.multi_copy([host], [src])
    for step in (3.0, -11.0):
        value.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(host, step + torch.arange(4096, dtype=torch.float32))
