"""flash_attn_with_kvcache (decode / append / tree attention over contiguous and paged KV caches)
and merge_attn_states, every backend against the torch reference; and the shared split-KV
heuristic of ember.ops._split_kv.

Tolerance: flash-attn's rule (helpers.assert_within_lowp_error) against the reference run in
float32 (upcast=True), relative to the reference run in the input dtype (upcast=False). The
cache after new K/V are written must equal the reference's exactly.
"""

import functools
import math
from typing import NamedTuple

import pytest
import torch
from helpers import assert_within_lowp_error, backends_to_test

import ember
from ember.ops import _split_kv, reference

FP8 = torch.float8_e4m3fn


def _backend_params(op):
    # The torch backend is the reference itself; on a GPU both kernel backends are tested.
    return backends_to_test(op, cpu_backends=("triton",), gpu_backends=("cuda", "triton"))


def _skip_unimplemented(op, backend):
    if backend not in ember.ops.available_backends(op):
        pytest.skip(f"{op} has no {backend} backend")


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ----------------------------------------------------------------------------------------------

class Case(NamedTuple):
    batch: int = 2
    cache_lens: tuple = (37, 100)  # cached tokens before the new ones, cycled over the batch
    seqlen_q: int = 1
    heads: tuple = (4, 2)  # (heads_q, heads_kv)
    head_dim: int = 64
    block_size: int | None = None  # None: contiguous cache
    new_kv: bool = True  # pass k, v (seqlen_q new tokens) to be written into the cache
    causal: bool = False
    window: tuple = (-1, -1)
    tree: bool = False
    fp8: bool = False
    num_splits: int = 0
    # Rotary of the new tokens: None, "neox" (halves), "gptj" (interleaved pairs) or
    # "neox-partial-f32" (half the head dim rotates, float32 cos/sin).
    rotary: str | None = None
    max_seqlen_k: int | None = None  # the tile-width hint (None: the lengths read back)
    # q times this, softmax_scale divided by it: the same attention from queries of another
    # magnitude (bf16 queries outside fp16's range meet fp8 caches, whose MMAs run in fp16).
    q_scale: float = 1.0


def _random_tree_mask(batch, n, device):
    """Ancestor masks of random trees: node t's parent is a random earlier node (or the prefix);
    each node sees itself and its ancestors."""
    mask = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for t in range(n):
            parent = int(torch.randint(-1, t, ()).item()) if t else -1
            if parent >= 0:
                mask[b, t] = mask[b, parent]
            mask[b, t, t] = True
    return mask.to(device)


def make_inputs(case: Case, dtype, device):
    batch, seqlen_q = case.batch, case.seqlen_q
    heads_q, heads_kv = case.heads
    d = case.head_dim
    cached = torch.tensor([case.cache_lens[i % len(case.cache_lens)] for i in range(batch)],
                          dtype=torch.int32)
    num_new = seqlen_q if case.new_kv else 0
    total = cached + num_new
    # Some spare room past the longest sequence, so slots beyond a length exist and must not
    # be read.
    capacity = int(total.max()) + 5
    cache_dtype = FP8 if case.fp8 else dtype
    if case.block_size is None:
        slab = (batch, capacity)
        block_table = None
    else:
        per_seq = math.ceil(capacity / case.block_size)
        num_blocks = batch * per_seq + 3
        slab = (num_blocks, case.block_size)
        # Shuffled: a sequence's blocks are scattered over the pool, in random order.
        block_table = torch.randperm(num_blocks)[:batch * per_seq].view(batch, per_seq)
        block_table = block_table.to(torch.int32).to(device)
    k_scale = v_scale = None
    if case.fp8:
        k_scale = torch.rand(1, device=device) + 0.5
        v_scale = torch.rand(1, device=device) * 0.1 + 0.02
    # K and V interleaved per block/sequence ([*, 2, len, heads, d], as some engines lay them
    # out), so the caches' leading strides are not those of a contiguous tensor. Unused slots
    # hold NaN: a kernel reading past a sequence (even under a zero softmax weight) turns its
    # output into NaN.
    values = torch.full((slab[0], 2, slab[1], heads_kv, d), float("nan"), dtype=dtype,
                        device=device)
    for b in range(batch):
        n = int(cached[b])
        fresh = torch.randn(2, n, heads_kv, d, device=device, dtype=dtype)
        if block_table is None:
            values[b, :, :n] = fresh
        else:
            pos = torch.arange(n, device=device)
            blocks = block_table[b, pos // case.block_size].long()
            values[blocks, :, pos % case.block_size] = fresh.transpose(0, 1)
    caches = torch.empty(values.shape, dtype=cache_dtype, device=device)
    if case.fp8:
        caches[:, 0] = reference.quantize_fp8_e4m3(values[:, 0], k_scale)
        caches[:, 1] = reference.quantize_fp8_e4m3(values[:, 1], v_scale)
    else:
        caches.copy_(values)
    k_cache, v_cache = caches[:, 0], caches[:, 1]
    # q, k, v sliced out of a fused projection, as a model produces them.
    qkv = torch.randn(batch, seqlen_q, heads_q + 2 * heads_kv, d, device=device, dtype=dtype)
    q = qkv[:, :, :heads_q]
    if case.q_scale != 1.0:
        q = q * case.q_scale
    k = v = None
    if case.new_kv:
        k, v = qkv[:, :, heads_q:heads_q + heads_kv], qkv[:, :, heads_q + heads_kv:]
    tree_mask = _random_tree_mask(batch, seqlen_q, device) if case.tree else None
    rotary = {}
    if case.rotary:
        # Random angles, a row per position up to the last, cos/sin the two halves of one
        # [seqlen_ro, rotary_dim] table, as a model holds them.
        half = d // 4 if "partial" in case.rotary else d // 2
        table_dtype = torch.float32 if "f32" in case.rotary else dtype
        angles = torch.rand(int(total.max()), half, device=device) * 2 * math.pi
        table = torch.cat([angles.cos(), angles.sin()], dim=1).to(table_dtype)
        rotary = dict(rotary_cos=table[:, :half], rotary_sin=table[:, half:],
                      rotary_interleaved=case.rotary == "gptj")
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=cached.to(device), block_table=block_table,
                causal=case.causal, window_size=case.window, num_splits=case.num_splits,
                tree_mask=tree_mask, k_scale=k_scale, v_scale=v_scale,
                softmax_scale=d**-0.5 / case.q_scale, **rotary)


def _clone_caches(args):
    return dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())


def _bits(t):
    # Bitwise: exact, and NaN (the unused slots) compares equal to itself.
    return t.view(torch.uint8)


def check_kvcache_attention(case: Case, dtype, backend, device):
    args = make_inputs(case, dtype, device)
    ref_args, lowp_args = _clone_caches(args), _clone_caches(args)
    ref_out, ref_lse = reference.flash_attn_with_kvcache(**ref_args, return_lse=True)
    lowp_out, lowp_lse = reference.flash_attn_with_kvcache(**lowp_args, return_lse=True,
                                                           upcast=False)
    out, lse = ember.ops.flash_attn_with_kvcache(**args, return_lse=True, backend=backend,
                                                 max_seqlen_k=case.max_seqlen_k)

    # Writing the new tokens is data movement: exact, and nothing else in the cache changes.
    # A rotated k is exact too where the rotation is ember's CUDA rounding (the reference's);
    # the Triton rotary kernel may round a product differently: one unit in the last place, of
    # the dtype, or of e4m3 (3 mantissa bits; 2^-9 apart below its normal range) once quantised.
    for name in ("k_cache", "v_cache"):
        if name == "k_cache" and case.rotary and backend != "cuda":
            got, want = args[name], ref_args[name]
            eps = torch.finfo(dtype).eps
            rtol, atol = (2.0**-3, 2.0**-9) if case.fp8 else (eps, eps * 1e-3)
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol,
                                       equal_nan=True)
            continue
        assert torch.equal(_bits(args[name]), _bits(ref_args[name])), f"{name} differs"

    assert out.shape == args["q"].shape and out.dtype == dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_within_lowp_error(out, ref_out, lowp_out, name="out")
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "rows that see no key must have lse -inf"
    assert torch.all(out.transpose(1, 2)[empty] == 0), "rows that see no key must be zeros"
    assert_within_lowp_error(lse[~empty], ref_lse[~empty], lowp_lse[~empty], name="lse")


# Small shapes for the Triton interpreter (fp16): every axis of the contract at least once.
CPU_CASES = {
    "decode-contiguous": Case(),
    "decode-batch1-len1": Case(batch=1, cache_lens=(0,)),
    "decode-gqa9:3-paged16": Case(batch=3, cache_lens=(17, 1, 130), heads=(9, 3),
                                  block_size=16),
    "decode-mqa-paged32-no-new": Case(cache_lens=(255, 40), heads=(8, 1), block_size=32,
                                      new_kv=False),
    "decode-mha-d128": Case(heads=(2, 2), head_dim=128, cache_lens=(70, 9)),
    "decode-d96": Case(heads=(3, 1), head_dim=96, block_size=16),
    "splits-1": Case(cache_lens=(255, 100), num_splits=1),
    # One program walks many tiles, each spanning several 16-key pages (and page prefetch).
    "paged16-one-split-many-tiles": Case(cache_lens=(300, 77), heads=(4, 1), block_size=16,
                                         num_splits=1),
    # Pages larger than a tile: several tiles per page, then a page boundary.
    "paged256-d128-one-split": Case(cache_lens=(300, 20), heads=(2, 1), head_dim=128,
                                    block_size=256, num_splits=1),
    "splits-3-paged": Case(cache_lens=(255, 100), block_size=16, num_splits=3),
    "splits-more-than-tiles": Case(cache_lens=(70, 3), num_splits=9),
    "append-causal": Case(seqlen_q=4, cache_lens=(30, 0), heads=(6, 2), causal=True,
                          block_size=16),
    "append-noncausal-sq9": Case(seqlen_q=9, cache_lens=(20, 65), heads=(4, 1), num_splits=2),
    "append-causal-rows-see-nothing": Case(seqlen_q=6, cache_lens=(3,), batch=1, causal=True,
                                           new_kv=False, heads=(2, 1)),
    "tree": Case(seqlen_q=5, cache_lens=(33, 8), heads=(6, 2), tree=True, block_size=16),
    "tree-splits": Case(seqlen_q=7, cache_lens=(90, 2), heads=(4, 1), tree=True,
                        num_splits=4),
    "window-decode": Case(cache_lens=(120, 50), window=(20, -1), num_splits=3,
                          block_size=32),
    # The first visible key (63, 127) ends a 64- or 128-key tile: an off-by-one skips its tile.
    "window-edge-on-tile-end": Case(cache_lens=(99, 163), window=(36, -1), block_size=16),
    "window-append-causal": Case(seqlen_q=5, cache_lens=(60, 10), window=(7, 0), causal=True),
    "window-both-sides": Case(seqlen_q=4, cache_lens=(40,), batch=1, window=(3, 2),
                              new_kv=False),
    # Rotary: decode steps (one kernel on CUDA), and append / non-causal rows otherwise.
    "rotary-neox-decode-paged16": Case(cache_lens=(40, 7), heads=(8, 2), causal=True,
                                       block_size=16, rotary="neox"),
    "rotary-gptj-decode-splits": Case(cache_lens=(130, 64), causal=True, num_splits=3,
                                      rotary="gptj"),
    "rotary-partial-f32-append-causal": Case(seqlen_q=3, cache_lens=(20, 1), heads=(6, 2),
                                             causal=True, rotary="neox-partial-f32"),
    "rotary-noncausal-sq2": Case(seqlen_q=2, cache_lens=(9, 30), rotary="gptj"),
    "fp8-contiguous": Case(fp8=True, new_kv=False, cache_lens=(90, 33)),
    "fp8-paged-splits": Case(fp8=True, new_kv=False, block_size=16, heads=(6, 3),
                             cache_lens=(130, 20), num_splits=3),
    # The planned split count with one program per SM: 3 kv heads x 44 splits = 132 (the CPU
    # plans for an H100), 46 tiles, so the last splits hold none.
    "planned-one-per-sm-gqa9:3": Case(batch=1, cache_lens=(2900,), heads=(9, 3), new_kv=False),
}


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
@pytest.mark.parametrize("case", list(CPU_CASES.values()), ids=list(CPU_CASES))
def test_kvcache_attention_small(backend, device, case):
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    dtypes = [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        check_kvcache_attention(case, dtype, backend, device)


# The sizes on the GPU: each axis covered, not the full product.
GPU_CASES = {
    "b1-33000-gqa32:8-d128": Case(batch=1, cache_lens=(33000,), heads=(32, 8), head_dim=128),
    "b1-33000-paged16": Case(batch=1, cache_lens=(33000,), heads=(32, 8), head_dim=128,
                             block_size=16),
    "b7-mixed-lens-gqa9:3-paged32": Case(batch=7, cache_lens=(1, 17, 255, 257, 4096, 0, 33000),
                                         heads=(9, 3), block_size=32),
    "b64-4096-gqa28:4-paged256": Case(batch=64, cache_lens=(4096,), heads=(28, 4),
                                      head_dim=128, block_size=256),
    "b64-257-mqa-sq4-causal": Case(batch=64, cache_lens=(257, 255), heads=(8, 1), seqlen_q=4,
                                   causal=True, block_size=16),
    "b7-mha-sq65-causal": Case(batch=7, cache_lens=(255, 17, 4096), heads=(16, 16), seqlen_q=65,
                               causal=True, head_dim=128),
    "b7-sq65-tree-paged16": Case(batch=7, cache_lens=(257, 1), heads=(32, 8), seqlen_q=65,
                                 tree=True, block_size=16, head_dim=128),
    "b1-4096-splits1": Case(batch=1, cache_lens=(4096,), heads=(32, 8), num_splits=1),
    "b1-255-splits-more-than-tiles": Case(batch=1, cache_lens=(255,), heads=(32, 8),
                                          num_splits=64),
    "b7-window-4096-paged16": Case(batch=7, cache_lens=(4096, 257), heads=(28, 4),
                                   window=(1000, -1), block_size=16, head_dim=128),
    # fp8 with new tokens: the Triton interpreter rounds float->e4m3 wrongly, so only here.
    "b7-fp8-4096-paged16": Case(batch=7, cache_lens=(4096, 17, 257), heads=(32, 8),
                                head_dim=128, fp8=True, block_size=16),
    "b7-fp8-contiguous-sq4-causal": Case(batch=7, cache_lens=(255, 33000), heads=(9, 3),
                                         fp8=True, seqlen_q=4, causal=True),
    # fp8 in every head dim and both warp layouts of the CUDA kernel (<= 16 packed query rows
    # per kv head: the decode layout; more: the append layout), with forced and planned splits.
    "b7-fp8-mha-sq65-causal-d128": Case(batch=7, cache_lens=(255, 4096, 17), heads=(16, 4),
                                        seqlen_q=65, causal=True, head_dim=128, fp8=True,
                                        block_size=16),
    "b7-fp8-sq5-tree-d64": Case(batch=7, cache_lens=(257, 1, 4099), heads=(32, 8), seqlen_q=5,
                                tree=True, fp8=True, block_size=32),
    "b7-fp8-d96-splits": Case(batch=7, cache_lens=(300, 1, 2049), heads=(9, 3), head_dim=96,
                              fp8=True, num_splits=3),
    "b7-fp8-d96-sq8-causal": Case(batch=7, cache_lens=(300, 40), heads=(8, 4), head_dim=96,
                                  seqlen_q=8, causal=True, fp8=True),
    "b7-fp8-d256-sq4-paged16": Case(batch=7, cache_lens=(257, 4096), heads=(8, 2),
                                    head_dim=256, seqlen_q=4, fp8=True, block_size=16),
    "b7-fp8-d256-sq9-window": Case(batch=7, cache_lens=(257, 600), heads=(8, 4), head_dim=256,
                                   seqlen_q=9, causal=True, window=(100, -1), fp8=True),
    "b7-d256-paged16": Case(batch=7, cache_lens=(257, 4096), heads=(8, 2), head_dim=256,
                            block_size=16),
    "b7-d96": Case(batch=7, cache_lens=(1, 300), heads=(9, 3), head_dim=96),
    # 48-key pages (a multiple of 16, not a power of two): the CUDA copies look a page up once
    # per 16 keys of a thread's rows; a window and splits start tiles mid-page.
    "b7-paged48-window-splits": Case(batch=7, cache_lens=(4097, 300, 47, 1), heads=(32, 8),
                                     block_size=48, window=(700, -1), num_splits=5),
    "b7-fp8-paged48-gqa9:3": Case(batch=7, cache_lens=(2049, 48, 4000), heads=(9, 3),
                                  block_size=48, fp8=True, new_kv=False),
    "b7-d96-paged48": Case(batch=7, cache_lens=(1, 300, 1000), heads=(9, 3), head_dim=96,
                           block_size=48),
    # A Llama decode step with rotary: one CUDA kernel rotates, stores and attends.
    "b7-rotary-neox-gqa32:8-paged16": Case(batch=7, cache_lens=(383, 0, 4095, 64, 1),
                                           heads=(32, 8), causal=True, block_size=16,
                                           rotary="neox"),
    "b7-rotary-mqa32:1-d128-splits": Case(batch=7, cache_lens=(257, 33000, 5), heads=(32, 1),
                                          head_dim=128, causal=True, num_splits=9,
                                          rotary="gptj"),
    "b7-rotary-partial-f32-d256": Case(batch=7, cache_lens=(100, 17), heads=(8, 2),
                                       head_dim=256, causal=True, block_size=32,
                                       rotary="neox-partial-f32"),
    # The same decode step on fp8 caches: the CUDA kernel quantises the new K/V rows itself.
    "b7-fp8-rotary-neox-gqa32:8-paged16": Case(batch=7, cache_lens=(383, 0, 4095, 64, 1),
                                               heads=(32, 8), causal=True, block_size=16,
                                               rotary="neox", fp8=True),
    "b7-fp8-rotary-mqa32:1-d128-splits": Case(batch=7, cache_lens=(257, 33000, 5),
                                              heads=(32, 1), head_dim=128, causal=True,
                                              num_splits=9, rotary="gptj", fp8=True),
    "b7-fp8-rotary-partial-f32-d256-9:3": Case(batch=7, cache_lens=(100, 17, 600), heads=(9, 3),
                                               head_dim=256, causal=True, block_size=32,
                                               rotary="neox-partial-f32", fp8=True),
    "b7-rotary-sq4-causal-paged16": Case(batch=7, cache_lens=(257, 4096), heads=(9, 3),
                                         seqlen_q=4, causal=True, block_size=16,
                                         rotary="neox"),
    # Long splits (see WIDE_TILE_MIN_KEYS): the CUDA kernel's wide tiles (d = 64: 128 keys at
    # 16 bits, 256 in fp8; d = 96 fp8: 128), short sequences in the same launch, the fused new
    # token, a window whose start is not tile-aligned, tree queries; and a bound far below the
    # lengths (narrow tiles over long sequences: the hint is for speed only).
    "b7-wide-tiles-rotary-paged16": Case(batch=7, cache_lens=(383, 0, 16383, 64, 1),
                                         heads=(32, 8), causal=True, block_size=16,
                                         rotary="neox"),
    "b7-fp8-wide-tiles-rotary-paged16": Case(batch=7, cache_lens=(383, 0, 16383, 64, 1),
                                             heads=(32, 8), causal=True, block_size=16,
                                             rotary="neox", fp8=True),
    "b2-wide-tiles-window-splits4": Case(batch=2, cache_lens=(33000, 2000), heads=(9, 3),
                                         window=(5000, -1), causal=True, num_splits=4),
    "b3-wide-tiles-sq4-tree-paged32": Case(batch=3, cache_lens=(5000, 1, 3000), heads=(32, 8),
                                           seqlen_q=4, tree=True, block_size=32, num_splits=2),
    "b3-fp8-wide-tiles-sq4-tree-paged32": Case(batch=3, cache_lens=(5000, 1, 3000),
                                               heads=(32, 8), seqlen_q=4, tree=True,
                                               block_size=32, num_splits=2, fp8=True),
    "b2-fp8-wide-tiles-d96-window": Case(batch=2, cache_lens=(9000, 700), heads=(9, 3),
                                         head_dim=96, window=(4000, -1), causal=True,
                                         num_splits=2, fp8=True),
    "b2-narrow-hint-long-rotary-paged16": Case(batch=2, cache_lens=(33000, 17), heads=(32, 8),
                                               causal=True, block_size=16, rotary="neox",
                                               max_seqlen_k=1),
    "b2-fp8-narrow-hint-long": Case(batch=2, cache_lens=(33000, 17), heads=(9, 3), fp8=True,
                                    max_seqlen_k=100),
    # The CUDA decode layout runs key-major up to 8 packed rows: the full 8, a tree, a window
    # and d = 256 (Q read from shared memory per tile), in fp8 and 16 bits.
    "b7-fp8-mqa8:1-d128-paged16": Case(batch=7, cache_lens=(4096, 17, 257), heads=(8, 1),
                                       head_dim=128, fp8=True, block_size=16),
    "b3-key-major-sq5-tree-paged32": Case(batch=3, cache_lens=(5000, 1, 3000), heads=(4, 4),
                                          seqlen_q=5, tree=True, block_size=32, num_splits=2),
    "b3-fp8-key-major-sq5-tree-paged32": Case(batch=3, cache_lens=(5000, 1, 3000), heads=(4, 4),
                                              seqlen_q=5, tree=True, block_size=32,
                                              num_splits=2, fp8=True),
    "b2-fp8-window-gqa28:4-splits2": Case(batch=2, cache_lens=(9000, 700), heads=(28, 4),
                                          window=(4000, -1), causal=True, num_splits=2,
                                          fp8=True),
    "b7-fp8-d256-decode-paged16": Case(batch=7, cache_lens=(257, 4096), heads=(8, 2),
                                       head_dim=256, fp8=True, block_size=16),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_kvcache_attention_gpu(backend, dtype, case):
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    check_kvcache_attention(case, dtype, backend, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("q_scale", [2.0**20, 2.0**-30], ids=["large", "tiny"])
@pytest.mark.parametrize("heads,seqlen_q,head_dim", [((9, 3), 1, 64), ((8, 2), 9, 128),
                                                     ((4, 4), 1, 256)])
def test_fp8_cache_with_bf16_queries_beyond_fp16_range(backend, q_scale, heads, seqlen_q,
                                                       head_dim):
    """bf16 queries whose values overflow fp16 (2^20 x randn) or vanish under its subnormals
    (2^-30 x randn), with the softmax scale divided by as much: fp8 caches attend in fp16, so
    the kernel must rescale q rows, not just convert them."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    case = Case(batch=3, cache_lens=(300, 17, 2000), heads=heads, seqlen_q=seqlen_q,
                head_dim=head_dim, causal=True, fp8=True, block_size=16, q_scale=q_scale)
    check_kvcache_attention(case, torch.bfloat16, backend, "cuda")


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
def test_kvcache_attention_poisoned_outputs(backend, device, poisoned_outputs):
    """Outputs and split workspaces start as NaN: every element must be written."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    for case in (Case(num_splits=1), Case(num_splits=5, seqlen_q=3, causal=True)):
        check_kvcache_attention(case, torch.float16, backend, device)


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
def test_kvcache_attention_split_count_invariance(backend, device):
    """Any split count gives the same attention (to rounding), including empty splits."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    args = make_inputs(Case(cache_lens=(200, 5), new_kv=False, heads=(4, 1)), torch.float16,
                       device)
    ref_out, ref_lse = reference.flash_attn_with_kvcache(**args, return_lse=True)
    lowp_out, _ = reference.flash_attn_with_kvcache(**args, return_lse=True, upcast=False)
    for splits in (1, 2, 4, 7, 16):
        args["num_splits"] = splits
        out, lse = ember.ops.flash_attn_with_kvcache(**args, return_lse=True, backend=backend)
        assert_within_lowp_error(out, ref_out, lowp_out, name=f"out, {splits} splits")
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
def test_short_sequences_in_a_long_cache_run_unsplit(backend, device):
    """The partition rule's threshold: a sequence of at most MAX_UNSPLIT_KEYS keys runs as one
    split even when the capacity's plan has many, so the planned call gives exactly the output
    and LSE of num_splits=1. Two forced splits of the same keys fold their partials instead,
    which changes the float32 LSE's rounding: the comparison can tell the two apart."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    block, width, pool = 16, 2048, 80  # capacity 32768 keys: the plan splits (128 on an H100)
    assert _split_kv.plan_splits(_split_kv.sm_count(torch.device(device)), 2, 1, width * block,
                                 64).num_splits > 1
    lens = torch.tensor([300, _split_kv.MAX_UNSPLIT_KEYS - 1], dtype=torch.int32, device=device)
    k_cache = torch.randn(pool, block, 1, 64, dtype=torch.float16, device=device)
    v_cache = torch.randn_like(k_cache)
    table = torch.zeros(2, width, dtype=torch.int32, device=device)
    table[:, :pool // 2] = torch.randperm(pool, dtype=torch.int32, device=device).view(2, -1)
    q = torch.randn(2, 1, 4, 64, dtype=torch.float16, device=device)

    def run(num_splits):
        return ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                 block_table=table, num_splits=num_splits,
                                                 return_lse=True, backend=backend)
    (planned, planned_lse), (one, one_lse), (_, two_lse) = run(0), run(1), run(2)
    assert torch.equal(planned, one) and torch.equal(planned_lse, one_lse)
    assert not torch.equal(two_lse, one_lse)
    ref = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                           block_table=table)
    lowp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                            block_table=table, upcast=False)
    assert_within_lowp_error(planned, ref, lowp)


@pytest.mark.cuda
def test_cuda_split_counters_are_left_at_zero():
    """The CUDA backend reuses its split-KV arrival counters across calls without zeroing them:
    every launch must leave each counter it used at zero (idle splits, a sequence without
    keys, one live split, more splits than tiles), and the results stay right."""
    from ember.ops import _cuda_decode

    for lens, splits in (((200, 5), 7), ((0, 300), 16), ((64, 1), 3), ((1000, 999), 2)):
        args = make_inputs(Case(cache_lens=lens, new_kv=False, heads=(8, 2), num_splits=splits),
                           torch.float16, "cuda")
        for _ in range(2):
            out = ember.ops.flash_attn_with_kvcache(**args, backend="cuda")
            ref = reference.flash_attn_with_kvcache(**args)
            lowp = reference.flash_attn_with_kvcache(**args, upcast=False)
            assert_within_lowp_error(out, ref, lowp, name=f"lengths {lens}, {splits} splits")
    torch.cuda.synchronize()
    assert _cuda_decode._counters
    for counters in _cuda_decode._counters.values():
        assert int(torch.count_nonzero(counters)) == 0


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_kernels_clamp_lengths_past_the_cache(backend, device, paged):
    """Inside a CUDA graph no length is checked on the host; a kernel handed cache_seqlens past
    the cache attends to the whole cache instead of reading beyond it."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    from ember.ops import _registry

    capacity, block = 96, 16
    q = torch.randn(3, 1, 4, 64, device=device, dtype=torch.float16)
    if paged:
        k_cache = torch.randn(3 * capacity // block, block, 2, 64, device=device,
                              dtype=torch.float16)
        table = torch.randperm(k_cache.shape[0], device=device, dtype=torch.int32).view(3, -1)
    else:
        k_cache = torch.randn(3, capacity, 2, 64, device=device, dtype=torch.float16)
        table = None
    v_cache = torch.randn_like(k_cache)
    lengths = torch.tensor([1 << 30, capacity + 1, 50], device=device, dtype=torch.int32)
    kernel = _registry.implementation("flash_attn_with_kvcache", backend)
    out, _ = kernel(q, k_cache, v_cache, lengths, table, 0.125, False, -1, -1, 0, capacity,
                    None, None, None)
    clamped = lengths.clamp(max=capacity)
    ref = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=clamped,
                                            block_table=table, softmax_scale=0.125)
    lowp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=clamped,
                                             block_table=table, softmax_scale=0.125,
                                             upcast=False)
    assert_within_lowp_error(out, ref, lowp)


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
def test_kvcache_attention_defaults(backend, device):
    """No cache_seqlens means the whole cache; the default scale is 1/sqrt(d); return_lse=False
    gives the output alone."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    q = torch.randn(2, 1, 4, 64, device=device, dtype=torch.float16)
    k_cache = torch.randn(2, 40, 2, 64, device=device, dtype=torch.float16)
    v_cache = torch.randn(2, 40, 2, 64, device=device, dtype=torch.float16)
    out = ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, backend=backend)
    assert isinstance(out, torch.Tensor)
    ref = reference.flash_attn_with_kvcache(q, k_cache, v_cache)
    lowp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, upcast=False)
    assert_within_lowp_error(out, ref, lowp)


def _bad_block_table(a):
    a["block_table"] = a["block_table"].clone()
    a["block_table"][1, 0] = a["k_cache"].shape[0]  # one past the pool, in use by sequence 1


def _all_float32(a):
    # The torch backend takes float32; the kernels do not.
    a.update({name: a[name].float() for name in ("q", "k", "v", "k_cache", "v_cache")})


def _fp8_without_scales(a):
    a["k_cache"], a["v_cache"] = a["k_cache"].to(FP8), a["v_cache"].to(FP8)


@pytest.mark.parametrize("mutate,error,match", [
    (_bad_block_table, ValueError, r"block_table\[1, 0\] .* not a block index"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"] + 1000), ValueError,
     "exceeds the cache capacity"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens must have dtype"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError,
     "block_table must have dtype"),
    (lambda a: a.update(k_cache=a["k_cache"].to(torch.bfloat16)), TypeError,
     "k_cache must have dtype"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), ValueError, "v_cache must have shape"),
    (lambda a: a.update(k=a["k"][..., :1, :]), ValueError, "k must have shape"),
    (lambda a: a.update(v=None), ValueError, "k and v must be given together"),
    (lambda a: a.update(q=a["q"][:, :, :3]), ValueError, "multiple of heads"),
    (_all_float32, ValueError, "does not support dtype"),
    (_fp8_without_scales, ValueError, "k_scale is required"),
    (lambda a: a.update(k_scale=torch.ones(1)), ValueError, "k_scale/v_scale are only valid"),
    (lambda a: a.update(tree_mask=torch.ones(2, 3, 3, dtype=torch.bool)), ValueError,
     "tree_mask must have shape"),
    (lambda a: a.update(tree_mask=torch.ones(2, 1, 1, dtype=torch.bool), causal=True),
     ValueError, "tree_mask replaces the causal mask"),
    (lambda a: a.update(num_splits=-1), ValueError, "num_splits must be >= 0"),
    (lambda a: a.update(max_seqlen_k=0), ValueError, "max_seqlen_k must be > 0"),
    (lambda a: a.update(max_seqlen_k=2.5), TypeError, "max_seqlen_k must be an int"),
    (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size left"),
])
def test_kvcache_attention_errors(mutate, error, match):
    args = make_inputs(Case(block_size=16), torch.float16, "cpu")
    mutate(args)
    with pytest.raises(error, match=match):
        ember.ops.flash_attn_with_kvcache(**args, backend="triton")


def test_kvcache_attention_unsupported_head_dim_errors():
    args = make_inputs(Case(head_dim=80), torch.float16, "cpu")
    with pytest.raises(ValueError, match="does not support head_dim 80"):
        ember.ops.flash_attn_with_kvcache(**args, backend="triton")


# ----------------------------------------------------------------------------------------------
# merge_attn_states
# ----------------------------------------------------------------------------------------------

def _merge_inputs(tokens, heads, d, dtype, device):
    # Outputs sliced from wider tensors (strided tokens/heads); LSEs of different magnitudes,
    # with empty states (-inf) on one side, on the other, and on both.
    out_a = torch.randn(tokens, heads + 1, d, device=device, dtype=dtype)[:, 1:]
    out_b = torch.randn(tokens, heads, 2 * d, device=device, dtype=dtype)[..., :d]
    lse_a = torch.randn(heads, tokens, device=device) * 4
    lse_b = torch.randn(heads, tokens, device=device) * 4 + 1
    lse_a[0, ::3] = float("-inf")
    lse_b[-1, ::4] = float("-inf")
    lse_a[:, 0] = lse_b[:, 0] = float("-inf")
    # Where a side is empty its output is zeros, as attention over no key gives.
    out_a.masked_fill_((lse_a == float("-inf")).T[..., None], 0.0)
    out_b.masked_fill_((lse_b == float("-inf")).T[..., None], 0.0)
    return out_a, lse_a, out_b, lse_b


def check_merge(tokens, heads, d, dtype, backend, device):
    inputs = _merge_inputs(tokens, heads, d, dtype, device)
    ref_out, ref_lse = reference.merge_attn_states(*inputs)
    lowp_out, lowp_lse = reference.merge_attn_states(*inputs, upcast=False)
    out, lse = ember.ops.merge_attn_states(*inputs, backend=backend)
    assert out.shape == (tokens, heads, d) and out.dtype == dtype
    assert lse.shape == (heads, tokens) and lse.dtype == torch.float32
    assert_within_lowp_error(out, ref_out, lowp_out, name="out")
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    assert torch.all(out.transpose(0, 1)[empty] == 0)
    if not empty.all():
        assert_within_lowp_error(lse[~empty], ref_lse[~empty], lowp_lse[~empty], name="lse")


@pytest.mark.parametrize("backend,device", _backend_params("merge_attn_states"))
@pytest.mark.parametrize("tokens,heads,d", [(1, 1, 64), (17, 3, 96), (37, 4, 128), (5, 2, 256)])
def test_merge_attn_states(backend, device, tokens, heads, d, poisoned_outputs):
    _skip_unimplemented("merge_attn_states", backend)
    check_merge(tokens, heads, d, torch.float16, backend, device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_merge_attn_states_gpu(backend):
    _skip_unimplemented("merge_attn_states", backend)
    for dtype in (torch.bfloat16, torch.float16):
        check_merge(4097, 32, 128, dtype, backend, "cuda")
        check_merge(257, 9, 256, dtype, backend, "cuda")


@pytest.mark.parametrize("backend,device", _backend_params("merge_attn_states"))
def test_merge_attn_states_is_attention_over_the_union(backend, device):
    """Merging attention over keys [0, 40) and [40, 100) gives attention over [0, 100)."""
    _skip_unimplemented("merge_attn_states", backend)
    q = torch.randn(1, 5, 4, 64, device=device, dtype=torch.float16)
    k = torch.randn(1, 100, 4, 64, device=device, dtype=torch.float16)
    v = torch.randn(1, 100, 4, 64, device=device, dtype=torch.float16)
    whole_out, whole_lse = reference.flash_attn_func(q, k, v, return_lse=True)
    parts = []
    for keys in (slice(0, 40), slice(40, 100)):
        out, lse = reference.flash_attn_func(q, k[:, keys], v[:, keys], return_lse=True)
        parts += [out[0], lse[0]]
    out, lse = ember.ops.merge_attn_states(*parts, backend=backend)
    # Only the halves' rounding to fp16 separates the merged from the whole attention.
    torch.testing.assert_close(out, whole_out[0], atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(lse, whole_lse[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.__setitem__(3, a[3][:, :-1]), ValueError, "lse_b must have shape"),
    (lambda a: a.__setitem__(1, a[1].half()), TypeError, "lse_a must have dtype"),
    (lambda a: a.__setitem__(2, a[2].float()), TypeError, "out_b must have dtype"),
    (lambda a: a.__setitem__(1, a[1].T.contiguous().T), ValueError, "lse_a must be contiguous"),
])
def test_merge_attn_states_errors(mutate, error, match):
    inputs = list(_merge_inputs(5, 2, 64, torch.float16, "cpu"))
    mutate(inputs)
    with pytest.raises(error, match=match):
        ember.ops.merge_attn_states(*inputs, backend="triton")


# ----------------------------------------------------------------------------------------------
# The split-KV heuristic
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_sms", [8, 108, 132])
@pytest.mark.parametrize("batch,heads_kv", [(1, 1), (1, 8), (3, 3), (16, 8), (64, 8), (256, 8)])
@pytest.mark.parametrize("max_len", [1, 17, 255, 4096, 33000, 131072])
def test_split_plan_invariants(num_sms, batch, heads_kv, max_len):
    block_n = 64
    tiles = math.ceil(max_len / block_n)
    plan = _split_kv.plan_splits(num_sms, batch, heads_kv, max_len, block_n)
    assert 1 <= plan.num_splits <= min(tiles, _split_kv.MAX_AUTO_SPLITS)
    # The splits cover every tile, and none of them is empty for the longest sequence, unless
    # the plan is one program per SM.
    assert plan.tiles_per_split * plan.num_splits >= tiles
    work = batch * heads_kv
    if plan.tiles_per_split * (plan.num_splits - 1) >= tiles:
        assert _split_kv.ONE_PER_SM_FILL * num_sms <= work * plan.num_splits <= num_sms
    assert plan.unsplit_tiles == _split_kv.MAX_UNSPLIT_KEYS // block_n
    if work >= _split_kv.FULL_ENOUGH * _split_kv.PROGRAMS_PER_SM * num_sms:
        assert plan.num_splits == 1, "a full GPU gains nothing from splitting"
    # Never launch many more programs than the GPU runs at once only to split further.
    if plan.num_splits > 1:
        assert work * plan.num_splits <= 2 * _split_kv.PROGRAMS_PER_SM * num_sms


def test_cuda_plan_takes_wide_tiles_only_for_long_splits_or_latency_bound_launches():
    """The CUDA decode launch takes wide tiles when the longest sequence gives each split of the
    capacity's plan WIDE_TILE_MIN_KEYS keys (by cache element size and whether it splits), or,
    for 16-bit caches, when every sequence runs unsplit on fewer CTAs than SMs; and only where a
    wide shape exists. The split count never depends on the lengths (one CUDA graph serves them
    all)."""
    from ember.ops import _cuda_decode, _ext

    if _ext.load_extension() is None:
        pytest.skip("needs ember._C")
    plan = functools.partial(_cuda_decode._launch_plan.__wrapped__, 132)
    # (batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, num_splits, fp8, max_seqlen_k)
    long = plan(1, 1, 32, 8, 64, 131072, 0, False, 131072)
    short = plan(1, 1, 32, 8, 64, 131072, 0, False, 1024)  # 32 keys a split
    assert long[2] and not short[2] and long[:2] == short[:2]
    # Tiles up to which a sequence runs unsplit: MAX_UNSPLIT_KEYS in the launch's tile width.
    assert short[3] == _split_kv.MAX_UNSPLIT_KEYS // 64
    assert long[3] == _split_kv.MAX_UNSPLIT_KEYS // 128
    # Latency-bound: every sequence unsplit (the engine's batch-1 decode of the 1B shape, 8 CTAs)
    unsplit = _split_kv.MAX_UNSPLIT_KEYS
    assert plan(1, 1, 32, 8, 64, 131072, 0, False, unsplit)[2]
    assert plan(16, 1, 32, 8, 64, 131072, 0, False, unsplit)[2]  # 128 CTAs
    assert not plan(17, 1, 32, 8, 64, 131072, 0, False, unsplit)[2]  # 136 CTAs
    assert not plan(1, 1, 32, 8, 64, 131072, 0, False, unsplit + 1)[2]
    assert not plan(1, 1, 32, 8, 64, 131072, 0, True, unsplit)[2]  # fp8: 16 keys a split
    assert not plan(1, 1, 32, 8, 64, 131072, 4, False, unsplit)[2]  # forced splits
    assert plan(1, 1, 32, 8, 64, 131072, 1, False, unsplit)[2]  # one forced split: the same
    assert plan(2, 1, 9, 3, 64, 33001, 4, False, 33001)[3] == 0  # forced splits: as given
    assert plan(1, 1, 32, 8, 64, 131072, 0, True, 131072)[2]  # fp8: 256-key tiles
    assert not plan(1, 1, 32, 8, 64, 131072, 0, True, 1024)[2]  # 32 keys a split
    assert plan(1, 1, 32, 8, 64, 131072, 0, True, 4096)[2]  # 128 keys a split
    assert plan(2, 1, 9, 3, 64, 33001, 4, False, 33001)[2]  # forced splits of 8k keys
    assert plan(2, 1, 9, 3, 64, 33001, 64, False, 33001)[2]  # splits of 516 keys
    assert not plan(2, 1, 9, 3, 64, 33001, 80, False, 33001)[2]  # 413 keys
    assert not plan(128, 1, 9, 3, 64, 1024, 0, False, 1024)[2]  # unsplit, 1024 keys
    assert plan(64, 1, 9, 3, 64, 2048, 0, False, 2048)[2]  # unsplit, 2048 keys
    assert not plan(1, 1, 32, 8, 128, 131072, 0, False, 131072)[2]  # bf16 d = 128: one width
    assert plan(1, 1, 32, 8, 128, 131072, 0, True, 131072)[2]  # fp8 d = 128: 128-key tiles
    assert not plan(1, 65, 16, 16, 64, 131072, 0, False, 131072)[2]  # the append layout


def test_split_plan_fills_the_gpu_for_long_single_sequences():
    # Decode of one long sequence with 8 KV heads on an H100: 8 programs would use 6% of it.
    plan = _split_kv.plan_splits(132, 1, 8, 32768, 64)
    assert plan.num_splits * 8 >= 0.8 * _split_kv.PROGRAMS_PER_SM * 132
    # More sequences leave less to split.
    assert _split_kv.plan_splits(132, 8, 8, 32768, 64).num_splits < plan.num_splits


def test_split_plan_takes_one_program_per_sm_where_the_heads_divide_the_sms():
    # GQA 9:3 at batch 1 on an H100: 44 splits x 3 kv heads = 132 CTAs, one on every SM.
    for max_len in (4096, 32768, 131072):
        assert _split_kv.plan_splits(132, 1, 3, max_len, 64).num_splits == 44
    assert _split_kv.plan_splits(108, 1, 3, 131072, 64).num_splits == 36
    # 8 kv heads: 16 splits would leave 4 SMs idle, so two programs an SM (about 264).
    assert _split_kv.plan_splits(132, 1, 8, 131072, 64).num_splits == 32
    # Too few tiles for a split on every SM: fewer splits, as before.
    assert _split_kv.plan_splits(132, 1, 3, 1024, 64).num_splits <= 16
    # A kernel whose programs do not stream well alone (Triton on fp8 caches) keeps two an SM.
    for max_len in (32768, 131072):
        plan = _split_kv.plan_splits(132, 1, 3, max_len, 128, alone_streams=False)
        assert plan.num_splits == 86


@pytest.mark.parametrize("num_splits", [1, 3, 64, 1000])
def test_split_plan_honours_explicit_counts(num_splits):
    plan = _split_kv.plan_splits(132, 1, 8, 300, 64, num_splits=num_splits)
    assert plan.num_splits == num_splits
    assert plan.tiles_per_split == max(1, math.ceil(5 / num_splits))
    assert plan.unsplit_tiles == 0


def test_sm_count_off_gpu_is_nominal():
    assert _split_kv.sm_count(torch.device("cpu")) == _split_kv.NOMINAL_SMS



def test_kvcache_rotary_bad_arguments():
    args = make_inputs(Case(rotary="neox"), torch.float16, "cpu")
    cos, sin = args["rotary_cos"], args["rotary_sin"]
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
        ember.ops.flash_attn_with_kvcache(**dict(args, rotary_sin=None))
    with pytest.raises(ValueError, match="pass k and v too"):
        ember.ops.flash_attn_with_kvcache(**dict(args, k=None, v=None))
    with pytest.raises(ValueError, match="rotary_sin"):
        ember.ops.flash_attn_with_kvcache(**dict(args, rotary_sin=sin[:, :-1]))
    with pytest.raises(ValueError, match="fewer than the positions"):
        ember.ops.flash_attn_with_kvcache(**dict(args, rotary_cos=cos[:-1], rotary_sin=sin[:-1]))
    with pytest.raises(ValueError, match="rotary_dim <= head_dim"):
        wide = torch.zeros(cos.shape[0], 33)
        ember.ops.flash_attn_with_kvcache(**dict(args, rotary_cos=wide.half(),
                                                 rotary_sin=wide.half()))


@pytest.mark.parametrize("backend,device", _backend_params("flash_attn_with_kvcache"))
def test_kvcache_decode_tree_mask_hiding_the_new_token(backend, device):
    """A one-token tree mask that hides the new token is honoured on every path (the CUDA
    one-kernel decode with new k/v must not take it)."""
    _skip_unimplemented("flash_attn_with_kvcache", backend)
    args = make_inputs(Case(cache_lens=(40, 9), rotary="neox"), torch.float16, device)
    args["tree_mask"] = torch.zeros(2, 1, 1, dtype=torch.bool, device=device)
    ref_args, lowp_args = _clone_caches(args), _clone_caches(args)
    ref = reference.flash_attn_with_kvcache(**ref_args)
    lowp = reference.flash_attn_with_kvcache(**lowp_args, upcast=False)
    out = ember.ops.flash_attn_with_kvcache(**args, backend=backend)
    assert_within_lowp_error(out, ref, lowp, name="out")
