"""The public decode path can be captured in a CUDA graph (value checks skip while capturing)
and its replays compute what eager calls do, on inputs changed in place between replays."""

import pytest
import torch

import ember


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kvcache_decode_captures_and_replays(backend):
    batch, hq, hkv, d, block, max_blocks = 4, 8, 2, 128, 16, 8
    num_blocks = batch * max_blocks
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.randn(num_blocks, block, hkv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(batch, max_blocks)
    lens = torch.randint(1, block * max_blocks - 1, (batch,), device=dev, dtype=torch.int32)
    q = torch.randn(batch, 1, hq, d, device=dev, dtype=dt)
    k = torch.randn(batch, 1, hkv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)

    def step():
        return ember.ops.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                 cache_seqlens=lens, block_table=table,
                                                 causal=True, backend=backend)

    step()  # eager warm-up (compiles Triton kernels, runs the value checks)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured_out = step()
    torch.cuda.current_stream().wait_stream(stream)

    for _ in range(2):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        lens.copy_(torch.randint(1, block * max_blocks - 1, (batch,), device=dev,
                                 dtype=torch.int32))
        caches = k_cache.clone(), v_cache.clone()
        graph.replay()
        got_out, got_caches = captured_out.clone(), (k_cache.clone(), v_cache.clone())
        k_cache.copy_(caches[0])
        v_cache.copy_(caches[1])
        want = step()
        assert torch.equal(got_caches[0], k_cache) and torch.equal(got_caches[1], v_cache)
        assert torch.equal(got_out, want)
