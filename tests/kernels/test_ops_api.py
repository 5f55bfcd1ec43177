"""The public API of the GEMM-family, glue and sampling ops: dispatch to the torch backend,
custom-op registration (fake implementations checked by torch.library.opcheck) and clear
errors on bad input."""

import pytest
import torch

import ember
from ember.ops import reference


def int4_weight(n=8, k=64, group_size=32):
    return reference.quantize_int4(torch.randn(n, k), group_size)


def make_cases():
    """op name -> (public function, reference function, positional args)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    half = torch.float16
    w = randn(24, 64)
    packed, scales, zeros = int4_weight()
    w_fp8, w_scale = reference.quantize_fp8(w)
    values, metadata = reference.compress_24(reference.prune_24(w))
    b, k, vocab = 5, 3, 40
    return {
        "moe_align": (ember.ops.moe_align, reference.moe_align,
                      (torch.randint(0, 6, (9, 2), dtype=torch.int32), 6, 4)),
        "grouped_gemm": (ember.ops.grouped_gemm, reference.grouped_gemm,
                         (randn(11, 32, dtype=half), randn(3, 16, 32, dtype=half),
                          torch.tensor([4, 4, 10], dtype=torch.int32))),
        "fused_moe": (ember.ops.fused_moe, reference.fused_moe,
                      (randn(7, 32, dtype=half), randn(4, 48, 32, dtype=half),
                       randn(4, 32, 24, dtype=half), randn(7, 4), 2, True)),
        "quantize_int8": (ember.ops.quantize_int8, reference.quantize_int8, (w,)),
        "w8a16_gemm": (ember.ops.w8a16_gemm, reference.w8a16_gemm,
                       (randn(5, 64, dtype=half), *reference.quantize_int8(w))),
        "quantize_int4": (ember.ops.quantize_int4, reference.quantize_int4, (w, 32)),
        "w4a16_gemm": (ember.ops.w4a16_gemm, reference.w4a16_gemm,
                       (randn(5, 64, dtype=half), packed, scales, zeros, 32)),
        "quantize_fp8": (ember.ops.quantize_fp8, reference.quantize_fp8, (w,)),
        "fp8_gemm": (ember.ops.fp8_gemm, reference.fp8_gemm,
                     (randn(5, 64, dtype=torch.bfloat16), w_fp8, w_scale)),
        "prune_24": (ember.ops.prune_24, reference.prune_24, (w, "wanda", randn(64).abs())),
        "compress_24": (ember.ops.compress_24, reference.compress_24,
                        (reference.prune_24(w),)),
        "sparse24_gemm": (ember.ops.sparse24_gemm, reference.sparse24_gemm,
                          (randn(5, 64), values, metadata)),
        "rms_norm": (ember.ops.rms_norm, reference.rms_norm,
                     (randn(3, 5, 32, dtype=half), randn(32, dtype=half), 1e-5)),
        "fused_add_rms_norm": (ember.ops.fused_add_rms_norm, reference.fused_add_rms_norm,
                               (randn(6, 32, dtype=half), randn(6, 32, dtype=half),
                                randn(32, dtype=half), 1e-6)),
        "rotary_embedding": (ember.ops.rotary_embedding, reference.rotary_embedding,
                             (torch.randint(0, 50, (6,)), randn(6, 4, 32, dtype=half),
                              randn(6, 2, 32, dtype=half),
                              reference.rotary_cos_sin_cache(50, 16), False)),
        "rotary_embedding_and_store_kvcache": (
            ember.ops.rotary_embedding_and_store_kvcache,
            reference.rotary_embedding_and_store_kvcache,
            (torch.randint(0, 50, (6,)), randn(6, 4, 32, dtype=half), randn(6, 2, 32, dtype=half),
             randn(6, 2, 32, dtype=half), reference.rotary_cos_sin_cache(50, 16),
             randn(3, 16, 2, 32, dtype=half), randn(3, 16, 2, 32, dtype=half),
             torch.tensor([5, -1, 0, 40, 17, 2]), True, None, None)),
        "silu_and_mul": (ember.ops.silu_and_mul, reference.silu_and_mul,
                         (randn(4, 3, 64, dtype=half),)),
        "sample": (ember.ops.sample, reference.sample,
                   (randn(b, vocab), torch.tensor([0, 0.5, 1, 1.5, 2.0]),
                    torch.tensor([0, 3, -1, 10, 40], dtype=torch.int32),
                    torch.tensor([1, 0.9, 0.5, 1, 0.8]), torch.tensor([0, 0, 0.1, 0.05, 0]),
                    torch.randint(-2 ** 63, 2 ** 63 - 1, (b,)), torch.randint(0, 99, (b,)))),
        "speculative_accept": (ember.ops.speculative_accept, reference.speculative_accept,
                               (torch.randint(0, vocab, (b, k)),
                                torch.softmax(randn(b, k, vocab), -1),
                                torch.softmax(randn(b, k + 1, vocab), -1),
                                torch.randint(-2 ** 63, 2 ** 63 - 1, (b,)),
                                torch.randint(0, 99, (b,)))),
    }


OPS = list(make_cases())


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("op", OPS)
def test_public_op_dispatches_to_reference(op):
    public, ref, args = make_cases()[op]
    assert "torch" in ember.ops.available_backends(op)
    assert op in ember.ops.__all__
    want = as_tuple(ref(*args))
    for backend in ("torch", "auto"):
        got = as_tuple(public(*args, backend=backend))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w)


@pytest.mark.parametrize("op", OPS)
def test_custom_op_registration(op):
    """Schema, fake (meta) implementation and dispatch agree: torch.compile / CUDA-graph ready."""
    _, _, args = make_cases()[op]
    checks = ("test_schema", "test_faketensor")
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # The schema check compares inputs with arithmetic that CPU float8 tensors lack.
        checks = ("test_faketensor",)
    torch.library.opcheck(getattr(torch.ops.ember, op).default, (*args, "torch"),
                          test_utils=checks)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["sample", "speculative_accept", "moe_align", "rotary_embedding",
                                "rms_norm", "fused_add_rms_norm", "silu_and_mul"])
def test_no_host_sync_on_gpu(op):
    """These ops run inside CUDA graphs and the decode loop: not one device->host sync."""
    public, _, args = make_cases()[op]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    public(*args, backend="torch")  # first call: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        public(*args, backend="torch")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_outputs_never_alias_inputs():
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    weight = torch.randn(16)
    normed, new_residual = ember.ops.fused_add_rms_norm(x, residual, weight)
    assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    cache = reference.rotary_cos_sin_cache(8, 8)
    q, k = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    out_q, out_k = ember.ops.rotary_embedding(torch.tensor([0, 0]), q, k, cache)
    # Position 0 is the identity rotation: equal values, but fresh tensors.
    assert torch.equal(out_q, q) and out_q.data_ptr() != q.data_ptr()


def test_sample_parameter_forms():
    logits = torch.randn(6, 30)
    seeds = torch.randint(0, 2 ** 62, (6,))
    offsets = torch.randint(0, 99, (6,))
    by_numbers = ember.ops.sample(logits, 0.7, 5, 0.9, 0.05, seeds, offsets)
    by_tensors = ember.ops.sample(logits, torch.full((6,), 0.7), torch.full((6,), 5),
                                  torch.full((6,), 0.9), torch.full((6,), 0.05), seeds, offsets)
    assert torch.equal(by_numbers, by_tensors)
    # None and the "off" values are the same thing; a top_k past int32 is off too.
    off = ember.ops.sample(logits, 1.0, seeds=seeds, offsets=offsets)
    assert torch.equal(off, ember.ops.sample(logits, 1.0, 0, 1.0, 0.0, seeds, offsets))
    assert torch.equal(off, ember.ops.sample(logits, 1.0, 10 ** 12, 1.0, 0.0, seeds, offsets))
    assert torch.equal(off, ember.ops.sample(logits, 1.0, -1, seeds=seeds, offsets=offsets))
    assert torch.equal(ember.ops.sample(logits, 0), logits.argmax(-1))
    unseeded = ember.ops.sample(logits, 1.0)
    assert unseeded.shape == (6,) and ((unseeded >= 0) & (unseeded < 30)).all()


def test_unknown_backend_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run|not implemented"):
        ember.ops.silu_and_mul(x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        ember.ops.silu_and_mul(x, backend="fastest")


# ------------------------------------------------------------------------------------------------
# Bad input: each case changes one argument of a valid call.
# ------------------------------------------------------------------------------------------------

META = torch.device("meta")


def moe_args():
    return dict(topk_ids=torch.randint(0, 4, (5, 2), dtype=torch.int32), num_experts=4,
                block_m=8)


def grouped_args():
    return dict(x=torch.randn(10, 16), w=torch.randn(3, 8, 16),
                group_offsets=torch.tensor([3, 3, 9], dtype=torch.int32))


def fused_moe_args():
    return dict(hidden=torch.randn(5, 16), w13=torch.randn(4, 12, 16), w2=torch.randn(4, 16, 6),
                router_logits=torch.randn(5, 4), top_k=2, renormalize=True)


def w8_args():
    q, s = reference.quantize_int8(torch.randn(8, 64))
    return dict(x=torch.randn(3, 64), qweight=q, scale=s)


def w4_args():
    packed, scales, zeros = int4_weight()
    return dict(x=torch.randn(3, 64), packed=packed, scales=scales, zeros=zeros, group_size=32)


def fp8_args():
    w_fp8, w_scale = reference.quantize_fp8(torch.randn(8, 64))
    return dict(x=torch.randn(3, 64), w_fp8=w_fp8, w_scale=w_scale)


def sparse_args():
    values, metadata = reference.compress_24(reference.prune_24(torch.randn(8, 64)))
    return dict(x=torch.randn(3, 64), values=values, metadata=metadata)


def norm_args():
    return dict(x=torch.randn(4, 32), residual=torch.randn(4, 32), weight=torch.randn(32),
                eps=1e-6)


def rotary_args():
    return dict(positions=torch.randint(0, 20, (5,)), q=torch.randn(5, 4, 32),
                k=torch.randn(5, 2, 32), cos_sin_cache=reference.rotary_cos_sin_cache(20, 32),
                is_neox=True)


def sample_args():
    return dict(logits=torch.randn(4, 30), temperature=torch.ones(4),
                top_k=torch.zeros(4, dtype=torch.int32), top_p=torch.ones(4),
                min_p=torch.zeros(4), seeds=torch.arange(4), offsets=torch.zeros(4).long())


def spec_args():
    return dict(draft_token_ids=torch.randint(0, 30, (4, 3)),
                draft_probs=torch.softmax(torch.randn(4, 3, 30), -1),
                target_probs=torch.softmax(torch.randn(4, 4, 30), -1),
                seeds=torch.arange(4), offsets=torch.zeros(4).long())


def norm_call(x, residual, weight, eps):
    return ember.ops.rms_norm(x, weight, eps)


def add_norm_call(x, residual, weight, eps):
    return ember.ops.fused_add_rms_norm(x, residual, weight, eps)


ERROR_CASES = [
    # (make valid kwargs, call, change, error, match)
    (moe_args, ember.ops.moe_align, dict(topk_ids=torch.zeros(5, 2)), TypeError,
     "moe_align: topk_ids must have dtype"),
    (moe_args, ember.ops.moe_align, dict(topk_ids=torch.zeros(10, dtype=torch.int32)),
     ValueError, "topk_ids must have 2 dims"),
    (moe_args, ember.ops.moe_align, dict(num_experts=0), ValueError, "num_experts must be > 0"),
    (moe_args, ember.ops.moe_align, dict(block_m=16.0), TypeError, "block_m must be an int"),
    (grouped_args, ember.ops.grouped_gemm, dict(w=torch.randn(3, 8, 12)), ValueError,
     r"grouped_gemm: w must have shape \('\*', '\*', 16\)"),
    (grouped_args, ember.ops.grouped_gemm, dict(w=torch.randn(3, 8, 16).half()), TypeError,
     "w must have dtype"),
    (grouped_args, ember.ops.grouped_gemm, dict(group_offsets=torch.tensor([3, 3, 9])),
     TypeError, "group_offsets must have dtype"),
    (grouped_args, ember.ops.grouped_gemm,
     dict(group_offsets=torch.tensor([3, 9], dtype=torch.int32)), ValueError,
     r"group_offsets must have shape \(3,\)"),
    (grouped_args, ember.ops.grouped_gemm,
     dict(group_offsets=torch.tensor([5, 3, 9], dtype=torch.int32)), ValueError,
     "group_offsets must be non-decreasing"),
    (grouped_args, ember.ops.grouped_gemm,
     dict(group_offsets=torch.tensor([3, 3, 11], dtype=torch.int32)), ValueError,
     r"in \[0, 10\]"),
    (grouped_args, ember.ops.grouped_gemm, dict(w=torch.randn(3, 8, 16, device=META)),
     ValueError, "w must be on cpu"),
    (fused_moe_args, ember.ops.fused_moe, dict(top_k=5), ValueError,
     r"top_k must be <= the number of experts \(4\)"),
    (fused_moe_args, ember.ops.fused_moe, dict(top_k=0), ValueError, "top_k must be > 0"),
    (fused_moe_args, ember.ops.fused_moe, dict(w13=torch.randn(4, 13, 16)), ValueError,
     "w13 must have an even dim 1"),
    (fused_moe_args, ember.ops.fused_moe, dict(w2=torch.randn(4, 16, 5)), ValueError,
     r"w2 must have shape \(4, 16, 6\)"),
    (fused_moe_args, ember.ops.fused_moe, dict(router_logits=torch.randn(5, 3)), ValueError,
     "router_logits must have shape"),
    (fused_moe_args, ember.ops.fused_moe, dict(renormalize=1), TypeError,
     "renormalize must be a bool"),
    (fused_moe_args, ember.ops.fused_moe, dict(hidden=torch.zeros(5, 16, dtype=torch.int32)),
     TypeError, "hidden must have dtype"),
    (lambda: dict(w=torch.randn(2, 8, 64)), ember.ops.quantize_int8, {}, ValueError,
     "quantize_int8: w must have 2 dims"),
    (w8_args, ember.ops.w8a16_gemm, dict(x=torch.randn(3, 32)), ValueError,
     r"x must have shape \(\*, 64\)"),
    (w8_args, ember.ops.w8a16_gemm, dict(qweight=torch.randn(8, 64)), TypeError,
     "qweight must have dtype"),
    (w8_args, ember.ops.w8a16_gemm, dict(scale=torch.ones(7)), ValueError,
     r"scale must have shape \(8,\)"),
    (lambda: dict(w=torch.randn(8, 96), group_size=48), ember.ops.quantize_int4, {}, ValueError,
     "group_size must be one of"),
    (lambda: dict(w=torch.randn(8, 96), group_size=64), ember.ops.quantize_int4, {},
     ValueError, r"group_size \(64\) must divide K \(96\)"),
    (w4_args, ember.ops.w4a16_gemm, dict(group_size=64), ValueError,
     r"scales must have shape \(8, 1\)"),
    (w4_args, ember.ops.w4a16_gemm, dict(zeros=torch.zeros(8, 2)), TypeError,
     "zeros must have dtype"),
    (w4_args, ember.ops.w4a16_gemm, dict(packed=torch.zeros(8, 32, dtype=torch.int32)),
     TypeError, "packed must have dtype"),
    (fp8_args, ember.ops.fp8_gemm, dict(w_fp8=torch.randn(8, 64).half()), TypeError,
     "w_fp8 must have dtype"),
    (fp8_args, ember.ops.fp8_gemm, dict(w_scale=torch.ones(8).half()), TypeError,
     "w_scale must have dtype"),
    (lambda: dict(w=torch.randn(8, 6)), ember.ops.prune_24, {}, ValueError,
     "must be a multiple of 4"),
    (lambda: dict(w=torch.randn(8, 8), method="random"), ember.ops.prune_24, {}, ValueError,
     "method must be one of"),
    (lambda: dict(w=torch.randn(8, 8), method="wanda"), ember.ops.prune_24, {}, ValueError,
     "method='wanda' needs act_norm"),
    (lambda: dict(w=torch.randn(8, 8), act_norm=torch.ones(8)), ember.ops.prune_24, {},
     ValueError, "act_norm is only used by method='wanda'"),
    (lambda: dict(w=torch.randn(8, 8), method="wanda", act_norm=torch.ones(4)),
     ember.ops.prune_24, {}, ValueError, r"act_norm must have shape \(8,\)"),
    (lambda: dict(w=torch.randn(8, 8) + 5), ember.ops.compress_24, {}, ValueError,
     "w is not 2:4 sparse: row 0, columns 0..3 hold 4 nonzeros"),
    (lambda: dict(w=torch.randn(8, 10)), ember.ops.compress_24, {}, ValueError,
     "multiple of 4"),
    (sparse_args, ember.ops.sparse24_gemm, dict(metadata=torch.zeros(8, 16)), TypeError,
     "metadata must have dtype"),
    (sparse_args, ember.ops.sparse24_gemm, dict(values=torch.randn(8, 16)), ValueError,
     r"values must have shape \('\*', 32\)"),
    (sparse_args, ember.ops.sparse24_gemm, dict(x=torch.randn(3, 62)), ValueError,
     "multiple of 4"),
    (norm_args, norm_call, dict(weight=torch.randn(31)), ValueError,
     r"rms_norm: weight must have shape \(32,\)"),
    (norm_args, norm_call, dict(weight=torch.randn(32).half()), TypeError,
     "weight must have dtype"),
    (norm_args, norm_call, dict(eps=-1.0), ValueError, "eps must be a finite positive"),
    (norm_args, norm_call, dict(x=torch.zeros(4, 32, dtype=torch.int64)), TypeError,
     "x must have dtype"),
    (norm_args, add_norm_call, dict(residual=torch.randn(4, 31)), ValueError,
     "fused_add_rms_norm: residual must have shape"),
    (rotary_args, ember.ops.rotary_embedding, dict(positions=torch.tensor([0, 1, 2, 3, 20])),
     ValueError, r"positions must be in \[0, 20\)"),
    (rotary_args, ember.ops.rotary_embedding, dict(positions=torch.zeros(5)), TypeError,
     "positions must have dtype"),
    (rotary_args, ember.ops.rotary_embedding, dict(cos_sin_cache=torch.randn(20, 7)),
     ValueError, "rotary_dim .* must be even"),
    (rotary_args, ember.ops.rotary_embedding, dict(cos_sin_cache=torch.randn(20, 64)),
     ValueError, r"rotary_dim .* in \[2, head_dim=32\]"),
    (rotary_args, ember.ops.rotary_embedding, dict(k=torch.randn(5, 2, 16)), ValueError,
     r"k must have shape \(5, '\*', 32\)"),
    (rotary_args, ember.ops.rotary_embedding, dict(q=torch.randn(4, 4, 32)), ValueError,
     r"q must have shape \(5, '\*', '\*'\)"),
    (rotary_args, ember.ops.rotary_embedding, dict(is_neox="neox"), TypeError,
     "is_neox must be a bool"),
    (lambda: dict(x=torch.randn(3, 7)), ember.ops.silu_and_mul, {}, ValueError,
     "last dim must be even"),
    (sample_args, ember.ops.sample, dict(temperature=-0.5), ValueError,
     "temperature must be finite and >= 0, got -0.5"),
    (sample_args, ember.ops.sample, dict(temperature=torch.tensor([1, 1, -1, 1.0])), ValueError,
     "temperature must be finite and >= 0"),
    (sample_args, ember.ops.sample, dict(temperature=float("nan")), ValueError,
     "temperature must be finite"),
    (sample_args, ember.ops.sample, dict(temperature=torch.ones(4).double()), TypeError,
     "temperature must have dtype"),
    (sample_args, ember.ops.sample, dict(temperature=torch.ones(3)), ValueError,
     r"temperature must have shape \(4,\)"),
    (sample_args, ember.ops.sample, dict(temperature="hot"), TypeError,
     "temperature must be a number"),
    (sample_args, ember.ops.sample, dict(top_k=-2), ValueError, "top_k must be >= -1"),
    (sample_args, ember.ops.sample, dict(top_k=2.5), TypeError, "top_k must be an int"),
    (sample_args, ember.ops.sample, dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (sample_args, ember.ops.sample, dict(top_p=torch.tensor([1, 1, 1.5, 1])), ValueError,
     "top_p must be in"),
    (sample_args, ember.ops.sample, dict(min_p=1.5), ValueError, r"min_p must be in \[0, 1\]"),
    (sample_args, ember.ops.sample, dict(seeds=torch.arange(4).int()), TypeError,
     "seeds must have dtype"),
    (sample_args, ember.ops.sample, dict(offsets=torch.zeros(5).long()), ValueError,
     r"offsets must have shape \(4,\)"),
    (sample_args, ember.ops.sample, dict(logits=torch.randn(30)), ValueError,
     "logits must have 2 dims"),
    (sample_args, ember.ops.sample, dict(logits=torch.randn(4, 0)), ValueError,
     "at least one column"),
    (sample_args, ember.ops.sample, dict(logits=torch.randn(4, 30, device=META)), ValueError,
     "temperature must be on meta"),
    (spec_args, ember.ops.speculative_accept, dict(draft_token_ids=torch.tensor([[0, 1, 30]] * 4)),
     ValueError, r"draft_token_ids must be in \[0, 30\)"),
    (spec_args, ember.ops.speculative_accept, dict(draft_token_ids=torch.zeros(4, 3)),
     TypeError, "draft_token_ids must have dtype"),
    (spec_args, ember.ops.speculative_accept, dict(target_probs=torch.rand(4, 3, 30)),
     ValueError, r"target_probs must have shape \(4, 4, '\*'\)"),
    (spec_args, ember.ops.speculative_accept, dict(draft_probs=torch.rand(4, 3, 29)),
     ValueError, r"draft_probs must have shape \(4, 3, 30\)"),
    (spec_args, ember.ops.speculative_accept, dict(target_probs=torch.rand(4, 4, 30).half()),
     TypeError, "target_probs must have dtype"),
]


@pytest.mark.parametrize("make,call,change,error,match", ERROR_CASES,
                         ids=[f"{c[1].__name__}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input_errors(make, call, change, error, match):
    kwargs = make()
    kwargs.update(change)
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_skip_value_checks_skips_only_the_value_checks():
    """Inside ``skip_value_checks`` the slot range is not read back (the engine's eager steps),
    while dtype checks still run; outside it, an out-of-range slot is a clear ValueError."""
    from ember.ops._validation import values_readable

    k, v = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    k_cache, v_cache = torch.randn(4, 16, 1, 16), torch.randn(4, 16, 1, 16)
    with pytest.raises(ValueError, match="slot_mapping values must be -1 or in"):
        ember.ops.store_kvcache(k, v, k_cache, v_cache, torch.tensor([3, 64]))
    with ember.ops.skip_value_checks():
        assert not values_readable(torch.device("cpu"))
        with pytest.raises(TypeError, match="slot_mapping"):
            ember.ops.store_kvcache(k, v, k_cache, v_cache, torch.tensor([3, 9], dtype=torch.int32))
        ember.ops.store_kvcache(k, v, k_cache, v_cache, torch.tensor([3, 63]))
    assert values_readable(torch.device("cpu"))
    assert torch.equal(k_cache[0, 3], k[0]) and torch.equal(v_cache[3, 15], v[1])


@pytest.mark.cuda
def test_paged_decode_and_cache_write_make_no_host_sync_when_value_checks_are_skipped():
    """The engine's eager GPU steps: the decode attention over a paged cache (lengths on the
    device, max_seqlen_k given) and the cache write, without one device->host sync."""
    dev, half = "cuda", torch.bfloat16
    k_cache = torch.randn(64, 16, 2, 64, device=dev, dtype=half)
    v_cache = torch.randn(64, 16, 2, 64, device=dev, dtype=half)
    table = torch.randperm(64, device=dev)[:24].view(3, 8).int()
    seqlens = torch.tensor([5, 100, 127], dtype=torch.int32, device=dev)
    q = torch.randn(3, 1, 8, 64, device=dev, dtype=half)
    k, v = torch.randn(3, 1, 2, 64, device=dev, dtype=half), torch.randn(3, 1, 2, 64, device=dev,
                                                                           dtype=half)
    slots = torch.tensor([7, 300, 1000], device=dev)

    def step():
        ember.ops.store_kvcache(k[:, 0], v[:, 0], k_cache, v_cache, slots)
        return ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                 cache_seqlens=seqlens, block_table=table,
                                                 causal=True, max_seqlen_k=128)

    want = step()  # first call: lazy initialisation may synchronise
    torch.cuda.synchronize()
    with ember.ops.skip_value_checks():
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
