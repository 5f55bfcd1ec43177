"""store_kvcache: scattering new K/V rows into the paged cache, against copy bandwidth."""

import math

import torch

from bench import harness
from bench.harness import Rotation, ember_backends, suite

OP = "store_kvcache"
HEADS, HEAD_DIM, BLOCK_SIZE = 8, 128, 16      # Llama-3-8B's KV heads, vLLM's default block
TOKENS = (256, 4096, 32768)                   # a decode batch, a prefill chunk, a long prefill
QUICK_TOKENS = (32768,)
INPUT_DTYPE = torch.bfloat16
CACHE_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
ANCHOR = "torch-ref"


def store_kvcache_bytes(num_tokens: int, heads: int, head_dim: int, in_bytes: int,
                        cache_bytes: int, fp8_scales: bool = False) -> float:
    """Bytes one call must move: read k and v, write both into the cache, read the int64 slot
    of each token (and the two float32 scales of an fp8 cache)."""
    rows = 2 * num_tokens * heads * head_dim
    return float(rows * (in_bytes + cache_bytes) + 8 * num_tokens + (8 if fp8_scales else 0))


def _make_inputs(num_tokens: int, cache_dtype: torch.dtype):
    blocks_used = math.ceil(num_tokens / BLOCK_SIZE)
    num_blocks = blocks_used + blocks_used // 4 + 1   # a pool with free blocks left over
    k = torch.randn(num_tokens, HEADS, HEAD_DIM, device=harness.DEVICE, dtype=INPUT_DTYPE)
    v = torch.randn(num_tokens, HEADS, HEAD_DIM, device=harness.DEVICE, dtype=INPUT_DTYPE)
    cache_shape = (num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, device=harness.DEVICE).to(cache_dtype)
    v_cache = torch.randn(cache_shape, device=harness.DEVICE).to(cache_dtype)
    # As in a prefill: tokens fill whole blocks in order, the blocks taken at random from the pool.
    blocks = torch.randperm(num_blocks, device=harness.DEVICE)[:blocks_used]
    token = torch.arange(num_tokens, device=harness.DEVICE)
    slots = blocks[token // BLOCK_SIZE] * BLOCK_SIZE + token % BLOCK_SIZE
    k_scale = v_scale = None
    if cache_dtype == torch.float8_e4m3fn:
        k_scale = torch.rand(1, device=harness.DEVICE) * 0.05 + 0.01
        v_scale = torch.rand(1, device=harness.DEVICE) * 0.05 + 0.01
    return k, v, k_cache, v_cache, slots, k_scale, v_scale


def _providers(backends):
    import ember.ops
    from ember.ops import _registry, reference

    providers = {}
    for backend in backends:
        providers[f"ember-{backend}"] = (
            lambda *args, b=backend: ember.ops.store_kvcache(*args, backend=b))
        # The kernel alone, without the public function's validation (which reads the slot
        # range back to the host): shows what that check costs.
        providers[f"ember-{backend}-kernel"] = _registry.implementation(OP, backend)
    providers[ANCHOR] = reference.store_kvcache
    return providers


def _check(fn, inputs) -> str:
    """Run ``fn`` once on copies of the caches and compare them bit for bit with the reference."""
    from ember.ops import reference

    k, v, k_cache, v_cache, slots, k_scale, v_scale = inputs
    want_k, want_v = k_cache.clone(), v_cache.clone()
    got_k, got_v = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(k, v, want_k, want_v, slots, k_scale, v_scale)
    fn(k, v, got_k, got_v, slots, k_scale, v_scale)
    same = (torch.equal(got_k.view(torch.uint8), want_k.view(torch.uint8))
            and torch.equal(got_v.view(torch.uint8), want_v.view(torch.uint8)))
    return "exact" if same else "MISMATCH"


@suite("store_kvcache", order=10, description=f"""
    Scatter of new K/V rows into a paged cache ({HEADS} KV heads × d={HEAD_DIM}, block
    {BLOCK_SIZE}, bf16 inputs, bf16 or fp8 e4m3 cache, tokens filling randomly placed blocks).
    GB/s = (read k, v + write k/v cache + read int64 slots) / time; the fraction is of the copy
    bandwidth. `ember-<b>` is the public `ember.ops.store_kvcache`, `ember-<b>-kernel` the
    backend alone without input validation; `{ANCHOR}` is the torch reference (index_put).""")
def run(ctx):
    backends, notes = ember_backends(OP)
    for message in notes:
        ctx.note(message)
    for cache_dtype in CACHE_DTYPES:
        for num_tokens in QUICK_TOKENS if ctx.quick else TOKENS:
            rot = Rotation(lambda n=num_tokens, dt=cache_dtype: _make_inputs(n, dt))
            first = rot.inputs[0]
            providers = _providers(backends)
            extras = {}
            for name, fn in providers.items():
                if name.startswith("ember-") and not name.endswith("-kernel"):
                    check = ctx.guarded(f"{name} check ({num_tokens} tokens, {cache_dtype})",
                                        lambda f=fn, args=first: _check(f, args))
                    if check is None:
                        continue
                    extras[name] = {"check": check}
                    if check != "exact":
                        ctx.note(f"{name} wrote a different cache than the reference "
                                 f"({num_tokens} tokens, {cache_dtype}): its numbers are void")
            fp8 = cache_dtype == torch.float8_e4m3fn
            ctx.bench(op=OP, params={"tokens": num_tokens, "heads": HEADS, "head_dim": HEAD_DIM,
                                     "cache": str(cache_dtype).removeprefix("torch.")},
                      flops=0,
                      bytes=store_kvcache_bytes(num_tokens, HEADS, HEAD_DIM,
                                                INPUT_DTYPE.itemsize, cache_dtype.itemsize, fp8),
                      providers={name: rot.bind(fn) for name, fn in providers.items()},
                      anchors=(ANCHOR,), extras=extras)
