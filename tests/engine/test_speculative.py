"""Speculative decoding with n-gram drafts on a tiny random Llama (CPU, float32).

Every position a step verifies is sampled with the request's own random stream at that output
index, so with speculation on, greedy and seeded requests must produce exactly the tokens they
produce with it off, whatever stops them; the tests also check that drafts were accepted, so
that the equality is not that of two engines that never speculated.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_checkpoints import TINY_VOCAB as VOCAB
from tiny_checkpoints import random_prompts, save_tiny_checkpoint

import ember
from ember import SamplingParams
from ember.engine.speculative import (
    NgramIndex,
    SpeculativeConfig,
    accepted_path,
    merge_chains,
    ngram_draft,
    tree_attention_mask,
)

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def generated(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def workload():
    """Random prompts, and prompts that repeat a random phrase (so n-gram drafts find
    matches from the first step on)."""
    phrases = random_prompts(4, VOCAB, [3, 5, 8, 4], seed=11)
    return random_prompts(4, VOCAB, [1, 7, 30, 12], seed=10) + [p * 4 for p in phrases]


@pytest.fixture
def make(tiny_llama):
    def make_llm(**kwargs):
        kwargs.setdefault("num_kv_blocks", 256)
        return ember.LLM(str(tiny_llama[0]), **kwargs)

    return make_llm


def run(llm, prompts, params):
    return generated(llm.generate(token_prompts(prompts), params, use_tqdm=False))


# ----------------------------------------------------------------------------------------------
# Drafts and acceptance
# ----------------------------------------------------------------------------------------------

def test_ngram_draft_takes_the_latest_occurrence_of_the_longest_suffix():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
    # Suffix [5, 6] occurs at 0 and 4; the latest (4) is followed by 8, 2, 5, 6.
    assert ngram_draft(tokens, 3, 2, 1) == [8, 2, 5]
    assert ngram_draft(tokens, 9, 2, 1) == [8, 2, 5, 6]
    # A longer suffix is tried first: [2, 5, 6] never occurred before, [5, 6] did.
    assert ngram_draft(tokens, 2, 3, 2) == [8, 2]
    # Only suffixes of at least lookup_min tokens count.
    assert ngram_draft([1, 2, 3, 9, 3], 2, 3, 2) == []
    assert ngram_draft([1, 2, 3, 9, 3], 2, 3, 1) == [9, 3]
    # The continuation may run into the suffix itself (a repeating token).
    assert ngram_draft([4, 4, 4], 5, 2, 1) == [4]
    assert ngram_draft([7], 4, 3, 1) == [] and ngram_draft([1, 2, 1], 0, 3, 1) == []


def brute_force_draft(tokens, max_tokens, lookup_max, lookup_min):
    """The definition: the latest earlier occurrence of the longest suffix that has one."""
    for n in range(lookup_max, lookup_min - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if n <= len(tokens) - 1 and tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + max_tokens]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40),
       sizes=st.tuples(st.integers(1, 4), st.integers(0, 3)), max_tokens=st.integers(0, 5),
       calls=st.lists(st.integers(1, 40), max_size=6))
def test_incremental_ngram_index_matches_the_definition(tokens, sizes, max_tokens, calls):
    """One index asked again as its list grows (as a sequence's is) answers like the
    definition on the whole list each time."""
    lookup_min, lookup_max = sizes[0], sizes[0] + sizes[1]
    index = NgramIndex(lookup_min, lookup_max)
    for length in sorted(calls) + [len(tokens)]:
        prefix = tokens[:length]
        drafted, parents = index.draft(prefix, max_tokens)
        assert drafted == brute_force_draft(prefix, max_tokens, lookup_max, lookup_min)
        assert parents == list(range(-1, len(drafted) - 1))  # one candidate: a chain


def test_accepted_path_follows_the_sampled_tokens():
    # A chain: drafts accepted while they equal the samples at their parents.
    chain = [-1, 0, 1]
    assert accepted_path([3, 4, 5], chain, [3, 4, 9, 1]) == [0, 1]
    assert accepted_path([3, 4, 5], chain, [3, 4, 5, 7]) == [0, 1, 2]
    assert accepted_path([3], [-1], [2, 3]) == []
    assert accepted_path([], [], [8]) == []
    # A tree: 5 -> (6 -> 7), (8 -> 9); the sample picks the branch.
    tokens, parents = [5, 6, 7, 8, 9], [-1, 0, 1, 0, 3]
    assert accepted_path(tokens, parents, [5, 8, 0, 0, 9, 2]) == [0, 3, 4]
    assert accepted_path(tokens, parents, [5, 6, 7, 0, 0, 0]) == [0, 1, 2]
    assert accepted_path(tokens, parents, [5, 1, 0, 0, 0, 0]) == [0]


def test_candidates_merge_into_a_tree():
    assert merge_chains([[5, 6, 7], [5, 8, 9], [5, 6, 1]], 9) == (
        [5, 6, 7, 8, 9, 1], [-1, 0, 1, 0, 3, 1])
    assert merge_chains([[5, 6, 7], [5, 8, 9]], 4) == ([5, 6, 7, 8], [-1, 0, 1, 0])
    assert merge_chains([[1, 2], [3]], 9) == ([1, 2, 3], [-1, 0, -1])
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
    # Suffix [5, 6] ends at 1 and 5: the latest continuation first, then the earlier one.
    assert NgramIndex(1, 2, candidates=2).draft(tokens, 4) == ([8, 2, 5, 6], [-1, 0, 1, 2])
    assert NgramIndex(1, 2, candidates=2).draft(tokens, 6) == (
        [8, 2, 5, 6, 7, 1], [-1, 0, 1, 2, -1, 4])
    mask = tree_attention_mask([-1, 0, -1])
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [True, False, False, True]]


@pytest.mark.parametrize("bad, match", [
    ({"method": "eagle"}, "method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_max": True}, "prompt_lookup_max"),
    ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"draft_model": "x"}, "unknown speculative settings"),
])
def test_bad_speculative_settings_raise(make, bad, match):
    with pytest.raises(ValueError, match=match):
        make(speculative=bad)


def test_speculation_excludes_async_scheduling(make):
    with pytest.raises(ValueError, match="async_scheduling"):
        make(speculative=SPEC, async_scheduling=True)
    with pytest.raises(ValueError, match="speculative must be"):
        make(speculative=4)
    assert make(speculative=SpeculativeConfig()).config.async_scheduling is False


# ----------------------------------------------------------------------------------------------
# Same tokens with speculation on and off
# ----------------------------------------------------------------------------------------------

def test_greedy_identical_and_drafts_accepted(make):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    want = run(make(), workload(), params)
    llm = make(speculative=SPEC)
    steps = []
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        steps.append(sum(batch.num_draft_tokens))
        return batch

    llm.scheduler.schedule = spy
    assert run(llm, workload(), params) == want
    stats = llm.stats()
    print(f"greedy: {stats['spec_accepted_tokens']} of {stats['spec_draft_tokens']} drafts "
          f"accepted")
    assert stats["spec_accepted_tokens"] > 20
    # Accepted drafts save steps: fewer steps than the 40 a lone decode needs.
    assert len(steps) < 40 and any(steps)


def test_seeded_sampling_identical_and_drafts_accepted(make):
    # A low temperature keeps the repeating pattern likely, so sampled tokens often equal the
    # drafts; top-k and top-p exercise the full sampler on every verified position.
    params = [SamplingParams(temperature=0.3, top_k=5, top_p=0.95, max_tokens=30, seed=i)
              for i in range(len(workload()))]
    want = run(make(), workload(), params)
    llm = make(speculative=SPEC)
    assert run(llm, workload(), params) == want
    assert llm.stats()["spec_accepted_tokens"] > 10


TREE_SPEC = {**SPEC, "num_speculative_tokens": 6, "num_candidates": 3}


def tree_workload():
    """Prompts where one phrase is followed by different continuations: n-gram lookup finds
    several candidates, merged into trees."""
    phrases = random_prompts(3, VOCAB, [3, 4, 2], seed=12)
    tails = random_prompts(9, VOCAB, [2, 3, 4], seed=13)
    return [sum((phrase + tails[3 * i + j] for j in range(3)), []) + phrase
            for i, phrase in enumerate(phrases)] + workload()


def test_tree_drafts_give_the_same_tokens(make):
    """Tree attention over several candidates: greedy and seeded tokens as without
    speculation; some accepted paths leave the first chain (their K/V are computed again)."""
    llm = make(speculative=TREE_SPEC)
    trees = []
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        trees.append(sum(1 for s in batch.seqs if any(
            p != i - 1 for i, p in enumerate(s.draft_parents))))
        return batch

    llm.scheduler.schedule = spy
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    assert run(llm, tree_workload(), greedy) == run(make(), tree_workload(), greedy)
    seeded = [SamplingParams(temperature=0.3, top_k=5, max_tokens=30, seed=i)
              for i in range(len(tree_workload()))]
    assert run(llm, tree_workload(), seeded) == run(make(), tree_workload(), seeded)
    stats = llm.stats()
    print(f"trees: {sum(trees)} verified, {stats['spec_accepted_tokens']} of "
          f"{stats['spec_draft_tokens']} drafts accepted, {stats['spec_recomputed_tokens']} "
          f"recomputed")
    assert sum(trees) > 10 and stats["spec_accepted_tokens"] > 20
    assert stats["spec_recomputed_tokens"] > 0


def test_tree_drafts_need_full_attention(tmp_path):
    save_tiny_checkpoint(tmp_path, "mistral", vocab_size=VOCAB)  # sliding window
    with pytest.raises(ValueError, match="tree drafts.*sliding-window"):
        ember.LLM(str(tmp_path), num_kv_blocks=8, speculative=TREE_SPEC)
    assert ember.LLM(str(tmp_path), num_kv_blocks=8, speculative=SPEC).proposer is not None


def test_stops_inside_accepted_drafts(make):
    """Stop tokens, min_tokens and max_tokens end a request at the same token with or without
    speculation, also when a verified step spans the stopping position."""
    prompts = workload()
    free = run(make(), prompts, SamplingParams(temperature=0.0, max_tokens=30))
    # Each output repeats some token: stop on it. And stop on a token that first appears at
    # output index i >= 4, with min_tokens = i: positions before i must not sample it, the
    # one at i must (a verified step that spans i starts below min_tokens).
    cases = []
    for prompt, out in zip(prompts[4:], free[4:], strict=True):
        repeated = max(set(out), key=out.count)
        fresh = next(i for i in range(4, len(out)) if out[i] not in out[:i])
        cases += [(prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                          stop_token_ids=[repeated])),
                  (prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                          stop_token_ids=[out[fresh]], min_tokens=fresh))]
    cases += [(prompts[-1], SamplingParams(temperature=0.0, max_tokens=n)) for n in (2, 7)]
    llm, reference = make(speculative=SPEC), make()
    for prompt, params in cases:
        want = reference.generate(token_prompts([prompt]), params, use_tqdm=False)[0]
        got = llm.generate(token_prompts([prompt]), params, use_tqdm=False)[0]
        assert (got.outputs[0].token_ids, got.outputs[0].finish_reason,
                got.outputs[0].stop_reason) == (want.outputs[0].token_ids,
                                                want.outputs[0].finish_reason,
                                                want.outputs[0].stop_reason), params
    assert llm.stats()["spec_accepted_tokens"] > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_preemption_and_prefix_caching_with_speculation(make):
    params = SamplingParams(temperature=0.0, max_tokens=30)
    prompts = workload()
    want = run(make(enable_prefix_caching=False), prompts, params)
    # 10 blocks of 16 tokens for 8 requests of up to 62 tokens: preemption is a must.
    tight = make(num_kv_blocks=10, max_model_len=160, speculative=SPEC)
    assert run(tight, prompts, params) == want
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert tight.block_manager.num_free_blocks == 10
    # Follow-up requests extend earlier prompts with their outputs: the prefix cache must hold
    # only verified tokens (a block hashed with rejected drafts would give wrong hits).
    follow = [p + w + p[:5] for p, w in zip(prompts, want, strict=True)]
    llm = make(speculative=SPEC)
    run(llm, prompts, params)
    assert run(llm, follow, params) == run(make(enable_prefix_caching=False), follow, params)
    assert llm.stats()["prefix_cache_hit_tokens"] > 0


def test_drafts_never_crowd_out_decodes(make):
    """Drafts get only the token budget left after one token for every running sequence:
    with a budget of 4, every running sequence is still scheduled in every step."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = workload()[4:]
    want = run(make(), prompts, params)
    llm = make(speculative=SPEC, max_num_seqs=4, max_num_batched_tokens=4)
    steps = []
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        steps.append((len(batch.seqs), len(llm.scheduler.running), sum(batch.num_draft_tokens)))
        return batch

    llm.scheduler.schedule = spy
    assert run(llm, prompts, params) == want
    assert all(scheduled == running for scheduled, running, _ in steps)
    assert any(drafts for _, running, drafts in steps if running > 1)


@pytest.mark.cuda
def test_speculation_on_the_gpu(tmp_path, tiny_llama):
    """The CUDA engine path (pinned sample buffers holding a step's drafts too, the sampler on
    the device): float32, where greedy and seeded tokens must match plain decoding; and bf16
    with CUDA graphs for plain decode steps and eager verification steps in one run."""
    prompts = workload()
    greedy = SamplingParams(temperature=0.0, max_tokens=30)
    seeded = [SamplingParams(temperature=0.3, top_k=5, max_tokens=30, seed=i)
              for i in range(len(prompts))]
    args = dict(device="cuda", num_kv_blocks=256, max_num_seqs=16)
    plain = ember.LLM(str(tiny_llama[0]), dtype="float32", enforce_eager=True, **args)
    spec = ember.LLM(str(tiny_llama[0]), dtype="float32", enforce_eager=True, speculative=SPEC,
                     **args)
    for params in (greedy, seeded):
        assert run(spec, prompts, params) == run(plain, prompts, params)
    assert spec.stats()["spec_accepted_tokens"] > 20
    del plain, spec
    # A float32 self-draft on the GPU: its own cache, filled between scheduling and launch.
    drafted = ember.LLM(str(tiny_llama[0]), dtype="float32", enforce_eager=True,
                        speculative=draft_spec(), **args)
    plain = ember.LLM(str(tiny_llama[0]), dtype="float32", enforce_eager=True, **args)
    assert run(drafted, prompts, greedy) == run(plain, prompts, greedy)
    stats = drafted.stats()
    assert stats["spec_accepted_tokens"] >= 0.9 * stats["spec_draft_tokens"] > 0
    del drafted, plain
    # CUDA graphs need a head dim the attention kernels take (the torch reference syncs).
    save_tiny_checkpoint(tmp_path, "llama", head_dim=64)
    graphs = ember.LLM(str(tmp_path), dtype="bfloat16", speculative=SPEC, **args)
    assert graphs.stats()["cuda_graph_batch_sizes"]
    outs = run(graphs, prompts, greedy)
    assert [len(o) for o in outs] == [30] * len(prompts)  # (the tiny model has no EOS)
    assert graphs.stats()["spec_accepted_tokens"] > 0
    assert graphs.block_manager.num_free_blocks == 256


# ----------------------------------------------------------------------------------------------
# Draft models
# ----------------------------------------------------------------------------------------------

def draft_spec(**kwargs):
    return {"method": "draft_model", "num_speculative_tokens": 4, **kwargs}


def test_self_draft_is_always_accepted(make):
    """The target drafting for itself in float32 proposes its own greedy tokens: all of them
    are accepted, which holds only if the draft cache follows every sequence exactly (its
    catch-up after each step, accepted drafts kept, preemption)."""
    params = SamplingParams(temperature=0.0, max_tokens=30)
    want = run(make(), workload(), params)
    llm = make(speculative=draft_spec(), num_kv_blocks=10, max_model_len=160)
    assert run(llm, workload(), params) == want
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["spec_draft_tokens"] > 100
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]


@pytest.mark.parametrize("spec", [SPEC, TREE_SPEC, draft_spec()], ids=["chain", "tree", "draft"])
def test_speculation_over_an_fp8_kv_cache_gives_plain_decodings_tokens(make, spec):
    """Verified drafts write and read the fp8 cache as plain decoding does (their K/V
    quantized, with the cache's scales; a draft model's cache fp8 too), so greedy tokens do
    not change with speculation on."""
    params = SamplingParams(temperature=0.0, max_tokens=30)
    prompts = workload() + tree_workload()
    want = run(make(kv_cache_dtype="fp8"), prompts, params)
    llm = make(kv_cache_dtype="fp8", speculative=spec)
    assert run(llm, prompts, params) == want
    assert llm.stats()["spec_accepted_tokens"] > 0
    if spec["method"] == "draft_model":
        assert llm.proposer.kv_caches[0].k.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_self_draft_gives_the_same_tokens(make, quantization):
    greedy = SamplingParams(temperature=0.0, max_tokens=30)
    seeded = [SamplingParams(temperature=0.3, top_k=5, max_tokens=30, seed=i)
              for i in range(len(workload()))]
    llm = make(speculative=draft_spec(quantization=quantization))
    for params in (greedy, seeded):
        assert run(llm, workload(), params) == run(make(), workload(), params)
    assert llm.stats()["spec_accepted_tokens"] > 0


def test_another_model_drafts(make, tmp_path):
    from tiny_checkpoints import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "draft", "llama", vocab_size=VOCAB, seed=99,
                         num_hidden_layers=1)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    llm = make(speculative=draft_spec(model=str(tmp_path / "draft")))
    assert run(llm, workload(), params) == run(make(), workload(), params)
    assert llm.stats()["spec_draft_tokens"] > 0
    save_tiny_checkpoint(tmp_path / "other-vocab", "llama", vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="draft model's vocabulary .301 tokens. is not"):
        make(speculative=draft_spec(model=str(tmp_path / "other-vocab")))
    with pytest.raises(ValueError, match="num_candidates > 1 .trees. is for method 'ngram'"):
        make(speculative=draft_spec(num_candidates=2))
    with pytest.raises(ValueError, match="speculative quantization must be"):
        make(speculative=draft_spec(quantization="int2"))


def test_the_draft_cache_shares_the_kv_budget(tiny_llama):
    """On CPU the cache gets kv_cache_memory_cpu bytes: a same-size draft model's cache takes
    half of each block."""
    plain = ember.LLM(str(tiny_llama[0]), kv_cache_memory_cpu=1 << 20)
    drafted = ember.LLM(str(tiny_llama[0]), kv_cache_memory_cpu=1 << 20,
                        speculative=draft_spec())
    assert drafted.block_manager.num_blocks == plain.block_manager.num_blocks // 2
