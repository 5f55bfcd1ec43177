"""flash_attn_func and flash_attn_varlen_func (prefill attention): every backend against the
torch reference, and the errors of the public functions.

Tolerance: flash-attn's rule (helpers.assert_within_lowp_error) against the reference run in
float32 (upcast=True), relative to the reference run in the input dtype (upcast=False). The LSE
is compared with the float32 reference's to a tight absolute tolerance, its -inf rows exactly.

Inputs are slices of fused QKV projection buffers (strided tokens and heads) whose rows past
each sequence hold NaN, so a kernel that reads beyond a length shows NaNs; outputs are poisoned
(every float tensor the op allocates starts as NaN), so an unwritten element shows too.
"""

from typing import NamedTuple

import pytest
import torch
from helpers import assert_within_lowp_error, backends_to_test

import ember
from ember.ops import reference

# The kernels accumulate QK^T and the exponential sums in float32 like the float32 reference;
# only summation order and exp2/log2 rounding differ.
LSE_ATOL = 2e-4


def _backends(op):
    # On CPU the Triton interpreter, plus the torch backend (the reference behind the public
    # API's plumbing); on a GPU both kernel backends.
    return backends_to_test(op, cpu_backends=("torch", "triton"), gpu_backends=("cuda", "triton"))


def _skip_unimplemented(op, backend):
    if backend not in ember.ops.available_backends(op):
        pytest.skip(f"{op} has no {backend} backend")


def projections(lead, len_q, len_k, heads_q, heads_kv, head_dim, dtype, device,
                contiguous=False):
    """q ``[*lead, len_q, hq, d]`` and k/v ``[*lead, len_k, hkv, d]`` sliced out of fused QKV
    projection buffers (token stride ``(hq + 2 hkv) * d``), with NaN in the rows past each
    length; ``contiguous`` copies them out instead."""
    width = heads_q + 2 * heads_kv
    q_proj = torch.randn(*lead, len_q + 3, width, head_dim, device=device, dtype=dtype)
    kv_proj = torch.randn(*lead, len_k + 3, width, head_dim, device=device, dtype=dtype)
    q_proj[..., len_q:, :, :] = float("nan")
    kv_proj[..., len_k:, :, :] = float("nan")
    q = q_proj[..., :len_q, :heads_q, :]
    k = kv_proj[..., :len_k, heads_q:heads_q + heads_kv, :]
    v = kv_proj[..., :len_k, heads_q + heads_kv:, :]
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def check_result(out, lse, ref_out, ref_lse, lowp_out, q, token_dim):
    """Output within the tolerance rule, LSE tight, rows that see no key zero / -inf.

    ``token_dim``: the dim of ``out`` that lse's last dim indexes (1 fixed-length, 0 varlen).
    """
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_within_lowp_error(out, ref_out, lowp_out, name="out")
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "rows that see no key must have lse -inf"
    # out with the token dim next to the last: [..., heads, tokens, d] lines up with lse.
    assert torch.all(out.transpose(token_dim, -2)[empty] == 0), "rows that see nothing must be 0"
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=LSE_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# flash_attn_func
# ----------------------------------------------------------------------------------------------

class Case(NamedTuple):
    batch: int = 2
    seqlen_q: int = 17
    seqlen_k: int = 17
    heads: tuple = (4, 2)  # (heads_q, heads_kv)
    head_dim: int = 64
    causal: bool = False
    window: tuple = (-1, -1)
    softmax_scale: float | None = None
    contiguous: bool = False


def check_flash_attn(case: Case, dtype, backend, device):
    q, k, v = projections((case.batch,), case.seqlen_q, case.seqlen_k, *case.heads,
                          case.head_dim, dtype, device, case.contiguous)
    kwargs = dict(softmax_scale=case.softmax_scale, causal=case.causal, window_size=case.window,
                  return_lse=True)
    ref_out, ref_lse = reference.flash_attn_func(q, k, v, **kwargs)
    lowp_out, _ = reference.flash_attn_func(q, k, v, **kwargs, upcast=False)
    out, lse = ember.ops.flash_attn_func(q, k, v, **kwargs, backend=backend)
    check_result(out, lse, ref_out, ref_lse, lowp_out, q, token_dim=1)


# Small shapes for the Triton interpreter (fp16; its tiles are 16 x 16, so these cross several
# tiles and tile edges): every axis of the contract at least once.
CPU_CASES = {
    "mha-17": Case(heads=(2, 2)),
    "gqa9:3-causal-sq<sk": Case(batch=1, seqlen_q=17, seqlen_k=40, heads=(9, 3), causal=True),
    "mqa-causal-sq>sk-rows-see-nothing": Case(seqlen_q=40, seqlen_k=17, heads=(8, 1),
                                              causal=True),
    "sq1": Case(batch=3, seqlen_q=1, seqlen_k=33, causal=True),
    "sk1": Case(batch=1, seqlen_q=20, seqlen_k=1, heads=(2, 1)),
    "window-left-right0": Case(batch=1, seqlen_q=48, seqlen_k=48, heads=(2, 1), window=(5, 0)),
    "window-both-sides": Case(seqlen_q=33, seqlen_k=47, window=(9, 6)),
    "window-left-causal": Case(batch=1, seqlen_q=40, seqlen_k=40, heads=(2, 2), causal=True,
                               window=(12, -1)),
    "window-wide-both-sides": Case(batch=1, seqlen_q=64, seqlen_k=70, heads=(2, 1),
                                   window=(20, 25)),
    "window-right-only": Case(batch=1, seqlen_q=35, seqlen_k=30, heads=(2, 2), window=(-1, 3)),
    "window-rows-see-nothing": Case(batch=1, seqlen_q=30, seqlen_k=20, heads=(2, 1),
                                    window=(2, 1)),
    "batch7-contiguous-causal": Case(batch=7, heads=(2, 1), causal=True, contiguous=True),
    "d96-causal": Case(batch=1, seqlen_q=33, seqlen_k=33, heads=(3, 1), head_dim=96,
                       causal=True),
    "d128-scale": Case(batch=1, seqlen_q=20, seqlen_k=25, heads=(2, 2), head_dim=128,
                       softmax_scale=0.3),
    "d256": Case(batch=1, heads=(1, 1), head_dim=256, causal=True),
}


@pytest.mark.parametrize("backend,device", _backends("flash_attn_func"))
@pytest.mark.parametrize("case", list(CPU_CASES.values()), ids=list(CPU_CASES))
def test_flash_attn_small(backend, device, case, poisoned_outputs):
    _skip_unimplemented("flash_attn_func", backend)
    dtypes = [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        check_flash_attn(case, dtype, backend, device)


# The sizes on the GPU: each axis covered (batch 1/7; lengths 1, 17, 128, 255, 257,
# 1000, 2048 with sq != sk both ways; the five head layouts; causal; both windows; head dims),
# plus a handful of combinations, not the full product.
GPU_CASES = {
    "b1-1x1-mha": Case(batch=1, seqlen_q=1, seqlen_k=1, heads=(16, 16), head_dim=128),
    "b7-17-gqa32:8-causal": Case(batch=7, seqlen_q=17, seqlen_k=17, heads=(32, 8),
                                 head_dim=128, causal=True),
    "b7-128-gqa28:4": Case(batch=7, seqlen_q=128, seqlen_k=128, heads=(28, 4)),
    "b1-255x257-gqa9:3-causal": Case(batch=1, seqlen_q=255, seqlen_k=257, heads=(9, 3),
                                     head_dim=128, causal=True),
    "b7-257x255-mqa-causal": Case(batch=7, seqlen_q=257, seqlen_k=255, heads=(8, 1),
                                  causal=True),
    "b1-1000-mha-causal": Case(batch=1, seqlen_q=1000, seqlen_k=1000, heads=(16, 16),
                               head_dim=128, causal=True),
    "b1-2048-gqa32:8": Case(batch=1, seqlen_q=2048, seqlen_k=2048, heads=(32, 8),
                            head_dim=128),
    "b1-2048-gqa32:8-causal-contiguous": Case(batch=1, seqlen_q=2048, seqlen_k=2048,
                                              heads=(32, 8), head_dim=128, causal=True,
                                              contiguous=True),
    "b7-1x2048-causal": Case(batch=7, seqlen_q=1, seqlen_k=2048, heads=(32, 8), head_dim=128,
                             causal=True),
    "b1-2048x1000-causal-rows-see-nothing": Case(batch=1, seqlen_q=2048, seqlen_k=1000,
                                                 heads=(16, 16), causal=True),
    "b7-17x1000-gqa28:4": Case(batch=7, seqlen_q=17, seqlen_k=1000, heads=(28, 4),
                               head_dim=128),
    "b1-128x2048-window64:0": Case(batch=1, seqlen_q=128, seqlen_k=2048, heads=(16, 16),
                                   head_dim=128, window=(64, 0)),
    "b1-2048-window64:0-causal": Case(batch=1, seqlen_q=2048, seqlen_k=2048, heads=(32, 8),
                                      head_dim=128, causal=True, window=(64, 0)),
    "b7-1000-window256:256-gqa9:3": Case(batch=7, seqlen_q=1000, seqlen_k=1000, heads=(9, 3),
                                         window=(256, 256)),
    "b1-257x2048-window256:256": Case(batch=1, seqlen_q=257, seqlen_k=2048, heads=(8, 1),
                                      head_dim=128, window=(256, 256)),
    "b7-255-d96-causal": Case(batch=7, seqlen_q=255, seqlen_k=255, heads=(9, 3), head_dim=96,
                              causal=True),
    "b1-1000-d256-causal": Case(batch=1, seqlen_q=1000, seqlen_k=1000, heads=(8, 1),
                                head_dim=256, causal=True),
    "b7-257-d256-window": Case(batch=7, seqlen_q=257, seqlen_k=257, heads=(16, 16),
                               head_dim=256, window=(64, 0)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_flash_attn_gpu(backend, dtype, case, poisoned_outputs):
    _skip_unimplemented("flash_attn_func", backend)
    check_flash_attn(case, dtype, backend, "cuda")


@pytest.mark.parametrize("backend,device", _backends("flash_attn_func"))
def test_flash_attn_defaults(backend, device):
    """Default scale 1/sqrt(d), no mask, and the output alone without return_lse."""
    _skip_unimplemented("flash_attn_func", backend)
    q, k, v = projections((2,), 19, 23, 4, 1, 64, torch.float16, device)
    out = ember.ops.flash_attn_func(q, k, v, backend=backend)
    assert isinstance(out, torch.Tensor)
    ref = reference.flash_attn_func(q, k, v, softmax_scale=64 ** -0.5)
    lowp = reference.flash_attn_func(q, k, v, softmax_scale=64 ** -0.5, upcast=False)
    assert_within_lowp_error(out, ref, lowp)


# ----------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ----------------------------------------------------------------------------------------------

class VarlenCase(NamedTuple):
    lens_q: tuple
    lens_k: tuple | None = None  # None: the same as lens_q
    heads: tuple = (4, 2)
    head_dim: int = 64
    causal: bool = False
    window: tuple = (-1, -1)


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def check_flash_attn_varlen(case: VarlenCase, dtype, backend, device):
    lens_q = list(case.lens_q)
    lens_k = list(case.lens_q if case.lens_k is None else case.lens_k)
    q, k, v = projections((), sum(lens_q), sum(lens_k), *case.heads, case.head_dim, dtype,
                          device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    kwargs = dict(causal=case.causal, window_size=case.window, return_lse=True)
    ref_out, ref_lse = reference.flash_attn_varlen_func(*args, **kwargs)
    lowp_out, _ = reference.flash_attn_varlen_func(*args, **kwargs, upcast=False)
    out, lse = ember.ops.flash_attn_varlen_func(*args, **kwargs, backend=backend)
    check_result(out, lse, ref_out, ref_lse, lowp_out, q, token_dim=0)


VARLEN_CPU_CASES = {
    "mixed": VarlenCase(lens_q=(1, 17, 33, 5)),
    "causal-sq!=sk-empty-seqs": VarlenCase(lens_q=(1, 17, 0, 40, 5), lens_k=(17, 1, 9, 33, 0),
                                           heads=(9, 3), causal=True),
    "window-mqa": VarlenCase(lens_q=(20, 3, 37), lens_k=(25, 3, 30), heads=(8, 1),
                             window=(6, 2)),
    "one-seq-d96-causal-window": VarlenCase(lens_q=(35,), heads=(3, 1), head_dim=96,
                                            causal=True, window=(10, -1)),
}


@pytest.mark.parametrize("backend,device", _backends("flash_attn_varlen_func"))
@pytest.mark.parametrize("case", list(VARLEN_CPU_CASES.values()), ids=list(VARLEN_CPU_CASES))
def test_flash_attn_varlen_small(backend, device, case, poisoned_outputs):
    _skip_unimplemented("flash_attn_varlen_func", backend)
    dtypes = [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        check_flash_attn_varlen(case, dtype, backend, device)


def random_lengths(count, low, high):
    return tuple(torch.randint(low, high + 1, (count,)).tolist())


# Lengths 1..2000 mixed: the random draws come from the per-test seed (conftest), so they are
# drawn inside the test, not at collection.
VARLEN_GPU_CASES = {
    "b7-random-gqa32:8": dict(heads=(32, 8), head_dim=128),
    "b7-random-causal-sq!=sk": dict(heads=(32, 8), head_dim=128, causal=True, same_k=False),
    "b7-random-mqa-d64-causal": dict(heads=(8, 1), causal=True),
    "b7-random-window64:0-gqa28:4": dict(heads=(28, 4), head_dim=128, window=(64, 0)),
    "b7-random-window256:256-gqa9:3": dict(heads=(9, 3), window=(256, 256), same_k=False),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", list(VARLEN_GPU_CASES.values()), ids=list(VARLEN_GPU_CASES))
def test_flash_attn_varlen_gpu(backend, dtype, spec, poisoned_outputs):
    _skip_unimplemented("flash_attn_varlen_func", backend)
    spec = dict(spec)
    same_k = spec.pop("same_k", True)
    # The edge lengths always appear; the rest are random in 1..2000.
    lens_q = (1, 2000, 17, 257) + random_lengths(3, 1, 2000)
    lens_k = None if same_k else (255, 1, 2000, 128) + random_lengths(3, 1, 2000)
    check_flash_attn_varlen(VarlenCase(lens_q=lens_q, lens_k=lens_k, **spec), dtype, backend,
                            "cuda")


@pytest.mark.parametrize("backend,device", _backends("flash_attn_varlen_func"))
def test_flash_attn_varlen_matches_padded_batch(backend, device):
    """A varlen batch of equal lengths is the same computation as the fixed-length one."""
    _skip_unimplemented("flash_attn_varlen_func", backend)
    _skip_unimplemented("flash_attn_func", backend)
    batch, seqlen_q, seqlen_k = 3, 21, 26
    q, k, v = projections((batch,), seqlen_q, seqlen_k, 4, 2, 64, torch.float16, device)
    out, lse = ember.ops.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
    cu_q = cu_seqlens([seqlen_q] * batch, device)
    cu_k = cu_seqlens([seqlen_k] * batch, device)
    out_v, lse_v = ember.ops.flash_attn_varlen_func(
        q.reshape(-1, 4, 64), k.reshape(-1, 2, 64), v.reshape(-1, 2, 64), cu_q, cu_k, seqlen_q,
        seqlen_k, causal=True, return_lse=True, backend=backend)
    torch.testing.assert_close(out_v.view(out.shape), out, atol=1e-3, rtol=0)
    # lse [b, hq, sq] against varlen's [hq, b * sq].
    want = lse.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(lse_v, want, atol=LSE_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# flash_attn_varlen_func over paged caches (block_table)
# ----------------------------------------------------------------------------------------------

def paged_caches(k, v, lens_k, page_size):
    """k/v ``[total_k, hkv, d]`` scattered into caches ``[num_blocks, page_size, hkv, d]``: each
    sequence's pages in shuffled blocks, two spare blocks, NaN in every slot no key fills (so a
    kernel that reads past a sequence shows), and an int32 block table whose unused entries are
    -1."""
    pages = [-(-length // page_size) for length in lens_k]
    num_blocks = sum(pages) + 2
    order = torch.randperm(num_blocks).tolist()
    k_cache = torch.full((num_blocks, page_size, *k.shape[1:]), float("nan"), dtype=k.dtype,
                         device=k.device)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.full((len(lens_k), max(pages, default=0) + 1), -1, dtype=torch.int32)
    first = 0
    for b, length in enumerate(lens_k):
        for page in range(pages[b]):
            block = order.pop()
            table[b, page] = block
            rows = slice(first + page * page_size, first + min((page + 1) * page_size, length))
            k_cache[block, :rows.stop - rows.start] = k[rows]
            v_cache[block, :rows.stop - rows.start] = v[rows]
        first += length
    return k_cache, v_cache, table.to(k.device)


def check_flash_attn_varlen_paged(case: VarlenCase, page_size, dtype, backend, device):
    lens_q = list(case.lens_q)
    lens_k = list(case.lens_q if case.lens_k is None else case.lens_k)
    q, k, v = projections((), sum(lens_q), sum(lens_k), *case.heads, case.head_dim, dtype,
                          device)
    k_cache, v_cache, table = paged_caches(k, v, lens_k, page_size)
    args = (q, k_cache, v_cache, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device),
            max(lens_q), max(lens_k))
    kwargs = dict(causal=case.causal, window_size=case.window, return_lse=True,
                  block_table=table)
    ref_out, ref_lse = reference.flash_attn_varlen_func(*args, **kwargs)
    lowp_out, _ = reference.flash_attn_varlen_func(*args, **kwargs, upcast=False)
    out, lse = ember.ops.flash_attn_varlen_func(*args, **kwargs, backend=backend)
    check_result(out, lse, ref_out, ref_lse, lowp_out, q, token_dim=0)


@pytest.mark.parametrize("backend,device", _backends("flash_attn_varlen_func.paged"))
@pytest.mark.parametrize("page_size", [16, 48])
@pytest.mark.parametrize("case", list(VARLEN_CPU_CASES.values()), ids=list(VARLEN_CPU_CASES))
def test_flash_attn_varlen_paged_small(backend, device, page_size, case, poisoned_outputs):
    _skip_unimplemented("flash_attn_varlen_func.paged", backend)
    dtypes = [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        check_flash_attn_varlen_paged(case, page_size, dtype, backend, device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("spec", list(VARLEN_GPU_CASES.values()), ids=list(VARLEN_GPU_CASES))
def test_flash_attn_varlen_paged_gpu(backend, dtype, page_size, spec, poisoned_outputs):
    """Prompt chunks over a paged cache: a chunk's keys are its cached prefix and itself."""
    _skip_unimplemented("flash_attn_varlen_func.paged", backend)
    spec = dict(spec)
    same_k = spec.pop("same_k", True)
    lens_q = (1, 2000, 17, 257) + random_lengths(3, 1, 2000)
    lens_k = None if same_k else (255, 1, 2000, 128) + random_lengths(3, 1, 2000)
    check_flash_attn_varlen_paged(VarlenCase(lens_q=lens_q, lens_k=lens_k, **spec), page_size,
                                  dtype, backend, "cuda")


# ----------------------------------------------------------------------------------------------
# Errors of the public functions: a clear exception naming the argument, before any kernel
# ----------------------------------------------------------------------------------------------

def _fixed_args(device):
    q, k, v = projections((2,), 5, 7, 4, 2, 64, torch.float16, device, contiguous=True)
    return dict(q=q, k=k, v=v)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(k=a["k"].bfloat16()), TypeError, "k must have dtype"),
    (lambda a: a.update(q=a["q"].int()), TypeError, "q must have dtype"),
    (lambda a: a.update(v=a["v"][:, :6]), ValueError, "v must have shape"),
    (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ValueError, "k must have shape"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dims"),
    (lambda a: a.update(k=a["k"][:, :, :1].expand(-1, -1, 3, -1),
                        v=a["v"][:, :, :1].expand(-1, -1, 3, -1)),
     ValueError, "multiple of heads of k/v"),
    (lambda a: a.update(q=a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)),
     ValueError, "q must have a contiguous last dimension"),
    (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size left"),
    (lambda a: a.update(window_size=(3,)), ValueError, "window_size must be a pair"),
    (lambda a: a.update(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda a: a.update(causal=1), TypeError, "causal must be a bool"),
    (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
])
def test_flash_attn_errors(device, mutate, error, match):
    args = _fixed_args(device)
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_func(**args)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_flash_attn_kernel_refuses_unsupported_inputs(device, backend):
    """Head dims and dtypes the kernels lack go to torch under "auto" and are refused by name
    under an explicit kernel backend (never a wrong answer)."""
    q, k, v = projections((1,), 5, 5, 2, 1, 80, torch.float16, device)
    with pytest.raises(ValueError, match=f"backend '{backend}'"):
        ember.ops.flash_attn_func(q, k, v, backend=backend)
    ref = reference.flash_attn_func(q, k, v)
    lowp = reference.flash_attn_func(q, k, v, upcast=False)
    assert_within_lowp_error(ember.ops.flash_attn_func(q, k, v), ref, lowp)


def test_flash_attn_cpu_tensors_refused_by_cuda_backend():
    q, k, v = projections((1,), 5, 5, 2, 1, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        ember.ops.flash_attn_func(q, k, v, backend="cuda")


def _varlen_args(device):
    q, k, v = projections((), 12, 15, 4, 2, 64, torch.float16, device, contiguous=True)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens([5, 7], device),
                cu_seqlens_k=cu_seqlens([6, 9], device), max_seqlen_q=7, max_seqlen_k=9)


def _set_cu(name, values):
    return lambda a: a.update({name: torch.tensor(values, dtype=torch.int32,
                                                  device=a[name].device)})


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError,
     "cu_seqlens_q must have dtype"),
    (_set_cu("cu_seqlens_k", [0, 9, 6]), ValueError, "cu_seqlens_k must be non-decreasing"),
    (_set_cu("cu_seqlens_q", [1, 5, 12]), ValueError, "cu_seqlens_q must start at 0"),
    (_set_cu("cu_seqlens_q", [0, 5, 11]), ValueError, r"cu_seqlens_q\[-1\] \(11\) must equal"),
    (_set_cu("cu_seqlens_k", [0, 6, 9, 15]), ValueError, "cu_seqlens_k must have shape"),
    (lambda a: a.update(max_seqlen_q=6), ValueError, "max_seqlen_q"),
    (lambda a: a.update(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1), v=a["v"][:, :1].expand(-1, 3, -1)),
     ValueError, "multiple of heads of k/v"),
    (lambda a: a.update(v=a["v"].bfloat16()), TypeError, "v must have dtype"),
])
def test_flash_attn_varlen_errors(device, mutate, error, match):
    args = _varlen_args(device)
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_varlen_func(**args)

