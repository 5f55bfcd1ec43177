"""SamplingParams: how one request is decoded and when it stops (vLLM's semantics)."""

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Decoding and stopping parameters of one request.

    temperature: 0 = greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
    min_p: drop tokens less likely than ``min_p`` times the most likely one (0: none).
    seed: per-request seed; the same seed and prompt reproduce the same tokens.
    max_tokens: most tokens to generate (None: until the model's context is full).
    min_tokens: EOS and stop ids/strings are ignored before this many tokens.
    stop: strings that end generation; the text is cut before them (or after them with
        ``include_stop_str_in_output``).
    stop_token_ids: token ids that end generation (kept in the output token ids).
    ignore_eos: keep generating past the model's EOS tokens.
    skip_special_tokens: leave special tokens out of the text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_strings: tuple = field(init=False, repr=False)

    def __post_init__(self):
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        self.top_k = max(self.top_k, 0)
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _integer("seed", self.seed)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _integer("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, "
                             f"got {self.stop!r}")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        for tok in ids:
            _integer("stop_token_ids entries", tok)
            if tok < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {tok}")
        self.stop_token_ids = ids


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
