"""CUDA graphs of the decode step: model, LM head and sampling replayed as one launch.

A decode-only step of ``n`` sequences replays the graph captured for the smallest batch size
``>= n``; the extra rows are padding: no slot to store their K/V (-1) and no key to attend to.
All the step's inputs live in static device buffers, filled from pinned host buffers by a few
small copies (token ids, positions and slots; key counts; sampling parameters; block table);
what comes back is the sampled token ids on the device (sampled outside the graph, from its
logits, for the rare step whose sampling needs host-side edits).
"""

import time

import numpy as np
import torch

from ember.engine.block_manager import block_tables, slot_mapping
from ember.engine.sampler import fill_sampling_rows, sample_rows
from ember.models.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (at most 512)."""
    largest = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b < largest] + list(range(16, largest, 16))
    return sizes + [largest]


def _pinned(shape, dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


class DecodeGraphs:
    def __init__(self, model, kv_caches, sampler, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device):
        self.model, self.kv_caches, self.sampler = model, kv_caches, sampler
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        largest = self.sizes[-1]
        # Static inputs. tokens: rows (input ids, positions, KV slots); seqlens: keys attended;
        # floats/ints: the sampling rows of sampler.py. Until a step fills them, every row is
        # padding.
        self.tokens = torch.zeros(3, largest, dtype=torch.int64, device=device)
        self.tokens[2] = -1
        self.seqlens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32,
                                       device=device)
        self.floats = torch.zeros(3, largest, dtype=torch.float32, device=device)
        self.ints = torch.zeros(3, largest, dtype=torch.int64, device=device)
        # Their pinned host sources, two sets used in turn: with async scheduling a step is
        # prepared while the previous one's copies may still be queued behind the step before.
        # Two steps back, those copies ran before a step whose tokens reached the host.
        self.host_inputs = [tuple(_pinned(t.shape, t.dtype) for t in
                                  (self.tokens, self.seqlens, self.floats, self.ints))
                            for _ in range(2)]
        self._turn = 0
        self.graphs: dict = {}  # size -> (graph, logits, token ids)
        start = time.perf_counter()
        self._capture()
        self.capture_seconds = time.perf_counter() - start

    def _step(self, size: int):
        meta = AttentionMetadata(slot_mapping=self.tokens[2, :size], num_decodes=size,
                                 decode_seqlens=self.seqlens[:size],
                                 decode_block_table=self.block_table[:size])
        hidden = self.model(self.tokens[0, :size], self.tokens[1, :size], meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return logits, sample_rows(logits, self.floats[:, :size], self.ints[:, :size],
                                   self.sampler.backend)

    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            with torch.inference_mode():
                self._step(size)  # warm-up outside capture: lazy initialisation, autotuning
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        logits, token_ids = self._step(size)
                except RuntimeError as e:
                    raise RuntimeError(
                        f"capturing the decode CUDA graph (batch {size}) failed: {e}; an op "
                        f"synchronises with the host inside the model. Pass enforce_eager=True "
                        f"to run without CUDA graphs.") from e
            pool = graph.pool()
            self.graphs[size] = (graph, logits, token_ids)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()

    def size_for(self, batch_size: int) -> int | None:
        """The smallest captured batch size that fits ``batch_size`` decodes, if any."""
        return next((s for s in self.graphs if s >= batch_size), None)

    def run(self, seqs: list, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Launch one decode step of ``seqs`` (each computes its last token); returns their
        new token ids, int64 on the device (not waited for).

        ``input_ids`` (int64 on the device, one per sequence) replaces the sequences' last
        token ids, for a step launched before the previous one's samples reached the host.
        """
        n, size = len(seqs), self.size_for(len(seqs))
        table = block_tables(seqs)
        positions = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        host = self.host_inputs[self._turn]
        self._turn ^= 1
        tokens, seqlens, floats, ints = (t.numpy() for t in host)
        tokens[0, :n] = [s.token_ids[-1] for s in seqs]
        tokens[1, :n] = positions
        tokens[2, :n] = slot_mapping(table, np.arange(n), positions, self.block_size)
        tokens[:, n:size] = [[0], [0], [-1]]
        seqlens[:n] = positions + 1
        seqlens[n:size] = 0
        fill_sampling_rows(seqs, floats, ints)

        # Whole static buffers are copied (a few KB): contiguous copies straight from pinned
        # memory.
        for static, pinned in zip((self.tokens, self.seqlens, self.floats, self.ints), host,
                                  strict=True):
            static.copy_(pinned, non_blocking=True)
        if input_ids is not None:
            self.tokens[0, :n].copy_(input_ids)
        self.block_table[:n, :table.shape[1]].copy_(torch.from_numpy(table), non_blocking=True)
        graph, logits, token_ids = self.graphs[size]
        graph.replay()
        if self.sampler.needs_logit_edits(seqs):
            return self.sampler(logits[:n].clone(), seqs)
        return token_ids[:n]
