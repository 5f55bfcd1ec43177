"""Sampler: the next token of each sampling sequence, through ``ember.ops.sample``.

Each sequence draws from its own random stream, ``(seed, number of tokens it has generated)``,
so its tokens do not depend on the batch around it, on preemption or on chunking.
"""

import torch

from ember import ops


class Sampler:
    def __init__(self, eos_token_ids, backend: str = "auto"):
        self.eos_token_ids = list(eos_token_ids)
        self.backend = backend

    def __call__(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """logits float32 ``[len(seqs), vocab]`` -> int64 ``[len(seqs)]`` token ids."""
        params = [s.params for s in seqs]
        device = logits.device

        def row(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        self._forbid_early_stops(logits, seqs)
        return ops.sample(
            logits,
            row([p.temperature for p in params], torch.float32),
            row([p.top_k for p in params], torch.int32),
            row([p.top_p for p in params], torch.float32),
            row([p.min_p for p in params], torch.float32),
            row([s.seed for s in seqs], torch.int64),
            row([s.num_output_tokens for s in seqs], torch.int64),
            backend=self.backend)

    def _forbid_early_stops(self, logits: torch.Tensor, seqs: list) -> None:
        # min_tokens: before it, EOS and stop ids must not be drawn at all (vLLM's semantics).
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < logits.shape[1]]
                rows += [i] * len(banned)
                cols += banned
        if rows:
            logits[torch.tensor(rows, device=logits.device),
                   torch.tensor(cols, device=logits.device)] = float("-inf")
