"""Scheduler: which sequences compute how many tokens in the next step.

Continuous batching under two limits: at most ``max_num_seqs`` running sequences and at most
``max_num_batched_tokens`` tokens per step. Each step first serves the running sequences in
arrival order (a decode costs one token; a sequence still in its prompt gets the next chunk),
then admits waiting ones first-come first-served, their prompts chunked to fit the budget
(chunked prefill), so prompt chunks and decodes share one step.

When a running sequence needs a block and none is free, the newest running sequence is
preempted by recompute: its blocks are released and it returns to the front of the queue, to
be recomputed (prompt and generated tokens) later, often from the prefix cache. The oldest
sequence is never preempted for a newer one, and a lone sequence always fits (the engine
checks that the cache holds ``max_model_len`` tokens), so every request finishes.
"""

from collections import deque
from dataclasses import dataclass, field

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens starting at its
    ``num_computed_tokens``, the last ``num_draft_tokens[i]`` of them its leading draft tokens
    (speculative decoding; empty when no sequence has drafts). The first ``num_decodes``
    entries compute one token each."""

    seqs: list = field(default_factory=list)
    num_new_tokens: list = field(default_factory=list)
    num_decodes: int = 0
    num_draft_tokens: list = field(default_factory=list)

    def drafts_of(self, i: int) -> int:
        return self.num_draft_tokens[i] if self.num_draft_tokens else 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        picked: list = []  # (seq, num_new_tokens) in scheduling order
        preempted: list = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # A decode, or the next chunk of a prompt (only with chunked prefill).
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            # Draft tokens (speculative decoding) only from what the budget keeps after one
            # token for each running sequence behind this one, and only in free blocks: drafts
            # never crowd out a decode or preempt a sequence.
            drafts = min(len(seq.draft_token_ids), budget - num_new - (len(self.running) - i - 1))
            if drafts > 0 and self.block_manager.allocate(seq, num_new + drafts):
                num_new += drafts
            elif not self._allocate_or_preempt(seq, num_new, preempted):
                break  # ``seq`` preempted itself: it was the last running sequence
            picked.append((seq, num_new))
            budget -= num_new
            i += 1

        # Admitting new work while evicting running work would only thrash.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(seq)
            num_new = len(seq) - len(cached) * self.block_manager.block_size
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, num_new))
            budget -= num_new

        # Decodes first: the model runner attends to them with the decode kernel.
        picked.sort(key=lambda item: item[1] != 1)
        seqs, counts = [s for s, _ in picked], [n for _, n in picked]
        drafts = [max(0, s.num_computed_tokens + n - len(s)) for s, n in picked]
        return ScheduledBatch(seqs=seqs, num_new_tokens=counts,
                              num_decodes=sum(1 for n in counts if n == 1),
                              num_draft_tokens=drafts if any(drafts) else [])

    def complete(self, batch: ScheduledBatch) -> None:
        """Record that ``batch`` ran: its tokens are computed and their full blocks cached.
        Draft tokens count only once accepted (``accept_drafts``). Sequences finished
        meanwhile (async scheduling: by the step before) are skipped."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += n - batch.drafts_of(i)
            self.block_manager.cache_full_blocks(seq)

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """The first ``num_accepted`` draft tokens a completed step computed for ``seq`` are
        now its tokens: their K/V in the cache are valid (those of rejected drafts are
        overwritten when their positions are computed again)."""
        seq.num_computed_tokens += num_accepted
        self.block_manager.cache_full_blocks(seq)

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list) -> bool:
        """Give ``seq`` the blocks of its next ``num_new`` tokens, preempting the newest running
        sequences (appended to ``preempted``) until they fit; False if ``seq`` itself went."""
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running.pop()  # the newest
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_token_ids, seq.draft_parents = [], []
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Take a running or waiting sequence out of the engine and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        self.block_manager.forget(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
