"""BlockManager: allocation, reference counts, prefix caching and LRU eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.block_manager import BlockManager, chain_hash
from ember.engine.sampling_params import SamplingParams
from ember.engine.sequence import Sequence


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, tokens, SamplingParams(), max_model_len=10_000)


def compute(bm: BlockManager, seq: Sequence, num_new: int, cached=()) -> bool:
    """Allocate, then pretend the step ran: the tokens are computed and full blocks cached."""
    if not bm.allocate(seq, num_new, cached):
        return False
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)
    return True


def check_invariants(bm: BlockManager, live_seqs):
    """Reference counts match the block tables; free = blocks with count 0; cached blocks hold
    the tokens their hash names."""
    refs = [0] * bm.num_blocks
    for seq in live_seqs:
        for b in seq.block_table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert all(r >= 0 for r in refs)
    assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}
    assert bm.num_free_blocks + sum(1 for r in refs if r) == bm.num_blocks
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h
    for seq in live_seqs:
        previous = None
        for i, b in enumerate(seq.block_table):
            block = bm.blocks[b]
            tokens = seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size]
            if block.hash is not None:
                # A cached block in a table holds exactly that sequence's tokens and prefix.
                assert block.token_ids == tuple(tokens)
                assert block.hash == chain_hash(previous, tokens)
            previous = chain_hash(previous, tokens) if len(tokens) == bm.block_size else None


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert compute(bm, seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    check_invariants(bm, [seq])
    seq.token_ids.append(99)
    assert compute(bm, seq, 1)  # 11 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    bm.free_sequence(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    check_invariants(bm, [])


def test_allocate_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(9)))
    assert not bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2 and seq.num_computed_tokens == 0


def test_prefix_hit_shares_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)) + [50], "a")
    assert bm.find_cached_prefix(a) == []
    assert compute(bm, a, len(a))
    b = make_seq(list(range(12)) + [60, 61], "b")
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_table[:3]
    assert bm.allocate(b, len(b) - 12, cached)
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    assert bm.prefix_hit_tokens == 12 and bm.prefix_query_tokens == len(a) + len(b)
    check_invariants(bm, [a, b])


def test_prefix_lookup_never_covers_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)), "a")
    assert compute(bm, a, 8)
    # Same 8 tokens: only the first block may be reused, the last token must be computed.
    assert bm.find_cached_prefix(make_seq(list(range(8)), "b")) == a.block_table[:1]


def test_prefix_lookup_checks_tokens_not_only_hashes():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(9)), "a")
    assert compute(bm, a, 9)
    # Forge a collision: block 0's hash entry now claims different tokens.
    bm.blocks[a.block_table[0]].token_ids = (9, 9, 9, 9)
    assert bm.find_cached_prefix(make_seq(list(range(9)), "b")) == []


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    assert compute(bm, a, 5)  # 3 blocks, the first two full and cached
    full = a.block_table[:2]
    partial = a.block_table[2]
    bm.free_sequence(a)
    bm.forget(a)
    # The unhashed partial block is handed out first, then the never-used one.
    order = list(bm.free)
    assert order[0] == partial and set(order[-2:]) == set(full)
    # The tail block of a freed sequence is evicted before its head.
    assert order[-2:] == [full[1], full[0]]
    again = make_seq([1, 2, 3, 4, 7], "again")
    assert bm.find_cached_prefix(again) == full
    # Take every free block: the cached ones get evicted and the hash map forgets them.
    hog = make_seq(list(range(100, 108)), "hog")
    assert compute(bm, hog, 8)
    assert bm.cached == {} or all(bm.blocks[b].ref_count for b in bm.cached.values())
    assert bm.find_cached_prefix(again) == []
    check_invariants(bm, [hog])


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5], "a")
    assert compute(bm, a, 5)
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []
    assert bm.cached == {}


def test_cached_blocks_only_start_a_table():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3], "a")
    assert bm.allocate(a, 3)
    with pytest.raises(ValueError, match="cached blocks"):
        bm.allocate(a, 1, [0])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_operations_keep_invariants(data):
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    bm = BlockManager(data.draw(st.integers(4, 24), label="num_blocks"), block_size,
                      data.draw(st.booleans(), label="prefix caching"))
    live = []
    for step in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(["admit", "grow", "free"]))
        if op == "admit":
            # A tiny alphabet makes shared prefixes common.
            tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=12))
            seq = make_seq(tokens, f"s{step}")
            cached = bm.find_cached_prefix(seq)
            num_new = len(seq) - len(cached) * block_size
            free_before = bm.num_free_blocks
            if compute(bm, seq, num_new, cached):
                live.append(seq)
            else:
                assert bm.num_free_blocks == free_before and seq.block_table == []
        elif op == "grow" and live:
            seq = data.draw(st.sampled_from(live))
            seq.token_ids.append(data.draw(st.integers(0, 2)))
            if not compute(bm, seq, 1):
                seq.token_ids.pop()
        elif op == "free" and live:
            seq = data.draw(st.sampled_from(live))
            live.remove(seq)
            bm.free_sequence(seq)
            bm.forget(seq)
        check_invariants(bm, live)
