"""Sequence: the state of one request as it moves through the engine.

A sequence is WAITING (queued, or preempted and waiting to be recomputed), RUNNING (holds KV
blocks and is scheduled every step) or FINISHED. ``num_computed_tokens`` counts the leading
tokens whose K/V are in the cache; each step computes the next ``num_new_tokens`` of them (a
prompt chunk, or the one token sampled last step, followed by the step's draft tokens with
speculative decoding).
"""

import enum

from ember.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list, params: SamplingParams, *,
                 prompt: str | None = None, seed: int = 0, max_model_len: int):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        # The sampler's random stream: token n is drawn with (seed, offset n) whatever the batch.
        self.seed = seed
        limit = max_model_len - self.num_prompt_tokens
        self.max_tokens = limit if params.max_tokens is None else min(params.max_tokens, limit)
        self.status = SequenceStatus.WAITING
        self.block_table: list = []
        self.num_computed_tokens = 0
        # Speculative decoding: draft tokens proposed to follow token_ids, verified by the next
        # step (never part of token_ids, the prefix cache or a recompute), and each one's
        # parent draft (-1: the last token; a chain is -1, 0, 1, ...).
        self.draft_token_ids: list = []
        self.draft_parents: list = []
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache on admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string
        self.output_text = ""
        self.detokenizer = None  # set by the engine when a tokenizer exists

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
