"""rotary_embedding_and_store_kvcache on every backend against the torch reference, which is
rotary_embedding followed by store_kvcache of the rotated k.

The returned q must agree with the reference as rotary_embedding's outputs do (one final rounding,
helpers.assert_matches_reference). The cached k is the rotated k rounded to the input dtype (then
quantised, for an fp8 cache), so its written rows follow the same rule in the cache's dtype; v is
data movement and must be exact. Caches start as NaN: every slot the op must not write (the
spare ones, and those of tokens with slot -1) must keep those bits. Triton runs on CPU through
the interpreter in fp16/fp32: its bfloat16 and its float->e4m3 rounding are unreliable, so bf16
and fp8 Triton are covered on the GPU.
"""

import pytest
import torch
from helpers import assert_matches_reference, assert_unchanged, backends_to_test

import ember
from ember.ops import _registry, reference

OP = "rotary_embedding_and_store_kvcache"
BACKENDS = backends_to_test(OP)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FP8 = torch.float8_e4m3fn


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def require_backend(backend, device, dtype=None):
    """Skip, with the reason, where ``backend`` cannot run the op here."""
    if backend not in ember.ops.available_backends(OP):
        pytest.skip(f"{OP} has no usable {backend!r} backend here "
                    f"(available: {ember.ops.available_backends(OP)})")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter handles bfloat16 unreliably; bf16 Triton runs "
                    "on the GPU")


def make_case(device, dtype, tokens, heads_q, heads_kv, head_dim, rotary_dim, block_size,
              cache_dtype=None, positions_dtype=torch.int64, cos_sin_dtype=torch.float32,
              max_pos=4096):
    """Keyword arguments of one call: q, k and v sliced out of one fused QKV projection (token
    strides that are not their own sizes, as the engine passes them), shuffled slots in a cache
    with spare blocks, some of them -1, and caches full of NaN."""
    qkv = torch.randn(tokens, heads_q + 2 * heads_kv, head_dim, dtype=dtype, device=device)
    q, k, v = qkv[:, :heads_q], qkv[:, heads_q:heads_q + heads_kv], qkv[:, heads_q + heads_kv:]
    positions = torch.randint(0, max_pos, (tokens,), dtype=positions_dtype, device=device)
    cos_sin_cache = reference.rotary_cos_sin_cache(max_pos, rotary_dim).to(device, cos_sin_dtype)
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    padding = torch.rand(tokens, device=device) < 0.25
    padding[tokens // 2] = tokens > 1  # at least one padded token wherever there are two
    slots[padding] = -1
    cache_shape = (num_blocks, block_size, heads_kv, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype or dtype, device=device)
    return dict(positions=positions, q=q, k=k, v=v, cos_sin_cache=cos_sin_cache,
                k_cache=k_cache, v_cache=k_cache.clone(), slot_mapping=slots)


def raw_bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def check_against_reference(backend, case, is_neox, k_scale=None, v_scale=None):
    inputs = {name: case[name] for name in ("positions", "q", "k", "v", "cos_sin_cache",
                                            "slot_mapping")}
    originals = {name: t.clone() for name, t in inputs.items()}
    want_k_cache, want_v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    want_q = reference.rotary_embedding_and_store_kvcache(
        **{**case, "k_cache": want_k_cache, "v_cache": want_v_cache}, is_neox=is_neox,
        k_scale=k_scale, v_scale=v_scale)

    q = ember.ops.rotary_embedding_and_store_kvcache(**case, is_neox=is_neox, k_scale=k_scale,
                                                     v_scale=v_scale, backend=backend)
    assert_unchanged(inputs, originals)
    assert q.data_ptr() != case["q"].data_ptr()
    assert_matches_reference(q, want_q, "q")

    k_cache, v_cache, slots = case["k_cache"], case["v_cache"], case["slot_mapping"]
    block_size = k_cache.shape[1]
    written = slots[slots >= 0]
    blocks, offsets = written // block_size, written % block_size
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    untouched[blocks, offsets] = False
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert cache[untouched].float().isnan().all(), f"{name}: a slot it must not write changed"
    assert_matches_reference(k_cache[blocks, offsets], want_k_cache[blocks, offsets], "k_cache")
    assert torch.equal(raw_bits(v_cache), raw_bits(want_v_cache)), "v_cache must be exact"


# (tokens, heads_q, heads_kv, head_dim, rotary_dim, block_size): Llama decode of one token;
# GQA 9:3 and MQA 8:1 with partial rotary; rotary_dim 20, whose neox halves (and, in 16-bit,
# gpt-j pairs) are not whole 16-byte vectors (the CUDA kernel's pair-by-pair path).
SHAPES = [(1, 32, 8, 128, 128, 16), (7, 9, 3, 64, 32, 16), (33, 8, 1, 128, 64, 32),
          (7, 32, 8, 64, 64, 32), (33, 9, 3, 128, 128, 16), (7, 8, 1, 64, 20, 32)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("tokens,heads_q,heads_kv,head_dim,rotary_dim,block_size", SHAPES)
def test_matches_reference(backend, device, dtype, is_neox, tokens, heads_q, heads_kv,
                           head_dim, rotary_dim, block_size):
    require_backend(backend, device, dtype)
    case = make_case(device, dtype, tokens, heads_q, heads_kv, head_dim, rotary_dim, block_size)
    check_against_reference(backend, case, is_neox)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("tokens,heads_q,heads_kv,head_dim,rotary_dim,block_size",
                         [SHAPES[4], SHAPES[5]])
def test_fp8_cache(backend, device, dtype, is_neox, tokens, heads_q, heads_kv, head_dim,
                   rotary_dim, block_size):
    require_backend(backend, device, dtype)
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter rounds float->e4m3 wrongly at binade edges "
                    "(e.g. 127.9 -> 64); fp8 Triton is covered on the GPU")
    case = make_case(device, dtype, tokens, heads_q, heads_kv, head_dim, rotary_dim, block_size,
                     cache_dtype=FP8)
    case["k"].mul_(300)  # some rotated values saturate at ±448 after scaling
    k_scale = torch.tensor([0.5], device=device)
    v_scale = torch.tensor([0.03], device=device)
    check_against_reference(backend, case, is_neox, k_scale, v_scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64], ids=dtype_id)
@pytest.mark.parametrize("cos_sin_in_q_dtype", [False, True],
                         ids=["fp32_cos_sin", "q_dtype_cos_sin"])
def test_positions_and_cos_sin_dtypes(backend, device, dtype, positions_dtype,
                                      cos_sin_in_q_dtype):
    require_backend(backend, device, dtype)
    case = make_case(device, dtype, 7, 9, 3, 64, 64, 16, positions_dtype=positions_dtype,
                     cos_sin_dtype=dtype if cos_sin_in_q_dtype else torch.float32, max_pos=300)
    # Both pairings over the four cases, to keep the count down.
    check_against_reference(backend, case, is_neox=positions_dtype == torch.int64)


@pytest.mark.parametrize("backend,device",
                         backends_to_test(OP, cpu_backends=("triton",)))
def test_unchecked_values_stay_in_bounds(backend, device):
    """Inside a CUDA graph positions and slots are not checked: the kernels clip positions and
    skip slots past the cache rather than read or write out of bounds. (The public op rejects
    these values wherever it can read them, so the backend is called directly.)"""
    require_backend(backend, device, torch.float16)
    case = make_case(device, torch.float16, 6, 8, 2, 64, 64, 16, max_pos=100)
    capacity = case["k_cache"].shape[0] * 16
    case["positions"] = torch.tensor([-5, 0, 99, 100, 2 ** 40, -(2 ** 40)], device=device)
    case["slot_mapping"] = torch.tensor([capacity, 3, capacity + 100, -1, 2 ** 40, 17],
                                        device=device)
    want_k, want_v = case["k_cache"].clone(), case["v_cache"].clone()
    q = _registry.implementation(OP, backend)(**case)
    want_q = reference.rotary_embedding_and_store_kvcache(**{
        **case, "k_cache": want_k, "v_cache": want_v,
        "positions": case["positions"].clamp(0, 99),
        "slot_mapping": case["slot_mapping"].where(case["slot_mapping"] < capacity, -1)})
    assert_matches_reference(q, want_q, "q")
    for name, got, want in (("k_cache", case["k_cache"], want_k),
                            ("v_cache", case["v_cache"], want_v)):
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_tokens_or_only_padding(backend, device):
    """No tokens: nothing to launch, an empty q. Only padding: q rotated, nothing stored."""
    require_backend(backend, device)
    case = make_case(device, torch.float16, 3, 4, 2, 64, 64, 16)
    empty = {name: case[name][:0] for name in ("positions", "q", "k", "v", "slot_mapping")}
    q = ember.ops.rotary_embedding_and_store_kvcache(**{**case, **empty}, backend=backend)
    assert q.shape == (0, 4, 64) and q.dtype == torch.float16
    assert case["k_cache"].isnan().all() and case["v_cache"].isnan().all()
    case["slot_mapping"].fill_(-1)
    check_against_reference(backend, case, is_neox=True)


@pytest.mark.parametrize("backend,device", backends_to_test(OP, cpu_backends=()))
def test_captured_in_a_cuda_graph(backend, device):
    """The decode step replays it in a CUDA graph: capture it (the slot check is skipped while
    capturing) and replay on inputs changed in place, against eager calls."""
    require_backend(backend, device)
    case = make_case(device, torch.bfloat16, 8, 32, 8, 128, 128, 16)
    k_cache, v_cache = case["k_cache"], case["v_cache"]
    k_cache.copy_(torch.randn_like(k_cache))
    v_cache.copy_(torch.randn_like(v_cache))

    def step():
        return ember.ops.rotary_embedding_and_store_kvcache(**case, backend=backend)

    step()  # eager warm-up (compiles Triton kernels, runs the value checks)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured_q = step()
    torch.cuda.current_stream().wait_stream(stream)

    capacity = k_cache.shape[0] * k_cache.shape[1]
    for _ in range(2):
        for name in ("q", "k", "v"):
            case[name].copy_(torch.randn_like(case[name]))
        case["positions"].copy_(torch.randint_like(case["positions"], 0, 4096))
        case["slot_mapping"].copy_(torch.randperm(capacity, device=device)[:8])
        case["slot_mapping"][3] = -1
        caches = k_cache.clone(), v_cache.clone()
        graph.replay()
        got_q, got_caches = captured_q.clone(), (k_cache.clone(), v_cache.clone())
        k_cache.copy_(caches[0])
        v_cache.copy_(caches[1])
        want_q = step()
        assert torch.equal(got_q, want_q)
        assert torch.equal(got_caches[0], k_cache) and torch.equal(got_caches[1], v_cache)


@pytest.mark.parametrize("backend,device", backends_to_test(OP, cpu_backends=()))
def test_checks_sync_with_the_gpu_once(backend, device):
    """Eagerly, the slot check (store_kvcache's) is the one device->host transfer; positions
    are not read back on a GPU."""
    require_backend(backend, device)
    case = make_case(device, torch.float16, 5, 8, 2, 64, 64, 16)
    ember.ops.rotary_embedding_and_store_kvcache(**case, backend=backend)  # set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            ember.ops.rotary_embedding_and_store_kvcache(**case, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# ---- bad input --------------------------------------------------------------------------------

def valid_args():
    case = make_case("cpu", torch.float16, 5, 4, 2, 32, 32, 16, max_pos=64)
    case["slot_mapping"] = torch.tensor([3, -1, 0, 20, 7])
    return {**case, "is_neox": True, "k_scale": None, "v_scale": None}


def rotary_call(a):
    return ember.ops.rotary_embedding(a["positions"], a["q"], a["k"], a["cos_sin_cache"],
                                      a["is_neox"])


def store_call(a):
    return ember.ops.store_kvcache(a["k"], a["v"], a["k_cache"], a["v_cache"],
                                   a["slot_mapping"], a["k_scale"], a["v_scale"])


def fp8_caches(a):
    return dict(k_cache=a["k_cache"].to(FP8), v_cache=a["v_cache"].to(FP8))


def head_dim_20(a):
    return dict(q=a["q"][..., :20], k=a["k"][..., :20], v=a["v"][..., :20],
                k_cache=a["k_cache"][..., :20], v_cache=a["v_cache"][..., :20],
                cos_sin_cache=reference.rotary_cos_sin_cache(64, 20))


ERROR_CASES = [
    # (change to a valid call, the op whose own check fails alike, error, message)
    (lambda a: dict(positions=torch.tensor([0, 1, 2, 3, 64])), rotary_call, ValueError,
     r"positions must be in \[0, 64\)"),
    (lambda a: dict(positions=a["positions"].float()), rotary_call, TypeError,
     "positions must have dtype"),
    (lambda a: dict(q=a["q"][:4]), rotary_call, ValueError,
     r"q must have shape \(5, '\*', '\*'\)"),
    (lambda a: dict(k=a["k"].float()), rotary_call, TypeError, "k must have dtype"),
    (lambda a: dict(cos_sin_cache=torch.randn(64, 7)), rotary_call, ValueError,
     "rotary_dim .* must be even"),
    (lambda a: dict(cos_sin_cache=torch.randn(64, 64)), rotary_call, ValueError,
     r"rotary_dim .* in \[2, head_dim=32\]"),
    (lambda a: dict(is_neox="neox"), rotary_call, TypeError, "is_neox must be a bool"),
    (lambda a: dict(q="not a tensor"), rotary_call, TypeError, "q must be a torch.Tensor"),
    (lambda a: dict(v=a["v"][:, :1]), store_call, ValueError, "v must have shape"),
    (lambda a: dict(v=a["v"].float()), store_call, TypeError, "v must have dtype"),
    (head_dim_20, store_call, ValueError, "head_dim must be a multiple of 8, got 20"),
    (lambda a: dict(k_cache=a["k_cache"][..., :16]), store_call, ValueError,
     "k_cache must have shape"),
    (lambda a: dict(v_cache=a["v_cache"].float()), store_call, TypeError,
     "v_cache must have dtype"),
    (lambda a: dict(k_cache=a["k_cache"].to("meta")), store_call, ValueError,
     "k_cache must be on cpu"),
    (lambda a: dict(slot_mapping=a["slot_mapping"].int()), store_call, TypeError,
     "slot_mapping must have dtype"),
    (lambda a: dict(slot_mapping=a["slot_mapping"][:4]), store_call, ValueError,
     r"slot_mapping must have shape \(5,\)"),
    (lambda a: dict(slot_mapping=a["slot_mapping"] + 1000), store_call, ValueError,
     r"slot_mapping values must be -1 or in \[0, 48\)"),
    (fp8_caches, store_call, ValueError, "k_scale is required for a float8_e4m3fn cache"),
    (lambda a: {**fp8_caches(a), "k_scale": torch.ones(1), "v_scale": torch.ones(2)},
     store_call, ValueError, "v_scale must hold one value"),
    (lambda a: dict(k_scale=torch.ones(1), v_scale=torch.ones(1)), store_call, ValueError,
     "only valid with a float8_e4m3fn cache"),
]


@pytest.mark.parametrize("change,single_op,error,match", ERROR_CASES,
                         ids=[f"{c[1].__name__}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input_errors(change, single_op, error, match):
    """Each bad argument is named in the same error as rotary_embedding's or store_kvcache's
    own, under this op's name."""
    args = valid_args()
    args.update(change(args))
    with pytest.raises(error, match=match) as fused:
        ember.ops.rotary_embedding_and_store_kvcache(**args)
    with pytest.raises(error) as single:
        single_op(args)
    single_name = "rotary_embedding" if single_op is rotary_call else "store_kvcache"
    assert str(fused.value) == str(single.value).replace(f"{single_name}:", f"{OP}:", 1)


def test_unavailable_backend_errors():
    args = valid_args()
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        ember.ops.rotary_embedding_and_store_kvcache(**args, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        ember.ops.rotary_embedding_and_store_kvcache(**args, backend="bogus")
