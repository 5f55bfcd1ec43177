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

from dataclasses import dataclass

import numpy as np

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


def ngram_draft(token_ids, max_tokens: int, lookup_max: int, lookup_min: int) -> list:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the longest
    suffix of ``token_ids`` (``lookup_max`` down to ``lookup_min`` tokens) that has one; ``[]``
    if none does."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    if max_tokens < 1:
        return []
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        # Windows starting at i <= length - n - 1: an occurrence ending before the last token,
        # so at least one token follows it.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + max_tokens].tolist()
    return []


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

    def propose(self, seq: Sequence) -> list:
        """Draft tokens for a sequence about to decode: none when fewer than two tokens may
        still be generated (a step always emits one)."""
        c = self.config
        room = min(c.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1)
        return ngram_draft(seq.token_ids, room, c.prompt_lookup_max, c.prompt_lookup_min)
