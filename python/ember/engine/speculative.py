"""Speculative decoding with prompt-lookup (n-gram) drafts, as a chain or a tree.

Each step, a decoding sequence whose last ``n`` tokens (``prompt_lookup_max`` down to
``prompt_lookup_min``) occurred earlier in its prompt or output proposes the tokens that
followed those occurrences: the latest one's continuation as a chain, and with
``num_candidates > 1`` the continuations of earlier occurrences too, merged into a tree of at
most ``num_speculative_tokens`` nodes (shared prefixes stored once). The step computes the
sequence's last token and the draft nodes as one chunk (a tree attends with a mask of
ancestors: tree attention) and samples every node's position; then, from the last token, it
follows the child whose token equals the token sampled at its parent, as long as one does, and
appends the tokens of that path and the token sampled at its end. So a step emits between 1
and ``depth + 1`` tokens.

Why comparing samples is exact: a draft that is one fixed token ``t`` (a draft distribution
``q`` with all its mass on ``t``) is accepted by rejection sampling with probability
``min(1, p(t) / q(t)) = p(t)``, and on rejection a token is drawn from ``normalize(max(0,
p - q))``, which is ``p`` without ``t``. Drawing ``x ~ p`` and accepting ``t`` iff ``x == t``,
else emitting ``x``, has exactly these probabilities; with several children, ``x`` picks at
most one of them. Each position is sampled by ``ember.ops.sample`` with the sequence's own
random stream at that output index (seed, tokens generated before it), the draw the sequence
would make without speculation: with the same logits, greedy and seeded requests produce the
same tokens with speculation on or off.

Draft nodes are stored in the cache in node order (a chain's first candidate first), so the
K/V of an accepted path are in place only along that first chain; the rest of a path through
another branch is computed again by the next step.

(``ember.ops.speculative_accept`` is the general rule, for drafts sampled from a draft model's
distribution.)
"""

import weakref
from dataclasses import dataclass

import numpy as np

from ember.engine.sequence import Sequence
from ember.models.llama import check_quantization

METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` names.

    method: "ngram" (prompt lookup) or "draft_model" (greedy drafts of a smaller or quantized
        model: ``draft_model.py``).
    num_speculative_tokens: most draft tokens per sequence and step.
    prompt_lookup_max, prompt_lookup_min: the longest and shortest suffix (in tokens) looked
        up in the sequence's earlier tokens; longer suffixes are tried first.
    num_candidates: continuations of that many latest occurrences of the suffix, merged into a
        tree of draft tokens (1: a chain, the latest occurrence's). Ours, not vLLM's.
    model: draft_model's checkpoint (a path or alias, with the target's vocabulary); None: the
        target's own, a self-draft.
    quantization: None, "int8" or "int4" for the draft model ("int4" with model None: an int4
        copy of the target drafts for it).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    num_candidates: int = 1
    model: str | None = None
    quantization: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got "
                             f"{self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "num_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative {name} must be a positive int, got {value!r}")
        if self.method == "draft_model" and self.num_candidates != 1:
            raise ValueError("speculative num_candidates > 1 (trees) is for method 'ngram'; a "
                             "draft model proposes a chain")
        check_quantization("speculative quantization", self.quantization)
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
    """The latest end positions (up to ``candidates`` of them, most recent first) of every
    n-gram (``lookup_min <= n <= lookup_max`` tokens) of a token list that only grows, indexed
    incrementally: a lookup costs O(lookup_max) whatever the list's length, where scanning the
    list would cost O(length) per sequence and step."""

    def __init__(self, lookup_min: int, lookup_max: int, candidates: int = 1):
        self.sizes = range(lookup_max, lookup_min - 1, -1)  # longest first
        self.candidates = candidates
        self.ends = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are in ``ends``

    def draft(self, token_ids: list, max_tokens: int) -> tuple:
        """``(tokens, parents)`` of at most ``max_tokens`` draft nodes: the continuations of
        the latest earlier occurrences of the longest suffix of ``token_ids`` that has one,
        merged into a tree. ``parents[i]`` is the index of node i's parent, -1 for the last
        token of ``token_ids``; parents come before their children, and the latest
        occurrence's continuation is nodes 0, 1, 2, ... ``([], [])`` if no suffix occurred."""
        length = len(token_ids)
        # Index every n-gram ending before the last token (an occurrence of the suffix there is
        # earlier than the suffix itself and has a token after it).
        for end in range(self.indexed, length - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    key = tuple(token_ids[end + 1 - n:end + 1])
                    self.ends[n][key] = (end, *self.ends[n].get(key, ()))[:self.candidates]
        self.indexed = max(self.indexed, length - 1)
        if max_tokens < 1:
            return [], []
        for n in self.sizes:
            ends = self.ends[n].get(tuple(token_ids[length - n:])) if length >= n else None
            if ends:
                return merge_chains([token_ids[e + 1:e + 1 + max_tokens] for e in ends],
                                    max_tokens)
        return [], []


def merge_chains(chains: list, max_nodes: int) -> tuple:
    """``(tokens, parents)`` of the trie of ``chains`` (token lists that all start after the
    same token, parent -1), nodes numbered in insertion order, at most ``max_nodes``."""
    tokens, parents, children = [], [], {}
    for chain in chains:
        node = -1
        for token in chain:
            child = children.get((node, token))
            if child is None:
                if len(tokens) == max_nodes:
                    break
                child = children[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child
    return tokens, parents


def ngram_draft(token_ids, max_tokens: int, lookup_max: int, lookup_min: int) -> list:
    """The chain ``NgramIndex.draft`` proposes for a list seen once."""
    return NgramIndex(lookup_min, lookup_max).draft(list(token_ids), max_tokens)[0]


def accepted_path(drafts: list, parents: list, sampled: list) -> list:
    """The draft nodes accepted: from the last token (whose sample is ``sampled[0]``), the
    child whose token equals its parent's sample, as long as one does; node i's own sample is
    ``sampled[i + 1]``. Returns the nodes of the path in order."""
    path, node = [], -1
    while True:
        want = sampled[node + 1]
        node = next((i for i, (t, p) in enumerate(zip(drafts, parents, strict=True))
                     if p == node and t == want), None)
        if node is None:
            return path
        path.append(node)


def tree_depths(parents: list) -> list:
    """Depth of each draft node (1 for a child of the last token)."""
    depths = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def is_chain(parents: list) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def tree_attention_mask(parents: list) -> np.ndarray:
    """bool ``[1 + d, 1 + d]`` over the last token (row 0) and the d draft nodes: each row sees
    its ancestors and itself (``flash_attn_with_kvcache``'s tree_mask of one sequence)."""
    size = len(parents) + 1
    mask = np.zeros((size, size), dtype=bool)
    mask[0, 0] = True
    for node, parent in enumerate(parents):
        mask[node + 1] = mask[parent + 1]
        mask[node + 1, node + 1] = True
    return mask


class Proposer:
    """Draft tokens for the engine (see llm.py): ``propose`` before each step's scheduling,
    ``fill`` once the step's draft counts are known, ``verified`` after the step."""

    def propose(self, seq: Sequence) -> tuple:
        """``(tokens, parents)`` of the drafts that ``seq``, about to decode, wants verified."""
        raise NotImplementedError

    def fill(self, batch) -> None:
        """Complete the drafts of the sequences of a scheduled batch (draft models compute them
        here, where their cache slots exist)."""

    def verified(self, seq: Sequence, accepted: int) -> None:
        """``seq``'s step accepted its first ``accepted`` drafts, which are now its tokens."""


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        # One index per sequence, dropped with the sequence (its tokens only grow: appended
        # outputs; preemption recomputes the same tokens).
        self._indexes = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence) -> tuple:
        """``(tokens, parents)`` of the draft nodes of a sequence about to decode (see
        ``NgramIndex.draft``): none when fewer than two tokens may still be generated (a step
        always emits one); a tree no deeper than the tokens left."""
        c = self.config
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max,
                                                    c.num_candidates)
        room = min(c.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1)
        return index.draft(seq.token_ids, room)
