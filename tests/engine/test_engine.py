"""The engine end to end on a tiny random Llama (CPU, float32): greedy tokens must not depend
on batching, chunking, prefix caching or preemption; requests are never dropped."""

import json

import pytest
import torch
from tiny_checkpoints import TINY_VOCAB as VOCAB
from tiny_checkpoints import hf_greedy, random_prompts

import ember
from ember import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def generated(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def relative_error(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def record_batches(llm):
    """Wrap the scheduler so the test sees every step's (num_decodes, num_new_tokens)."""
    seen = []
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        seen.append((batch.num_decodes, list(batch.num_new_tokens)))
        return batch

    llm.scheduler.schedule = spy
    return seen


def test_greedy_matches_transformers(make_llm, tiny_llama):
    prompts = random_prompts(3, VOCAB, [1, 9, 33], seed=1)
    outs = make_llm().generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert generated(outs) == [hf_greedy(tiny_llama[1], p, 12) for p in prompts]


def test_batch_invariance(make_llm):
    """32 requests of mixed lengths together give each one's tokens when run alone."""
    prompts = random_prompts(32, VOCAB, [1, 3, 8, 17, 30, 47, 64, 5], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    together = generated(make_llm(max_num_seqs=32).generate(token_prompts(prompts), params,
                                                            use_tqdm=False))
    alone_llm = make_llm(enable_prefix_caching=False)
    alone = [generated(alone_llm.generate(token_prompts([p]), params, use_tqdm=False))[0]
             for p in prompts]
    assert together == alone
    assert all(len(t) == 10 for t in together)


def test_chunked_prefill_on_off_identical(make_llm):
    prompts = random_prompts(6, VOCAB, [40, 7, 25, 60, 2, 33], seed=3)
    chunked = make_llm(max_num_batched_tokens=16, max_num_seqs=4)
    steps = record_batches(chunked)
    with_chunks = generated(chunked.generate(token_prompts(prompts), GREEDY, use_tqdm=False))
    whole = make_llm(enable_chunked_prefill=False, max_num_batched_tokens=128,
                     max_model_len=128, max_num_seqs=4)
    assert with_chunks == generated(whole.generate(token_prompts(prompts), GREEDY,
                                                   use_tqdm=False))
    # Chunking really happened, mixed with decodes in the same steps.
    assert all(sum(n) <= 16 for _, n in steps)
    assert any(nd > 0 and len(n) > nd for nd, n in steps)


def test_prefix_caching_on_off_identical_and_hits(make_llm):
    shared = random_prompts(1, VOCAB, [50], seed=4)[0]
    tails = random_prompts(5, VOCAB, [1, 4, 9, 16, 3], seed=5)
    prompts = [shared + t for t in tails]
    without = generated(make_llm(enable_prefix_caching=False).generate(
        token_prompts(prompts), GREEDY, use_tqdm=False))
    llm = make_llm(enable_prefix_caching=True)
    # Blocks enter the cache once computed: the first request fills it, the rest hit it.
    first = llm.generate(token_prompts(prompts[:1]), GREEDY, use_tqdm=False)
    rest = llm.generate(token_prompts(prompts[1:]), GREEDY, use_tqdm=False)
    assert generated(first + rest) == without
    stats = llm.stats()
    print(f"prefix cache: {stats['prefix_cache_hit_tokens']} of "
          f"{stats['prefix_cache_query_tokens']} prompt tokens hit")
    # Each later request reuses the 3 full blocks (48 tokens) of the shared 50-token prefix.
    assert [o.num_cached_tokens for o in first + rest] == [0] + [48] * 4
    assert stats["prefix_cache_hit_tokens"] == 4 * 48
    # The same batch again hits more: blocks filled by prompts and outputs are cached too.
    again = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert generated(again) == without
    assert all(o.num_cached_tokens >= 48 for o in again)
    assert any(o.num_cached_tokens > 48 for o in again)


def test_preemption_finishes_everything_identically(make_llm):
    prompts = random_prompts(8, VOCAB, [20, 35, 12, 28], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    roomy = generated(make_llm().generate(token_prompts(prompts), params, use_tqdm=False))
    # 8 blocks of 16 = 128 tokens for 8 requests of up to 65 tokens: preemption is a must.
    tight = make_llm(num_kv_blocks=8, max_model_len=128)
    outs = tight.generate(token_prompts(prompts), params, use_tqdm=False)
    assert generated(outs) == roomy
    assert tight.stats()["num_preemptions"] > 0
    assert tight.block_manager.num_free_blocks == 8


def test_seeded_sampling_reproduces_across_batches_and_preemption(make_llm):
    prompts = random_prompts(4, VOCAB, [10, 30], seed=7)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=25, seed=100 + i)
              for i in range(4)]
    first = generated(make_llm().generate(token_prompts(prompts), params, use_tqdm=False))
    tight = make_llm(num_kv_blocks=5, max_model_len=80)
    second = generated(tight.generate(token_prompts(prompts), params, use_tqdm=False))
    assert tight.stats()["num_preemptions"] > 0
    alone = generated(make_llm().generate(token_prompts(prompts[:1]), params[:1],
                                          use_tqdm=False))
    assert first == second and alone[0] == first[0]
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=25, seed=999)
    assert generated(make_llm().generate(token_prompts(prompts[:1]), other_seed,
                                         use_tqdm=False))[0] != first[0]


def test_unseeded_requests_differ_but_engine_seed_reproduces(make_llm):
    prompt = token_prompts(random_prompts(1, VOCAB, [6], seed=8)) * 2
    params = SamplingParams(temperature=1.0, max_tokens=20)
    a = generated(make_llm(seed=1).generate(prompt, params, use_tqdm=False))
    b = generated(make_llm(seed=1).generate(prompt, params, use_tqdm=False))
    assert a == b and a[0] != a[1]


def test_async_scheduling_runs_ahead_and_drops_rows_of_stopped_requests(make_llm):
    """Decode steps are launched on the previous step's device tokens; a request that stops
    (here on a stop token) while the next step runs gets no token from it, and the outputs
    are those of synchronous stepping."""
    prompts = random_prompts(6, VOCAB, [5, 12, 30], seed=14)
    sync = make_llm(async_scheduling=False)
    free = generated(sync.generate(token_prompts(prompts), GREEDY, use_tqdm=False))
    # Stop each request on its 4th token (an id it has not produced before it, if any).
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t[3]])
              for t in free]
    want = generated(sync.generate(token_prompts(prompts), params, use_tqdm=False))
    assert any(len(t) < 12 for t in want)
    llm = make_llm(async_scheduling=True)
    launches = []
    launch = llm.runner.launch

    def spy(batch, input_ids=None):
        launches.append(input_ids is not None)
        return launch(batch, input_ids)

    llm.runner.launch = spy
    assert generated(llm.generate(token_prompts(prompts), params, use_tqdm=False)) == want
    # Launched ahead: every step but the prompts' and those after a length limit.
    assert sum(launches) >= len(launches) - 2
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert not llm.has_unfinished_requests() and llm.step() == []


def test_add_request_step_and_abort_free_blocks(make_llm):
    llm = make_llm(num_kv_blocks=32)
    prompts = random_prompts(3, VOCAB, [20, 40, 5], seed=9)
    ids = [llm.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=50))
           for p in prompts]
    for _ in range(3):
        outs = llm.step()
    assert {o.request_id for o in outs} == set(ids)
    assert all(not o.finished and o.outputs[0].token_ids for o in outs)
    free_before = llm.block_manager.num_free_blocks
    llm.abort(ids[1])
    assert llm.block_manager.num_free_blocks == free_before + 3  # ceil(43 / 16) blocks
    for _ in range(2):
        assert ids[1] not in {o.request_id for o in llm.step()}
    llm.abort(ids[0])
    llm.abort(ids[2])
    llm.abort("no-such-request")
    assert not llm.has_unfinished_requests() and llm.step() == []
    assert llm.block_manager.num_free_blocks == 32
    assert all(b.ref_count == 0 for b in llm.block_manager.blocks)


def test_step_outputs_are_cumulative_and_finish(make_llm):
    llm = make_llm()
    rid = llm.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3),
                          request_id="mine")
    seen = []
    while llm.has_unfinished_requests():
        seen += llm.step()
    assert rid == "mine" and [len(o.outputs[0].token_ids) for o in seen] == [1, 2, 3]
    assert [o.finished for o in seen] == [False, False, True]
    last = seen[-1]
    assert last.outputs[0].finish_reason == "length" and last.prompt_token_ids == [5, 6, 7]
    assert last.metrics.time_to_first_token >= 0


def test_generate_accepts_prompt_forms_and_keeps_order(make_llm):
    llm = make_llm()
    p = random_prompts(3, VOCAB, [4, 9, 2], seed=10)
    reference = generated(llm.generate(token_prompts(p), GREEDY, use_tqdm=False))
    assert generated(llm.generate(p, GREEDY, use_tqdm=False)) == reference
    assert generated(llm.generate(p[0], GREEDY, use_tqdm=False)) == reference[:1]
    per_prompt = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 5, 3)]
    outs = llm.generate(p, per_prompt, use_tqdm=False)
    assert [len(t) for t in generated(outs)] == [1, 5, 3]
    assert generated(outs) == [r[:n] for r, n in zip(reference, (1, 5, 3), strict=True)]


def test_stream_yields_the_generated_tokens(make_llm):
    llm = make_llm()
    prompt = random_prompts(1, VOCAB, [7], seed=11)[0]
    want = generated(llm.generate([prompt], GREEDY, use_tqdm=False))[0]
    deltas = list(llm.stream({"prompt_token_ids": prompt}, GREEDY))
    assert [t for d in deltas for t in d.token_ids] == want
    assert deltas[-1].finish_reason == "length" and deltas[0].finish_reason is None


def test_max_model_len_ends_generation(make_llm):
    llm = make_llm(max_model_len=20)
    out = llm.generate([list(range(1, 15))], SamplingParams(temperature=0, max_tokens=None),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_token_ids_min_tokens_and_multiple_eos(tiny_llama, tmp_path, async_scheduling):
    folder, hf = tiny_llama
    prompt = random_prompts(1, VOCAB, [9], seed=12)[0]
    free = hf_greedy(hf, prompt, 12)
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])
    # Several EOS ids in generation_config.json, as instruct models ship them.
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    eos = [VOCAB - 1 if free[stop_at] != VOCAB - 1 else VOCAB - 2, free[stop_at]]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    llm = ember.LLM(str(tmp_path), num_kv_blocks=64, async_scheduling=async_scheduling)
    assert llm.eos_token_ids == eos
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert out[0].outputs[0].token_ids == free[:stop_at + 1]
    assert out[0].outputs[0].finish_reason == "stop" and out[0].outputs[0].stop_reason is None
    # transformers stops at the same place with the same generation config.
    hf.generation_config.eos_token_id = eos
    try:
        assert hf_greedy(hf, prompt, 12) == free[:stop_at + 1]
    finally:
        hf.generation_config.eos_token_id = None
    ignoring = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True), use_tqdm=False)
    assert ignoring[0].outputs[0].token_ids == free
    # min_tokens: EOS cannot even be drawn before it.
    late = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                 min_tokens=stop_at + 2), use_tqdm=False)
    tokens = late[0].outputs[0].token_ids
    assert len(tokens) >= stop_at + 2 and not set(tokens[:stop_at + 2]) & set(eos)
    by_id = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  stop_token_ids=[free[2]]), use_tqdm=False)
    first = free.index(free[2])
    assert by_id[0].outputs[0].token_ids == free[:first + 1]
    assert by_id[0].outputs[0].stop_reason == free[2]


@pytest.mark.parametrize("prompt,match", [
    ([], "empty"),
    ([VOCAB], r"token ids must be in \[0, 300\)"),
    ([-1, 3], "token ids must be in"),
    ("text", "no tokenizer"),
    (3.5, "a prompt must be"),
    ({"text": "x"}, "'prompt' or 'prompt_token_ids'"),
    (list(range(1, 65)), "max_model_len is 64"),
])
def test_bad_prompts_raise(make_llm, prompt, match):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_api_misuse_raises(make_llm):
    llm = make_llm()
    with pytest.raises(ValueError, match="must be a SamplingParams"):
        llm.generate([[1, 2]], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1, 2]], [GREEDY, GREEDY], use_tqdm=False)
    llm.add_request([1, 2], request_id="busy")
    with pytest.raises(ValueError, match="already running"):
        llm.add_request([1, 2], request_id="busy")
    with pytest.raises(RuntimeError, match="idle engine"):
        llm.generate([[1, 2]], use_tqdm=False)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_num_seqs=0), "max_num_seqs must be a positive int"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "must be >= max_num_seqs"),
    (dict(block_size=1.5), "block_size must be a positive int"),
    (dict(dtype="int8"), "dtype must be"),
    (dict(device="tpu"), "device"),
    (dict(kernel_backend="fast"), "kernel_backend"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(load_format="pickle"), "load_format"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (dict(max_model_len=4096), "exceeds the model's context length"),
    (dict(num_kv_blocks=2, max_model_len=64), "KV cache holds 32 tokens"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128),
     "max_num_batched_tokens"),
])
def test_bad_engine_config_raises(make_llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_llm(**kwargs)


def test_max_model_len_defaults_fit_the_cache(make_llm):
    assert make_llm(num_kv_blocks=4).max_model_len == 64
    no_chunks = make_llm(enable_chunked_prefill=False, max_num_batched_tokens=100, max_num_seqs=8)
    assert no_chunks.max_model_len == 100


def test_dummy_weights_load_random_model(make_llm):
    llm = make_llm(load_format="dummy")
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12
    assert not torch.isnan(llm.model.embed_tokens.weight).any()


def test_fp8_kv_cache_is_e4m3_and_the_same_through_every_engine_path(tiny_llama):
    """kv_cache_dtype="fp8": float8_e4m3fn caches with scales (a quarter of a float32 cache's
    bytes), and greedy tokens that do not depend on prompt chunking, preemption or prefix-cache
    hits: every path writes K/V quantized and attends over the quantized cache."""
    folder = str(tiny_llama[0])
    prompts = token_prompts(random_prompts(6, VOCAB, [40, 7, 25, 60, 2, 33], seed=3))
    params = SamplingParams(temperature=0.0, max_tokens=20)
    roomy = ember.LLM(folder, kv_cache_dtype="fp8", num_kv_blocks=64)
    cache = roomy.runner.kv_caches[0]
    assert cache.k.dtype == cache.v.dtype == torch.float8_e4m3fn
    assert cache.k_scale.dtype == cache.v_scale.dtype == torch.float32
    plain = ember.LLM(folder, num_kv_blocks=64)
    assert 4 * roomy.stats()["kv_cache_bytes"] == plain.stats()["kv_cache_bytes"]
    want = generated(roomy.generate(prompts, params, use_tqdm=False))
    assert generated(roomy.generate(prompts, params, use_tqdm=False)) == want  # prefix hits
    assert roomy.stats()["prefix_cache_hit_tokens"] > 0
    tight = ember.LLM(folder, kv_cache_dtype="fp8", num_kv_blocks=8, max_model_len=128,
                      max_num_batched_tokens=16, max_num_seqs=4)
    assert generated(tight.generate(prompts, params, use_tqdm=False)) == want
    assert tight.stats()["num_preemptions"] > 0


def test_fp8_kv_cache_quantizes_with_its_scales_and_logits_stay_close(tiny_llama):
    """With scales of 0.25 in an fp8 cache: layer 0 (whose inputs do not depend on the cache)
    stores exactly e4m3(K / 0.25) and e4m3(V / 0.25) of the float32 run's K/V, and the prompt's
    logits differ from the float32 cache's by a few times that rounding (about 2.6% of K and V
    on this model; 6-9% of the logits after two layers, against O(1) if a scale were dropped)."""
    from helpers import prefill_logits

    from ember.engine.model_runner import allocate_kv_cache
    from ember.ops.reference import quantize_fp8_e4m3

    model = ember.LLM(str(tiny_llama[0]), num_kv_blocks=8).model
    ids = random_prompts(1, VOCAB, [45], seed=8)[0]
    exact_caches = allocate_kv_cache(model, 3, 16, "cpu")  # the float32 model's dtype
    fp8_caches = allocate_kv_cache(model, 3, 16, "cpu", "fp8")
    for cache in fp8_caches:
        cache.k_scale.fill_(0.25)
        cache.v_scale.fill_(0.25)
    exact = prefill_logits(model, ids, exact_caches)
    fp8 = prefill_logits(model, ids, fp8_caches)

    def rows(t):  # the prompt's slots 0..44 as [tokens, heads, d]
        return t.flatten(0, 1)[:len(ids)]

    kv_error = 0.0
    for name in ("k", "v"):
        want = rows(getattr(exact_caches[0], name))
        scale = getattr(fp8_caches[0], f"{name}_scale")
        stored = rows(getattr(fp8_caches[0], name))
        assert torch.equal(stored.view(torch.uint8),
                           quantize_fp8_e4m3(want, scale).view(torch.uint8)), name
        kv_error = max(kv_error, relative_error(stored.float() * scale, want))
    error = relative_error(fp8, exact)
    assert 0 < error < 4 * kv_error, (error, kv_error)


def test_decode_steps_on_a_torch_reference_are_not_captured(monkeypatch):
    """An op of the step on its torch reference (a host sync) keeps the engine eager: attention
    asked for on torch, or at a head dim, dtype or block size the kernels do not take; fused_moe
    on torch. Decided from shapes and backends alone, so asked here with the backends a GPU
    machine resolves (cuda attention, triton or torch fused_moe)."""
    from types import SimpleNamespace

    from ember.engine.config import EngineConfig
    from ember.engine.model_runner import decode_op_on_reference

    def model(head_dim=64, dtype=torch.bfloat16, num_experts=0):
        return SimpleNamespace(embed_tokens=torch.nn.Embedding(4, 4, dtype=dtype),
                               config=SimpleNamespace(head_dim=head_dim, num_experts=num_experts))

    def config(**kwargs):
        return EngineConfig(model="tiny", device="cpu", **kwargs)

    cuda = torch.device("cuda")
    for moe_backend in ("triton", "torch"):
        def resolve(op, backend, device, moe=moe_backend):
            return "torch" if backend == "torch" else moe if op == "fused_moe" else "cuda"

        monkeypatch.setattr(ember.ops, "resolve_backend", resolve)
        assert decode_op_on_reference(model(), config(), cuda) is None
        for unsupported in (model(head_dim=16), model(dtype=torch.float32)):
            assert decode_op_on_reference(unsupported, config(), cuda) == "flash_attn_with_kvcache"
        assert decode_op_on_reference(model(), config(block_size=8), cuda) == (
            "flash_attn_with_kvcache")
        assert decode_op_on_reference(model(), config(kernel_backend="torch"), cuda) == (
            "flash_attn_with_kvcache")
        assert decode_op_on_reference(model(num_experts=4), config(), cuda) == (
            "fused_moe" if moe_backend == "torch" else None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,kv_cache_dtype",
                         [("bfloat16", "auto"), ("float16", "auto"), ("bfloat16", "fp8")])
def test_cuda_graphs_match_eager_on_a_random_model(tmp_path, dtype, kv_cache_dtype):
    """Decode through captured CUDA graphs, each step launched before the previous one's
    tokens are read (async scheduling), gives eager synchronous mode's tokens (random weights,
    head_dim 64 so the kernels run; no checkpoint file needed)."""
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    # Fixed KV pools: two engines live at once, and gpu_memory_utilization would hand the whole
    # remainder of the GPU to the first.
    args = dict(load_format="dummy", dtype=dtype, device="cuda", max_num_seqs=64, seed=3,
                num_kv_blocks=512, kv_cache_dtype=kv_cache_dtype)
    eager = ember.LLM(str(tmp_path), enforce_eager=True, async_scheduling=False, **args)
    graphs = ember.LLM(str(tmp_path), **args)  # with async scheduling, CUDA's default
    assert graphs.config.async_scheduling
    assert 32 in graphs.stats()["cuda_graph_batch_sizes"]
    # Same random weights in both engines.
    graphs.model.load_state_dict(eager.model.state_dict())
    prompts = random_prompts(32, 1000, [3, 17, 40, 9], seed=13)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # 32 decodes per step: the graph of 32 runs eager mode's GEMM shapes exactly.
    want = generated(eager.generate(prompts, params, use_tqdm=False))
    assert generated(graphs.generate(prompts, params, use_tqdm=False)) == want
    # Sampled rows too: per-request seeds make the draws batch-independent.
    sampled = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=i)
               for i in range(32)]
    assert generated(graphs.generate(prompts, sampled, use_tqdm=False)) == generated(
        eager.generate(prompts, sampled, use_tqdm=False))


def test_mixtral_tokens_do_not_depend_on_chunking_preemption_or_speculation(tmp_path):
    """The sparse MoE MLP routes each token by itself: a tiny Mixtral gives the same greedy
    tokens with small prompt chunks, a KV cache small enough to preempt, and n-gram drafts."""
    from tiny_checkpoints import save_tiny_checkpoint

    # head_dim 64: the attention kernels take it, so the decode steps can be captured.
    save_tiny_checkpoint(tmp_path, "mixtral", vocab_size=VOCAB, seed=5, head_dim=64)
    prompts = random_prompts(6, VOCAB, [9, 33, 2, 20], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    roomy = ember.LLM(str(tmp_path), num_kv_blocks=128, max_num_seqs=6)
    want = generated(roomy.generate(token_prompts(prompts), params, use_tqdm=False))
    tight = ember.LLM(str(tmp_path), num_kv_blocks=6, max_model_len=96,
                      max_num_batched_tokens=16, max_num_seqs=6,
                      speculative={"num_speculative_tokens": 3})
    assert generated(tight.generate(token_prompts(prompts), params, use_tqdm=False)) == want
    assert tight.stats()["num_preemptions"] > 0


@pytest.mark.cuda
def test_mixtral_on_the_gpu(tmp_path):
    """bf16 on CUDA: with fused_moe's Triton kernel the decode steps replay CUDA graphs and give
    eager mode's tokens; on its torch reference (a host sync per expert) the engine runs
    eagerly."""
    from tiny_checkpoints import save_tiny_checkpoint

    # head_dim 64: the attention kernels take it, so the decode steps can be captured.
    save_tiny_checkpoint(tmp_path, "mixtral", vocab_size=VOCAB, seed=5, head_dim=64)
    args = dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=8)
    prompts = random_prompts(8, VOCAB, [9, 33], seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    eager = ember.LLM(str(tmp_path), enforce_eager=True, **args)
    graphs = ember.LLM(str(tmp_path), **args)
    assert 8 in graphs.stats()["cuda_graph_batch_sizes"]
    want = generated(eager.generate(token_prompts(prompts), params, use_tqdm=False))
    assert generated(graphs.generate(token_prompts(prompts), params, use_tqdm=False)) == want
    del eager, graphs
    reference = ember.LLM(str(tmp_path), kernel_backend="torch", **args)
    assert reference.stats()["cuda_graph_batch_sizes"] == []
    outs = generated(reference.generate(token_prompts(prompts), params, use_tqdm=False))
    assert [len(o) for o in outs] == [8] * 8


@pytest.mark.cuda
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("boundary", ["unsplit", "short"])
def test_cuda_graphs_match_eager_across_the_short_context_boundary(tmp_path, kv_cache_dtype,
                                                                   boundary):
    """Sequences that grow past a length bucket's bound move to the next bucket's graphs
    mid-generation, with eager mode's tokens: past MAX_UNSPLIT_KEYS (unsplit, wide tiles at
    16 bits for a small batch) into the short-context graphs (narrow tiles), and past
    SHORT_CONTEXT_KEYS into the full ones (wide tiles where each split is long)."""
    from ember.engine.cuda_graphs import SHORT_CONTEXT_KEYS
    from ember.ops._split_kv import MAX_UNSPLIT_KEYS

    bound = MAX_UNSPLIT_KEYS if boundary == "unsplit" else SHORT_CONTEXT_KEYS

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 65536}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = dict(load_format="dummy", dtype="bfloat16", device="cuda", max_num_seqs=4, seed=5,
                num_kv_blocks=1024, kv_cache_dtype=kv_cache_dtype)
    eager = ember.LLM(str(tmp_path), enforce_eager=True, async_scheduling=False, **args)
    graphs = ember.LLM(str(tmp_path), **args)
    graphs.model.load_state_dict(eager.model.state_dict())
    lengths = [bound - 30, bound - 5, 40, bound + 300]
    prompts = random_prompts(4, 1000, lengths, seed=21)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert generated(graphs.generate(prompts, params, use_tqdm=False)) == generated(
        eager.generate(prompts, params, use_tqdm=False))
