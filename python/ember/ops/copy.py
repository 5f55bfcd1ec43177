"""Small transfers between pinned host memory and the device: ``multi_copy``."""

import torch

from ember.ops import _ext, _registry, reference
from ember.ops._validation import check_tensor

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
