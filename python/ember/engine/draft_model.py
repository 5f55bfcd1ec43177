"""Speculative decoding's draft model: a smaller model, or an int8/int4 copy of the target
(``speculative={"method": "draft_model", "model": ..., "quantization": ...}``), proposes a
chain of greedy tokens that the target then verifies (speculative.py).

The draft model has its own paged KV cache, with the same block geometry as the target's and
read through the same block tables, so the target's block manager covers both. A draft's K/V
is only ever used to propose: if it is stale, drafts get worse, outputs stay exact. For each
sequence the proposer remembers how many leading tokens its cache holds; before proposing, it
computes the ones it has not seen (the whole prompt the first time, then the tokens the last
step appended), which gives the first draft, then one more draft per single-token step. This
runs once the step is scheduled, when the blocks of the draft positions exist: ``propose``
only asks for room, ``fill`` computes the tokens.
"""

import weakref

import numpy as np
import torch

from ember.engine.model_runner import flat_layout, to_device
from ember.engine.sequence import Sequence
from ember.engine.speculative import Proposer, SpeculativeConfig


class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, model, kv_caches: list, block_size: int):
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        # seq -> (tokens whose draft K/V is valid, drafts computed past them, preemptions seen)
        self._state = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence) -> tuple:
        """Room for a chain of drafts (placeholders until ``fill``)."""
        room = max(0, min(self.config.num_speculative_tokens,
                          seq.max_tokens - seq.num_output_tokens - 1))
        return [0] * room, list(range(-1, room - 1))

    def _cached(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` whose draft K/V is valid; a preemption freed its blocks."""
        cached, _, preemptions = self._state.get(seq, (0, 0, seq.num_preemptions))
        return cached if preemptions == seq.num_preemptions else 0

    @torch.inference_mode()
    def fill(self, batch) -> None:
        jobs = [(seq, batch.drafts_of(i)) for i, seq in enumerate(batch.seqs)
                if batch.drafts_of(i)]
        if not jobs:
            return
        # Step 0: every token the draft cache lacks, through the last one; its logits give the
        # first draft. Step j: draft j at its position, giving draft j + 1.
        inputs = {}
        for seq, _ in jobs:
            start = min(self._cached(seq), len(seq) - 1)
            inputs[seq] = (start, seq.token_ids[start:])
        for step in range(max(count for _, count in jobs)):
            active = [seq for seq, count in jobs if step < count]
            tokens = self._greedy_next(active, inputs)
            for seq, token in zip(active, tokens, strict=True):
                seq.draft_token_ids[step] = token
                start, chunk = inputs[seq]
                inputs[seq] = (start + len(chunk), [token])
        for seq, count in jobs:
            # Valid for sure: the real tokens. The first count - 1 drafts were computed too and
            # stay valid as far as they are accepted (``verified``).
            self._state[seq] = (len(seq), count - 1, seq.num_preemptions)

    def verified(self, seq: Sequence, accepted: int) -> None:
        state = self._state.get(seq)
        if state is not None:
            cached, drafts_computed, preemptions = state
            self._state[seq] = (cached + min(accepted, drafts_computed), 0, preemptions)

    def _greedy_next(self, seqs: list, inputs: dict) -> list:
        """One draft forward over each sequence's chunk ``inputs[seq] = (first position,
        tokens)``: the greedy next token after each chunk."""
        device = self.model.embed_tokens.weight.device
        starts = [inputs[s][0] for s in seqs]
        counts = [len(inputs[s][1]) for s in seqs]
        first_row, positions, meta = flat_layout(seqs, starts, counts, 0, self.block_size,
                                                 device)
        ids = to_device(np.concatenate([np.asarray(inputs[s][1], dtype=np.int64)
                                        for s in seqs]), device)
        hidden = self.model(ids, to_device(positions, device), meta, self.kv_caches)
        last_rows = to_device(first_row + np.asarray(counts) - 1, device)
        return self.model.compute_logits(hidden[last_rows]).float().argmax(dim=-1).tolist()
