"""Incremental detokenization and stop strings.

Decoding only the new token loses context (a leading space, a multi-byte character split over
tokens), and re-decoding the whole output each step is quadratic. Like vLLM, we decode a short
window twice: the tokens already emitted since ``prefix_offset`` and the same window plus the
new tokens; the text the new tokens add is the difference. A window ending in an incomplete
UTF-8 sequence (decoded as U+FFFD) is held back until the next token completes it.
"""

# Prompt tokens kept before the first output token, so its leading space decodes right.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.read_offset = len(prompt_token_ids)
        self.prefix_offset = max(self.read_offset - CONTEXT_TOKENS, 0)

    def _decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_ids: list) -> str:
        """The new text that ``token_ids`` (all tokens so far) adds; may be ""."""
        emitted = self._decode(token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(token_ids[self.prefix_offset:])
        if len(full) <= len(emitted) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full[len(emitted):]


def find_stop_string(text: str, new_chars: int, stops) -> tuple:
    """The earliest stop string that ends within the last ``new_chars`` characters of ``text``.

    Returns ``(index where it starts, the stop string)`` or ``(-1, None)``. Only the new text
    and the longest stop's length before it are searched.
    """
    best = (-1, None)
    for stop in stops:
        start = max(len(text) - new_chars - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at != -1 and (best[0] == -1 or at < best[0]):
            best = (at, stop)
    return best
