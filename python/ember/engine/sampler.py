"""Sampler: the next token of each sampling sequence, through ``ember.ops.sample``.

Each sequence draws from its own random stream, ``(seed, number of tokens it has generated)``,
so its tokens do not depend on the batch around it, on preemption or on chunking.

A step's per-row parameters travel to the device packed in two tensors (floats and integers),
two copies instead of six; the CUDA-graph decode path keeps the same two tensors as static
graph inputs and samples inside the graph.
"""

import numpy as np
import torch

from ember import ops


def fill_sampling_rows(seqs: list, floats: np.ndarray, ints: np.ndarray,
                       ahead: list | None = None) -> None:
    """Write the parameters of ``seqs`` (one per row) into columns ``[0, len(seqs))`` of
    ``floats`` (float32 ``[3, >= n]``: temperature, top_p, min_p) and ``ints`` (int64
    ``[3, >= n]``: top_k, seed, random-stream offset = index of the output token the row
    samples: tokens generated so far, plus ``ahead[i]`` for a draft position)."""
    n = len(seqs)
    floats[:, :n] = [[s.params.temperature for s in seqs], [s.params.top_p for s in seqs],
                     [s.params.min_p for s in seqs]]
    offsets = [s.num_output_tokens for s in seqs]
    if ahead is not None:
        offsets = [o + a for o, a in zip(offsets, ahead, strict=True)]
    ints[:, :n] = [[s.params.top_k for s in seqs], [s.seed for s in seqs], offsets]


def sample_rows(logits: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                backend: str) -> torch.Tensor:
    """``ops.sample`` with packed per-row parameters (see ``fill_sampling_rows``); no host sync,
    so it can be captured in a CUDA graph."""
    return ops.sample(logits, floats[0], ints[0], floats[1], floats[2], ints[1], ints[2],
                      backend=backend)


class Sampler:
    def __init__(self, eos_token_ids, backend: str = "auto"):
        self.eos_token_ids = list(eos_token_ids)
        self.backend = backend

    def __call__(self, logits: torch.Tensor, seqs: list,
                 ahead: list | None = None) -> torch.Tensor:
        """logits (any float dtype) ``[len(seqs), vocab]`` -> int64 ``[len(seqs)]`` token ids.

        Row i samples output token ``seqs[i].num_output_tokens + ahead[i]`` of its sequence
        (``ahead`` None: all 0); several rows of one sequence sample a speculative step's
        positions."""
        n = len(seqs)
        floats, ints = np.empty((3, n), np.float32), np.empty((3, n), np.int64)
        fill_sampling_rows(seqs, floats, ints, ahead)
        device = logits.device
        self.forbid_early_stops(logits, seqs, ahead)
        return sample_rows(logits, torch.from_numpy(floats).to(device, non_blocking=True),
                           torch.from_numpy(ints).to(device, non_blocking=True), self.backend)

    def needs_logit_edits(self, seqs: list) -> bool:
        """Whether some sequence is still below its min_tokens and must have EOS/stop ids
        banned from its logits (sampling then cannot run inside a captured graph)."""
        return any(s.num_output_tokens < s.params.min_tokens for s in seqs)

    def forbid_early_stops(self, logits: torch.Tensor, seqs: list,
                           ahead: list | None = None) -> None:
        # min_tokens: before it, EOS and stop ids must not be drawn at all (vLLM's semantics).
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens + (ahead[i] if ahead else 0) < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < logits.shape[1]]
                rows += [i] * len(banned)
                cols += banned
        if rows:
            logits[torch.tensor(rows, device=logits.device),
                   torch.tensor(cols, device=logits.device)] = float("-inf")
