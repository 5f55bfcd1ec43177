"""Data movement without compute: ``multi_copy`` (small transfers between pinned host memory
and the device) and ``prefetch_l2`` (warming the GPU's L2 cache with a constant tensor)."""

import torch

from ember.ops import _ext, _registry, reference
from ember.ops._validation import check_tensor

# prefetch_l2 requests whole 16-byte units of each row.
PREFETCH_UNIT_BYTES = 16
# Regions one kernel launch takes (kMaxCopyRegions in csrc/copy/multi_copy.h); more are split
# over several launches.
MAX_REGIONS_PER_LAUNCH = 8


def multi_copy(dsts, srcs, *, backend="auto"):
    """Copy ``srcs[i]`` into ``dsts[i]`` for every i: on CUDA, all of them in one kernel.

    Meant for the few kilobytes a decode step moves between host and device (its inputs from a
    pinned host buffer, its sampled token ids back): the CUDA kernel reads and writes pinned
    host memory itself, so each transfer is queued on the stream like any kernel instead of as
    a copy-engine operation, which on the H100 left 5-8 us of idle stream around each one.

    Args:
        dsts, srcs: sequences of equal length; ``dsts[i]`` and ``srcs[i]`` are tensors of the
            same shape and dtype, with at most 2 dims and a contiguous last dim (any row
            stride, so a column slice of a table is fine). Each is a CUDA tensor or pinned host
            memory (``tensor.is_pinned()``); the CUDA tensors share one device. Tensors all on
            the CPU (pinned or not) are copied with ``copy_``.
        backend: "auto", "cuda" or "torch".

    Destinations must not overlap one another or a source. Returns ``None``. The copies are
    ordered on the current CUDA stream, as ``copy_(non_blocking=True)`` is: synchronise with
    the stream (e.g. an event) before the host reads a destination in pinned memory.
    """
    op = "multi_copy"
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"{op}: dsts and srcs must have the same length, got {len(dsts)} and "
                         f"{len(srcs)}")
    devices = set()
    for i, (dst, src) in enumerate(zip(dsts, srcs, strict=True)):
        for name, t in ((f"dsts[{i}]", dst), (f"srcs[{i}]", src)):
            check_tensor(op, name, t, ndim=(0, 1, 2), last_dim_contiguous=True)
            if t.is_cuda:
                devices.add(t.device)
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"{op}: dsts[{i}] and srcs[{i}] must have the same shape and dtype, "
                             f"got {tuple(dst.shape)} {dst.dtype} and {tuple(src.shape)} "
                             f"{src.dtype}")
    if len(devices) > 1:
        raise ValueError(f"{op}: the CUDA tensors must share one device, got "
                         f"{sorted(map(str, devices))}")
    if not dsts:
        return
    device = devices.pop() if devices else torch.device("cpu")
    # Host tensors that are not pinned: the CUDA kernel's launcher raises a ValueError, from the
    # driver's answer about each host pointer (a check here would cost as much again per step).
    chosen = _registry.resolve(op, backend, device)
    if torch.compiler.is_compiling():
        torch.ops.ember.multi_copy(dsts, srcs, chosen)
    else:
        # Outside torch.compile the custom op's dispatch only adds host time (~25 us a call on
        # a CPU core, and a decode step makes two calls, outside its CUDA graph).
        _registry.implementation(op, chosen)(dsts, srcs)


@torch.library.custom_op("ember::multi_copy", mutates_args=("dsts",))
def _multi_copy_op(dsts: list[torch.Tensor], srcs: list[torch.Tensor], backend: str) -> None:
    _registry.implementation("multi_copy", backend)(dsts, srcs)


@_multi_copy_op.register_fake
def _(dsts, srcs, backend):
    return None


def _multi_copy_cuda(dsts, srcs):
    regions, device = [], None
    for dst, src in zip(dsts, srcs, strict=True):
        if dst.numel() == 0:
            continue
        device = device or (dst.device if dst.is_cuda else src.device)
        rows = dst.shape[0] if dst.dim() == 2 else 1
        row_bytes = (dst.shape[-1] if dst.dim() else 1) * dst.element_size()
        pitches = [t.stride(0) * t.element_size() if t.dim() == 2 else row_bytes
                   for t in (dst, src)]
        regions.append([dst.data_ptr(), src.data_ptr(), rows, row_bytes, *pitches,
                        int(not dst.is_cuda), int(not src.is_cuda)])
    if not regions:
        return
    stream = torch.cuda.current_stream(device).cuda_stream
    lib = _ext.load_extension()
    for start in range(0, len(regions), MAX_REGIONS_PER_LAUNCH):
        lib.multi_copy(regions[start:start + MAX_REGIONS_PER_LAUNCH], stream)


_registry.register("multi_copy", cuda=_multi_copy_cuda, torch=reference.multi_copy)


def prefetch_l2(t, prefix_bytes=None, *, backend="auto"):
    """Ask the GPU's L2 cache for the first ``prefix_bytes`` of every row of ``t``, without
    waiting for them: a hint, with no result (the torch backend, for CPU tensors, does nothing).

    Meant for a constant weight that a later kernel streams: queued after a latency-bound kernel
    (a decode step's attention), the request uses memory bandwidth that kernel leaves idle, and
    the GEMM after it starts on L2 hits. A GEMM's CTAs all start at the first columns and walk
    K, so a prefix of every row, not the first rows whole, is what they read first. On Hopper
    the CUDA kernel issues the requests before the kernels queued ahead of it finish
    (programmatic dependent launch), so ``t`` must not be written by any of them.

    Args:
        t: ``[rows, cols]`` CUDA tensor of any dtype with a contiguous last dim, rows and the
            row stride on 16-byte boundaries; or a 1-D contiguous tensor, one row.
        prefix_bytes: bytes of each row to request, a positive multiple of 16 at most the row's
            size; None for whole rows.
        backend: "auto", "cuda" or "torch".

    Returns ``None``. Prefetching more than the L2 holds (50 MB on the H100) only evicts the
    beginning again.

    Measured on an H100 (bench/prefetch_probe.py): after a 10 us idle gap, a cuBLAS GEMV over
    the Llama-3.2-1B gate/up weight took 21.5 instead of 23.0 us with 24 MB of it prefetched.
    The engine does not use it: in the 1B decode step, queued after the O projection it cost
    0.2%, before the attention 4.5%, and issued by the O projection's kernel 0.8%.
    """
    op = "prefetch_l2"
    check_tensor(op, "t", t, ndim=(1, 2), last_dim_contiguous=True)
    rows = t.shape[0] if t.dim() == 2 else 1
    row_bytes = t.shape[-1] * t.element_size()
    if prefix_bytes is None:
        prefix_bytes = row_bytes - row_bytes % PREFETCH_UNIT_BYTES
    if (isinstance(prefix_bytes, bool) or not isinstance(prefix_bytes, int)
            or not 0 < prefix_bytes <= row_bytes or prefix_bytes % PREFETCH_UNIT_BYTES):
        raise ValueError(f"{op}: prefix_bytes must be a positive multiple of "
                         f"{PREFETCH_UNIT_BYTES} of at most a row's {row_bytes} bytes, got "
                         f"{prefix_bytes!r}")
    pitch = t.stride(0) * t.element_size() if t.dim() == 2 else row_bytes
    chosen = _registry.resolve(op, backend, t.device)
    _registry.implementation(op, chosen)(t, rows, pitch, prefix_bytes)


def _prefetch_l2_cuda(t, rows, pitch, prefix_bytes):
    # The launcher rejects rows off 16-byte boundaries (a ValueError).
    if t.numel():
        _ext.load_extension().prefetch_l2(t.data_ptr(), rows, pitch, prefix_bytes,
                                          _ext.stream_of(t))


_registry.register("prefetch_l2", cuda=_prefetch_l2_cuda, torch=reference.prefetch_l2)
