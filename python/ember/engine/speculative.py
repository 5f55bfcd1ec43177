"""Speculative decoding with prompt-lookup (n-gram) drafts.

Each step, a decoding sequence whose last ``n`` tokens (``prompt_lookup_max`` down to
``prompt_lookup_min``) occurred earlier in its prompt or output proposes the up to
``num_speculative_tokens`` tokens that followed that occurrence (the latest one). The step
computes the sequence's last token and its drafts together, as one chunk of ``1 + d`` tokens,
and samples all ``1 + d`` positions; the drafts are kept while each equals the token sampled
at its position, and the first sampled token that differs (or the one after the last draft)
is appended too. So a step emits between 1 and ``d + 1`` tokens.

Why comparing samples is exact: a draft that is one fixed token ``t`` (a draft distribution
``q`` with all its mass on ``t``) is accepted by rejection sampling with probability
``min(1, p(t) / q(t)) = p(t)``, and on rejection a token is drawn from ``normalize(max(0,
p - q))``, which is ``p`` without ``t``. Drawing ``x ~ p`` and accepting ``t`` iff ``x == t``,
else emitting ``x``, has exactly these probabilities. Each position is sampled by
``ember.ops.sample`` with the sequence's own random stream at that output index (seed,
tokens generated before it), the draw the sequence would make without speculation: with the
same logits, greedy and seeded requests produce the same tokens with speculation on or off.

(``ember.ops.speculative_accept`` is the general rule, for drafts sampled from a draft model's
distribution.)
"""

import weakref
from dataclasses import dataclass

from ember.engine.sequence import Sequence

METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` names.

    method: "ngram" (prompt lookup; no draft model).
    num_speculative_tokens: most draft tokens per sequence and step.
    prompt_lookup_max, prompt_lookup_min: the longest and shortest suffix (in tokens) looked
        up in the sequence's earlier tokens; longer suffixes are tried first.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got "
                             f"{self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative {name} must be a positive int, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) must be "
                             f"<= prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def from_arg(cls, arg) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, or a dict of its fields."""
        if arg is None or isinstance(arg, cls):
            return arg
        if isinstance(arg, dict):
            unknown = set(arg) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown speculative settings {sorted(unknown)}; known: "
                                 f"{sorted(cls.__dataclass_fields__)}")
            return cls(**arg)
        raise ValueError(f"speculative must be None, a dict or a SpeculativeConfig, got "
                         f"{type(arg).__name__}")


class NgramIndex:
    """The latest end position of every n-gram (``lookup_min <= n <= lookup_max`` tokens) of a
    token list that only grows, indexed incrementally: a lookup costs O(lookup_max) whatever
    the list's length, where scanning the list would cost O(length) per sequence and step."""

    def __init__(self, lookup_min: int, lookup_max: int):
        self.sizes = range(lookup_max, lookup_min - 1, -1)  # longest first
        self.ends = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are in ``ends``

    def draft(self, token_ids: list, max_tokens: int) -> list:
        """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the
        longest suffix of ``token_ids`` that has one; ``[]`` if none does."""
        length = len(token_ids)
        # Index every n-gram ending before the last token (an occurrence of the suffix there is
        # earlier than the suffix itself and has a token after it).
        for end in range(self.indexed, length - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    self.ends[n][tuple(token_ids[end + 1 - n:end + 1])] = end
        self.indexed = max(self.indexed, length - 1)
        if max_tokens < 1:
            return []
        for n in self.sizes:
            end = self.ends[n].get(tuple(token_ids[length - n:])) if length >= n else None
            if end is not None:
                return list(token_ids[end + 1:end + 1 + max_tokens])
        return []


def ngram_draft(token_ids, max_tokens: int, lookup_max: int, lookup_min: int) -> list:
    """``NgramIndex.draft`` on a list seen once."""
    return NgramIndex(lookup_min, lookup_max).draft(list(token_ids), max_tokens)


def accepted_prefix(drafts: list, sampled: list) -> int:
    """How many leading drafts equal the tokens sampled at their positions."""
    count = 0
    for draft, token in zip(drafts, sampled, strict=False):
        if draft != token:
            break
        count += 1
    return count


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        # One index per sequence, dropped with the sequence (its tokens only grow: appended
        # outputs; preemption recomputes the same tokens).
        self._indexes = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence) -> list:
        """Draft tokens for a sequence about to decode: none when fewer than two tokens may
        still be generated (a step always emits one)."""
        c = self.config
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max)
        room = min(c.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1)
        return index.draft(seq.token_ids, room)
