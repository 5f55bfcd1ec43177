"""The public attention API: validation errors, backend selection and dispatch, the plumbing
from the public functions to the torch backend, and torch.compile.

The backends' numerics are tested per backend in their own files; the references in
tests/reference/test_attention_reference.py.
"""

import os

import pytest
import torch

import ember
from ember.ops import _registry, reference

F16 = torch.float16
FP8 = torch.float8_e4m3fn
REGISTRY_OPS = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_varlen_func.paged",
                "flash_attn_with_kvcache", "merge_attn_states")


def randn(*shape, dtype=F16):
    return torch.randn(*shape).to(dtype)


def strided_last_dim(t):
    """Same shape and values as ``t`` but with stride 2 on the last dimension."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


# ----------------------------------------------------------------------------------------------
# Valid argument sets, and the errors that one broken argument raises
# ----------------------------------------------------------------------------------------------

def dense_args():
    return dict(q=randn(2, 5, 4, 64), k=randn(2, 7, 2, 64), v=randn(2, 7, 2, 64))


def varlen_args(paged=False):
    args = dict(q=randn(9, 4, 64), k=randn(12, 2, 64), v=randn(12, 2, 64),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32),
                max_seqlen_q=5, max_seqlen_k=7)
    if paged:
        # Sequence 0 uses block 2 only, sequence 1 uses block 0 only; -1 marks unused entries.
        args.update(k=randn(3, 16, 2, 64), v=randn(3, 16, 2, 64),
                    block_table=torch.tensor([[2, -1], [0, -1]], dtype=torch.int32))
    return args


def kvcache_args(paged=False):
    args = dict(q=randn(2, 3, 4, 64), k_cache=randn(2, 32, 2, 64), v_cache=randn(2, 32, 2, 64),
                k=randn(2, 3, 2, 64), v=randn(2, 3, 2, 64),
                cache_seqlens=torch.tensor([4, 20], dtype=torch.int32))
    if paged:
        args.update(k_cache=randn(5, 16, 2, 64), v_cache=randn(5, 16, 2, 64),
                    block_table=torch.tensor([[3, 99], [1, 4]], dtype=torch.int32))
    return args


def merge_args():
    return dict(out_a=randn(6, 4, 64), lse_a=torch.randn(4, 6), out_b=randn(6, 4, 64),
                lse_b=torch.randn(4, 6))


def with_(**changes):
    return lambda a: a.update(changes)


def fp8_caches(a):
    a.update(k_cache=a["k_cache"].to(FP8), v_cache=a["v_cache"].to(FP8))


COMMON_OPTION_ERRORS = [
    (with_(causal=1), TypeError, "causal must be a bool"),
    (with_(window_size=(-2, 0)), ValueError, "window_size left must be an int >= -1"),
    (with_(window_size=(0, 1.5)), ValueError, "window_size right must be an int >= -1"),
    (with_(window_size=(3,)), ValueError, "window_size must be a pair"),
    (with_(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive"),
    (with_(return_lse="yes"), TypeError, "return_lse must be a bool"),
]

DENSE_ERRORS = COMMON_OPTION_ERRORS + [
    (with_(q="q"), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"].double()), TypeError, "q must have dtype"),
    (lambda a: a.update(k=a["k"].bfloat16()), TypeError, "k must have dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dims"),
    (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ValueError, "k must have shape"),
    (lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), ValueError, "k must have shape"),
    (lambda a: a.update(v=a["v"][:, :6]), ValueError, "v must have shape"),
    (lambda a: a.update(q=randn(2, 5, 5, 64)), ValueError,
     r"heads of q \(5\) must be a multiple of heads of k/v \(2\)"),
    (lambda a: a.update(k=randn(2, 7, 0, 64), v=randn(2, 7, 0, 64)), ValueError,
     "heads and head_dim must be > 0"),
    (lambda a: a.update(k=a["k"].to("meta")), ValueError, "k must be on cpu"),
    (lambda a: a.update(v=a["v"].to("meta")), ValueError, "v must be on cpu"),
    (lambda a: a.update(q=strided_last_dim(a["q"])), ValueError,
     "q must have a contiguous last dimension"),
    (lambda a: a.update(v=strided_last_dim(a["v"])), ValueError,
     "v must have a contiguous last dimension"),
]


@pytest.mark.parametrize("mutate,error,match", DENSE_ERRORS)
def test_flash_attn_func_errors(mutate, error, match):
    args = dense_args()
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_func(**args)


VARLEN_ERRORS = COMMON_OPTION_ERRORS + [
    (lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3 dims"),
    (lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), ValueError, "k must have shape"),
    (lambda a: a.update(v=a["v"].float()), TypeError, "v must have dtype"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError,
     "cu_seqlens_q must have dtype"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError,
     "cu_seqlens_q must have 1 dims"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:1]), ValueError,
     r"cu_seqlens_q must have batch \+ 1 >= 2 entries"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:2]), ValueError,
     "cu_seqlens_k must have shape"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 4, 9, 9, 9], dtype=torch.int32)[::2]),
     ValueError, "cu_seqlens_q must be contiguous"),
    (with_(cu_seqlens_q=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    (with_(cu_seqlens_k=torch.tensor([0, 13, 12], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (with_(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] \(8\) must equal the number of tokens \(9\)"),
    (with_(cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k\[-1\] \(11\) must equal the number of tokens \(12\)"),
    (with_(max_seqlen_q=4), ValueError, r"max_seqlen_q \(4\) is less than the longest"),
    (with_(max_seqlen_k=6), ValueError, r"max_seqlen_k \(6\) is less than the longest"),
    (with_(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].to("meta")), ValueError,
     "cu_seqlens_k must be on cpu"),
]

PAGED_ERRORS = [
    (lambda a: a.update(k=a["k"][0], v=a["v"][0]), ValueError, "k must have 4 dims"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError,
     "block_table must have dtype"),
    (lambda a: a.update(block_table=a["block_table"][0]), ValueError,
     "block_table must have 2 dims"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError,
     "block_table must have shape"),
    (lambda a: a.update(block_table=a["block_table"].t()), ValueError,
     "block_table must be contiguous"),
    (with_(block_table=torch.tensor([[2, -1], [3, -1]], dtype=torch.int32)), ValueError,
     r"block_table\[1, 0\] = 3 is in use but not a block index in \[0, 3\)"),
    (with_(block_table=torch.tensor([[-1, -1], [0, -1]], dtype=torch.int32)), ValueError,
     r"block_table\[0, 0\] = -1 is in use"),
    (with_(block_table=torch.tensor([[2], [0]], dtype=torch.int32),
           cu_seqlens_k=torch.tensor([0, 5, 22], dtype=torch.int32), max_seqlen_k=17),
     ValueError, "cu_seqlens_k has a sequence of 17 keys; block_table rows hold at most 16"),
]


@pytest.mark.parametrize("mutate,error,match", VARLEN_ERRORS)
def test_flash_attn_varlen_func_errors(mutate, error, match):
    args = varlen_args()
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("mutate,error,match", PAGED_ERRORS)
def test_flash_attn_varlen_func_paged_errors(mutate, error, match):
    args = varlen_args(paged=True)
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_varlen_func(**args)


KVCACHE_ERRORS = COMMON_OPTION_ERRORS + [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dims"),
    (lambda a: a.update(k_cache=a["k_cache"].float()), TypeError, "k_cache must have dtype"),
    (lambda a: a.update(v_cache=a["v_cache"].bfloat16()), TypeError, "v_cache must have dtype"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError,
     "k_cache must have shape"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :16]), ValueError, "v_cache must have shape"),
    (lambda a: a.update(k_cache=strided_last_dim(a["k_cache"])), ValueError,
     "k_cache must have a contiguous last dimension"),
    (lambda a: a.update(q=randn(2, 3, 3, 64)), ValueError,
     r"heads of q \(3\) must be a multiple of heads of k/v \(2\)"),
    (fp8_caches, ValueError, "k_scale is required for a float8_e4m3fn cache"),
    (lambda a: (fp8_caches(a), a.update(k_scale=torch.tensor([1.0]))), ValueError,
     "v_scale is required"),
    (lambda a: (fp8_caches(a), a.update(k_scale=torch.tensor([1.0], dtype=torch.float64),
                                        v_scale=torch.tensor([1.0]))), TypeError,
     "k_scale must have dtype"),
    (lambda a: (fp8_caches(a), a.update(k_scale=torch.ones(2), v_scale=torch.ones(1))),
     ValueError, "k_scale must hold one value"),
    (with_(k_scale=torch.ones(1), v_scale=torch.ones(1)), ValueError,
     "k_scale/v_scale are only valid with a float8_e4m3fn cache"),
    (with_(v=None), ValueError, r"k and v must be given together \(got only k\)"),
    (with_(k=None), ValueError, r"k and v must be given together \(got only v\)"),
    (lambda a: a.update(k=a["k"].float(), v=a["v"].float()), TypeError, "k must have dtype"),
    (lambda a: a.update(k=a["k"][:, :, :1], v=a["v"][:, :, :1]), ValueError,
     "k must have shape"),
    (lambda a: a.update(v=a["v"][:, :2]), ValueError, "v must have shape"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens must have dtype"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError,
     "cache_seqlens must have shape"),
    (with_(cache_seqlens=torch.tensor([4, -1], dtype=torch.int32)), ValueError,
     "cache_seqlens must be >= 0, got -1"),
    (with_(cache_seqlens=-3), ValueError, "cache_seqlens must be >= 0"),
    (with_(cache_seqlens=4.0), TypeError, "cache_seqlens must be a torch.Tensor"),
    (with_(cache_seqlens=torch.tensor([4, 30], dtype=torch.int32)), ValueError,
     r"cache_seqlens \+ new tokens \(33\) exceeds the cache capacity k_cache.shape\[1\] = 32"),
    (with_(cache_seqlens=None), ValueError, r"exceeds the cache capacity"),
    (with_(num_splits=-1), ValueError, "num_splits must be >= 0"),
    (with_(num_splits=None), TypeError, "num_splits must be an int"),
    (with_(tree_mask=torch.ones(2, 3, 3)), TypeError, "tree_mask must have dtype"),
    (with_(tree_mask=torch.ones(2, 3, 4, dtype=torch.bool)), ValueError,
     "tree_mask must have shape"),
    (with_(tree_mask=torch.ones(2, 3, 3, dtype=torch.bool), causal=True), ValueError,
     "tree_mask replaces the causal mask; pass causal=False"),
    (with_(tree_mask=torch.ones(2, 3, 3, dtype=torch.bool), k=None, v=None,
           cache_seqlens=torch.tensor([2, 9], dtype=torch.int32)), ValueError,
     r"tree_mask needs cache_seqlens \+ new tokens >= seqlen_q \(3\)"),
]

KVCACHE_PAGED_ERRORS = [
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError,
     "block_table must have dtype"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError,
     "block_table must have shape"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]),
     ValueError, "k_cache must have shape"),
    # 14 + 3 new tokens reach sequence 0's second block, whose entry is 99.
    (with_(cache_seqlens=torch.tensor([14, 20], dtype=torch.int32)), ValueError,
     r"block_table\[0, 1\] = 99 is in use but not a block index in \[0, 5\)"),
    (with_(cache_seqlens=torch.tensor([4, 31], dtype=torch.int32)), ValueError,
     r"cache_seqlens \+ new tokens \(34\) exceeds the cache capacity max_blocks \* block_size "
     r"= 32"),
]


@pytest.mark.parametrize("mutate,error,match", KVCACHE_ERRORS)
def test_flash_attn_with_kvcache_errors(mutate, error, match):
    args = kvcache_args()
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_with_kvcache(**args)


@pytest.mark.parametrize("mutate,error,match", KVCACHE_PAGED_ERRORS)
def test_flash_attn_with_kvcache_paged_errors(mutate, error, match):
    args = kvcache_args(paged=True)
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_with_kvcache(**args)


MERGE_ERRORS = [
    (lambda a: a.update(out_a=a["out_a"][None]), ValueError, "out_a must have 3 dims"),
    (lambda a: a.update(out_a=a["out_a"].double()), TypeError, "out_a must have dtype"),
    (lambda a: a.update(out_b=a["out_b"].bfloat16()), TypeError, "out_b must have dtype"),
    (lambda a: a.update(out_b=a["out_b"][:5]), ValueError, "out_b must have shape"),
    (lambda a: a.update(lse_a=a["lse_a"].half()), TypeError, "lse_a must have dtype"),
    (lambda a: a.update(lse_b=a["lse_b"].t().contiguous()), ValueError,
     r"lse_b must have shape \(4, 6\)"),
    (lambda a: a.update(lse_a=torch.randn(6, 4).t()), ValueError, "lse_a must be contiguous"),
    (lambda a: a.update(out_b=strided_last_dim(a["out_b"])), ValueError,
     "out_b must have a contiguous last dimension"),
]


@pytest.mark.parametrize("mutate,error,match", MERGE_ERRORS)
def test_merge_attn_states_errors(mutate, error, match):
    args = merge_args()
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.merge_attn_states(**args)


def test_unused_block_table_entries_may_hold_anything():
    # The valid paged argument sets carry -1 / 99 in entries no sequence reaches.
    ember.ops.flash_attn_varlen_func(**varlen_args(paged=True))
    ember.ops.flash_attn_with_kvcache(**kvcache_args(paged=True))


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", REGISTRY_OPS)
def test_torch_backend_is_available(op):
    assert "torch" in ember.ops.available_backends(op)


CALLS = {
    "flash_attn_func": lambda backend: ember.ops.flash_attn_func(**dense_args(), backend=backend),
    "flash_attn_varlen_func": lambda backend: ember.ops.flash_attn_varlen_func(
        **varlen_args(), backend=backend),
    "flash_attn_varlen_func.paged": lambda backend: ember.ops.flash_attn_varlen_func(
        **varlen_args(paged=True), backend=backend),
    "flash_attn_with_kvcache": lambda backend: ember.ops.flash_attn_with_kvcache(
        **kvcache_args(), backend=backend),
    "merge_attn_states": lambda backend: ember.ops.merge_attn_states(
        **merge_args(), backend=backend),
}


@pytest.mark.parametrize("op", REGISTRY_OPS)
def test_unavailable_backend_errors(op):
    # CPU tensors: the cuda backend either is not registered for this op or cannot run.
    with pytest.raises(ValueError, match=r"backend 'cuda' (is not implemented|cannot run)"):
        CALLS[op]("cuda")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        CALLS[op]("bogus")


@pytest.fixture
def spy_triton(monkeypatch):
    """Register a stand-in "triton" backend (the torch one, recording its calls) for the ops
    given, so dispatch can be tested on CPU: the registry lets Triton run on CPU tensors when
    TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to treat CPU tensors as Triton-capable")
    calls = []

    def install(*ops):
        for op in ops:
            torch_impl = _registry.implementation(op, "torch")

            def spy(*args, _op=op, _impl=torch_impl):
                calls.append((_op, args))
                return _impl(*args)

            monkeypatch.setitem(_registry._IMPLS, op, {"torch": torch_impl, "triton": spy})
        return calls

    return install


def test_kernel_dispatch_gets_resolved_defaults(spy_triton, monkeypatch):
    calls = spy_triton("flash_attn_func")
    monkeypatch.setenv("EMBER_BACKEND", "triton")
    args = dense_args()
    out = ember.ops.flash_attn_func(**args, causal=True, window_size=(3, 5))
    (op, got), = calls
    assert op == "flash_attn_func"
    q, k, v, scale, causal, left, right = got
    assert q is args["q"] and k is args["k"] and v is args["v"]
    assert scale == pytest.approx(64 ** -0.5) and causal is True
    assert (left, right) == (3, 0)  # causal pins the right edge to the diagonal
    assert torch.equal(out, reference.flash_attn_func(**args, causal=True, window_size=(3, -1)))


@pytest.mark.parametrize("change,why", [
    (lambda a: {n: t.float() for n, t in a.items()}, "dtype torch.float32"),
    (lambda a: {n: t[..., :48].contiguous() for n, t in a.items()}, "head_dim 48"),
])
def test_inputs_kernels_cannot_take_go_to_torch(spy_triton, monkeypatch, change, why):
    calls = spy_triton("flash_attn_func")
    monkeypatch.setenv("EMBER_BACKEND", "triton")
    args = change(dense_args())
    out = ember.ops.flash_attn_func(**args)  # auto: falls back to torch
    assert not calls
    assert torch.equal(out, reference.flash_attn_func(**args))
    with pytest.raises(ValueError, match=f"backend 'triton' does not support {why}"):
        ember.ops.flash_attn_func(**args, backend="triton")


def test_paged_varlen_is_its_own_registry_op(spy_triton, monkeypatch):
    # A backend registered for packed varlen only (as the CUDA one is) must not be picked for
    # paged K/V: here "triton" is made such a backend.
    calls = spy_triton("flash_attn_varlen_func")
    paged = "flash_attn_varlen_func.paged"
    torch_only = {"torch": _registry.implementation(paged, "torch")}
    monkeypatch.setitem(_registry._IMPLS, paged, torch_only)
    monkeypatch.setenv("EMBER_BACKEND", "triton")
    ember.ops.flash_attn_varlen_func(**varlen_args(paged=True))
    assert not calls
    with pytest.raises(ValueError, match="backend 'triton' is not implemented"):
        ember.ops.flash_attn_varlen_func(**varlen_args(paged=True), backend="triton")
    ember.ops.flash_attn_varlen_func(**varlen_args())
    assert [op for op, _ in calls] == ["flash_attn_varlen_func"]


def test_paged_block_size_kernels_cannot_take_goes_to_torch(spy_triton, monkeypatch):
    calls = spy_triton("flash_attn_with_kvcache")
    monkeypatch.setenv("EMBER_BACKEND", "triton")
    args = kvcache_args(paged=True)
    args.update(k_cache=randn(10, 8, 2, 64), v_cache=randn(10, 8, 2, 64),
                block_table=torch.tensor([[3, 5, 7, 9], [1, 2, 4, 6]], dtype=torch.int32))
    ember.ops.flash_attn_with_kvcache(**args)
    assert not calls
    with pytest.raises(ValueError, match="does not support block_size 8"):
        ember.ops.flash_attn_with_kvcache(**args, backend="triton")


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_backend_sees_appended_cache(spy_triton, monkeypatch, paged):
    """Kernel backends get the new tokens already in the cache (written by the store_kvcache op
    of the same backend) and seqlens_k counting them."""
    calls = spy_triton("flash_attn_with_kvcache")
    monkeypatch.setenv("EMBER_BACKEND", "triton")
    args = kvcache_args(paged)
    want_k, want_v = args["k_cache"].clone(), args["v_cache"].clone()
    want = reference.flash_attn_with_kvcache(**{**args, "k_cache": want_k, "v_cache": want_v})
    out = ember.ops.flash_attn_with_kvcache(**args)
    (_, got), = calls
    q, k_cache, v_cache, seqlens_k, block_table = got[:5]
    assert k_cache is args["k_cache"] and seqlens_k.dtype == torch.int32
    assert seqlens_k.tolist() == [7, 23]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------------------------
# The public functions on the torch backend: plumbing to the references
# ----------------------------------------------------------------------------------------------

def test_flash_attn_func_returns_reference_and_lse():
    args = dense_args()
    out = ember.ops.flash_attn_func(**args, causal=True)
    out2, lse = ember.ops.flash_attn_func(**args, causal=True, return_lse=True)
    want, want_lse = reference.flash_attn_func(**args, causal=True, return_lse=True)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    assert torch.equal(out, want) and torch.equal(out2, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_varlen_func_returns_reference(paged):
    args = varlen_args(paged)
    out, lse = ember.ops.flash_attn_varlen_func(**args, window_size=(2, 1), return_lse=True)
    want, want_lse = reference.flash_attn_varlen_func(**args, window_size=(2, 1),
                                                      return_lse=True)
    assert lse.shape == (4, 9)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("seqlens", ["tensor", "int"])
def test_flash_attn_with_kvcache_appends_like_reference(paged, fp8, seqlens):
    """The public function appends through store_kvcache and then attends; the reference does
    both itself: caches and outputs must agree exactly."""
    args = kvcache_args(paged)
    if fp8:
        fp8_caches(args)
        args.update(k_scale=torch.tensor([0.01]), v_scale=torch.tensor([0.02]))
    if seqlens == "int":
        args["cache_seqlens"] = 13
    args["tree_mask"] = torch.rand(2, 3, 3) < 0.5
    want_k, want_v = args["k_cache"].clone(), args["v_cache"].clone()
    want, want_lse = reference.flash_attn_with_kvcache(
        **{**args, "k_cache": want_k, "v_cache": want_v}, return_lse=True)
    out, lse = ember.ops.flash_attn_with_kvcache(**args, return_lse=True)
    assert torch.equal(args["k_cache"].view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(args["v_cache"].view(torch.uint8), want_v.view(torch.uint8))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_merge_attn_states_returns_reference():
    args = merge_args()
    args["lse_a"][1, 2] = float("-inf")
    args["lse_a"][0, 0] = args["lse_b"][0, 0] = float("-inf")
    out, lse = ember.ops.merge_attn_states(**args)
    want, want_lse = reference.merge_attn_states(**args)
    assert not torch.isnan(out).any() and torch.isneginf(lse[0, 0])
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_empty_queries_return_empty_results():
    args = dense_args()
    args["q"] = args["q"][:, :0]
    out, lse = ember.ops.flash_attn_func(**args, return_lse=True)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
    args = varlen_args()
    args.update(q=args["q"][:0], cu_seqlens_q=torch.zeros(3, dtype=torch.int32))
    out, lse = ember.ops.flash_attn_varlen_func(**args, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)
    args = merge_args()
    out, lse = ember.ops.merge_attn_states(args["out_a"][:0], args["lse_a"][:, :0],
                                           args["out_b"][:0], args["lse_b"][:, :0])
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


def test_torch_compile_fullgraph():
    """The custom op and its fake implementation trace without graph breaks."""
    args = dense_args()

    def attend(q, k, v):
        return ember.ops.flash_attn_func(q, k, v, causal=True, return_lse=True)

    compiled = torch.compile(attend, fullgraph=True)
    out, lse = compiled(**args)
    want, want_lse = reference.flash_attn_func(**args, causal=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kvcache_checks_sync_with_the_gpu_once(backend):
    """Every value check of flash_attn_with_kvcache (cache_seqlens bounds, block-table entries in
    use) comes back in one device->host transfer, and store_kvcache's slot check in one: each
    transfer is a full sync, which at decode sizes costs more than the kernel (issue 4)."""
    if backend not in ember.ops.available_backends("flash_attn_with_kvcache"):
        pytest.skip(f"no {backend} backend")
    dev = "cuda"
    batch, block_size, heads_kv, d = 3, 16, 2, 64
    k_cache = torch.randn(12, block_size, heads_kv, d, device=dev, dtype=F16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(12, device=dev, dtype=torch.int32)[:batch * 4].view(batch, 4)
    args = dict(q=torch.randn(batch, 1, 4, d, device=dev, dtype=F16), k_cache=k_cache,
                v_cache=v_cache, k=torch.randn(batch, 1, heads_kv, d, device=dev, dtype=F16),
                v=torch.randn(batch, 1, heads_kv, d, device=dev, dtype=F16),
                cache_seqlens=torch.tensor([5, 17, 40], device=dev, dtype=torch.int32),
                block_table=table, causal=True, backend=backend)
    slots = torch.randperm(12 * block_size, device=dev)[:5]
    new_k = torch.randn(5, heads_kv, d, device=dev, dtype=F16)
    calls = (lambda: ember.ops.flash_attn_with_kvcache(**args),
             lambda: ember.ops.store_kvcache(new_k, new_k.clone(), k_cache, v_cache, slots,
                                             backend=backend))
    for call in calls:
        call()  # first calls may set things up (compilation, device properties)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning, match="synchroniz") as record:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in record if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
