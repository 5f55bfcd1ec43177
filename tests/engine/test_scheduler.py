"""Scheduler: continuous batching, chunked prefill, preemption; simulated without a model.

The simulation keeps a fake KV cache whose slot holds the identity of the prefix it was
computed from (K/V at position p depend on tokens 0..p), so reading a slot written for another
prefix, or a slot never written, is caught exactly as wrong attention would be.
"""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_block_manager import check_invariants

from ember.engine.block_manager import BlockManager
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence, SequenceStatus


class Simulation:
    def __init__(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                 chunked=True, prefix_caching=True, seed=0):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens,
                               enable_chunked_prefill=chunked)
        self.max_model_len = num_blocks * block_size
        self.kv = {}  # slot -> tuple of the tokens its K/V were computed from
        self.rng = random.Random(seed)
        self.seqs = []
        self.steps = 0

    def slot(self, seq, position):
        bs = self.bm.block_size
        return seq.block_table[position // bs] * bs + position % bs

    def add(self, prompt, max_tokens):
        seq = Sequence(f"r{len(self.seqs)}", prompt, SamplingParams(max_tokens=max_tokens),
                       max_model_len=self.max_model_len)
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def step(self):
        self.execute(self.sched.schedule())

    def execute(self, batch):
        assert batch, "the scheduler stalled with unfinished requests"
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        assert all(n == 1 for n in batch.num_new_tokens[:batch.num_decodes])
        assert all(n > 1 for n in batch.num_new_tokens[batch.num_decodes:])
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        live = [s for s in self.seqs if s.block_table]
        check_invariants(self.bm, live)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert seq.status == SequenceStatus.RUNNING
            start = seq.num_computed_tokens
            assert len(seq.block_table) * self.bm.block_size >= start + n
            # The "model": write this chunk's K/V, then read the whole context back.
            for p in range(start, start + n):
                self.kv[self.slot(seq, p)] = tuple(seq.token_ids[:p + 1])
            for p in range(start + n):
                assert self.kv.get(self.slot(seq, p)) == tuple(seq.token_ids[:p + 1]), \
                    f"{seq} reads a K/V slot of another prefix at position {p}"
        self.sched.complete(batch)
        for seq in batch.seqs:
            if seq.num_computed_tokens == len(seq):
                seq.token_ids.append(self.rng.randrange(3))
                if seq.num_output_tokens >= seq.max_tokens:
                    self.sched.finish(seq, "length")
        self.steps += 1

    def run(self, max_steps=5000):
        while self.sched.has_unfinished():
            self.step()
            assert self.steps < max_steps, "requests never finish"


def test_decodes_and_prompt_chunks_share_a_step():
    sim = Simulation(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    a = sim.add(list(range(3)), max_tokens=10)
    sim.step()  # a's prompt
    b = sim.add(list(range(20)), max_tokens=2)
    batch = sim.sched.schedule()
    # a decodes (1 token) and b's prompt is chunked into the remaining 7.
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7] and batch.num_decodes == 1
    sim.execute(batch)
    assert b.num_computed_tokens == 7 and b.num_output_tokens == 0
    sim.run()
    assert a.num_output_tokens == 10 and b.num_output_tokens == 2


def test_without_chunked_prefill_prompts_are_whole():
    sim = Simulation(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                     chunked=False)
    sim.add(list(range(10)), max_tokens=3)
    sim.add(list(range(50, 60)), max_tokens=3)
    batch = sim.sched.schedule()
    assert batch.num_new_tokens == [10]  # the second prompt waits for a step with room
    sim.seqs[0].num_computed_tokens = 10
    sim.seqs[0].token_ids.append(1)
    batch = sim.sched.schedule()
    assert batch.num_new_tokens == [1, 10]


def test_max_num_seqs_limits_running():
    sim = Simulation(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        sim.add([i, i + 1], max_tokens=4)
    batch = sim.sched.schedule()
    assert len(batch.seqs) == 2 and len(sim.sched.waiting) == 3


def test_preemption_takes_the_newest_and_recomputes():
    # 6 blocks of 2: three requests with 4-token prompts fill them; growth must preempt.
    sim = Simulation(num_blocks=6, block_size=2, max_num_seqs=3, max_num_batched_tokens=12,
                     prefix_caching=False)
    seqs = [sim.add([10 * i + j for j in range(4)], max_tokens=4) for i in range(3)]
    sim.step()
    assert sim.bm.num_free_blocks == 0
    sim.step()  # each needs a third block: the newest is preempted, freeing two for the others
    assert [s.status for s in seqs[:2]] == [SequenceStatus.RUNNING] * 2
    assert list(sim.sched.waiting) == [seqs[2]] and seqs[2].block_table == []
    assert seqs[2].num_preemptions == 1 and sim.sched.num_preemptions == 1
    sim.run()
    assert all(s.is_finished and s.num_output_tokens == 4 for s in seqs)


def test_finish_frees_blocks_of_waiting_and_running():
    sim = Simulation(num_blocks=16, block_size=4, max_num_seqs=1, max_num_batched_tokens=8)
    a = sim.add(list(range(6)), max_tokens=5)
    b = sim.add(list(range(6)), max_tokens=5)
    sim.step()
    sim.sched.finish(b, "abort")  # waiting
    sim.sched.finish(a, "abort")  # running
    assert not sim.sched.has_unfinished()
    assert sim.bm.num_free_blocks == 16
    assert a.finish_reason == b.finish_reason == "abort"


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_workloads_finish_with_consistent_cache(data):
    block_size = data.draw(st.sampled_from([1, 2, 4, 16]), label="block_size")
    num_blocks = data.draw(st.integers(2, 40), label="num_blocks")
    chunked = data.draw(st.booleans(), label="chunked prefill")
    max_num_seqs = data.draw(st.integers(1, 6), label="max_num_seqs")
    capacity = num_blocks * block_size
    budget = data.draw(st.integers(max_num_seqs, max_num_seqs + 40), label="token budget")
    if not chunked:
        budget = max(budget, capacity)  # the engine's rule: a whole prompt fits one step
    sim = Simulation(num_blocks, block_size, max_num_seqs, budget, chunked,
                     data.draw(st.booleans(), label="prefix caching"),
                     seed=data.draw(st.integers(0, 1000)))
    num_requests = data.draw(st.integers(1, 12), label="requests")
    base = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=capacity))
    for _ in range(num_requests):
        # Requests share prefixes of one base prompt, then diverge.
        keep = data.draw(st.integers(0, len(base)))
        tail = data.draw(st.lists(st.integers(0, 2), max_size=8))
        prompt = (base[:keep] + tail)[:capacity - 1] or [0]
        room = capacity - len(prompt)
        sim.add(prompt, data.draw(st.integers(1, max(1, min(room, 12)))))
        if data.draw(st.booleans()) and sim.sched.has_unfinished():
            sim.step()  # requests also arrive while others run
    if data.draw(st.booleans()) and sim.sched.has_unfinished():
        # Abort something mid-flight: its blocks must come back.
        victim = data.draw(st.sampled_from([s for s in sim.seqs if not s.is_finished]))
        sim.sched.finish(victim, "abort")
    sim.run()
    assert all(s.is_finished for s in sim.seqs)
    for s in sim.seqs:
        assert s.finish_reason == "abort" or s.num_output_tokens == s.max_tokens
    assert sim.bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in sim.bm.blocks)
