"""CUDA graphs of the decode step: model, LM head and sampling replayed as one launch.

Every decode-only step of a CUDA engine whose decode ops can be captured runs here, whether
graphs are captured or not (``enforce_eager``): eager mode launches the same ops op by op on the
same static inputs, so both modes compute the same launches (split plan, tile width, padding
rows) and give the same bits.

A decode-only step of ``n`` sequences replays the graph captured for the smallest batch size
``>= n`` and its length bucket; the extra rows are padding: sequences of no cached key whose one
new K/V row goes to a scratch KV block that no sequence owns. The buckets are steps whose keys
all fit in ``MAX_UNSPLIT_KEYS`` (every sequence runs as one split, in wide KV tiles when the
batch is small), in ``SHORT_CONTEXT_KEYS`` (short splits, narrow tiles) and the others (long
splits, wide tiles): inside a graph the attention cannot read the lengths, so each bucket's
graph is captured with its bound (``max_seqlen_k``), from which the kernel's launch plan picks
the tile width. All keep the full block table, hence the split plan of the cache's capacity.

The step's inputs (token ids and positions; cached key counts; sampling parameters; block table
rows) are static device tensors, filled from a pinned host mirror by one ``ember.ops.multi_copy``
kernel that reads only the rows and columns the step uses; what comes back is the sampled token
ids on the device (sampled outside the graph, from its logits, for the rare step whose sampling
needs host-side edits).
"""

import time

import numpy as np
import torch

from ember import ops
from ember.engine.block_manager import block_tables
from ember.engine.sampler import fill_sampling_rows, sample_rows
from ember.models.attention import AttentionMetadata
from ember.ops._split_kv import MAX_UNSPLIT_KEYS

# Keys (cached + the new one) up to which a step replays the short-context graphs.
SHORT_CONTEXT_KEYS = 1024


def graph_batch_sizes(max_num_seqs: int) -> list:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (at most 512)."""
    largest = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b < largest] + list(range(16, largest, 16))
    return sizes + [largest]


class DecodeGraphs:
    """The decode steps of a model runner; ``capture=False`` (``enforce_eager``) runs each
    step's ops directly instead of replaying a graph."""

    def __init__(self, model, kv_caches, sampler, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device, capture: bool = True):
        self.model, self.kv_caches, self.sampler = model, kv_caches, sampler
        self.scratch_block = scratch_block
        self.sizes = graph_batch_sizes(max_num_seqs)
        # Length bounds of the buckets, the last one the capacity. Each is passed as the
        # attention's max_seqlen_k: left None, a direct call would take the batch's longest
        # sequence (read back from the device) and a captured one the capacity, and their tile
        # widths could differ.
        capacity = max_blocks_per_seq * block_size
        self.bounds = [b for b in (MAX_UNSPLIT_KEYS, SHORT_CONTEXT_KEYS) if b < capacity]
        self.bounds.append(capacity)
        largest = self.sizes[-1]
        # Static inputs. tokens: rows (input ids, positions); seqlens: cached keys (=
        # positions); floats/ints: the sampling rows of sampler.py. Until a step fills them,
        # every row is padding.
        shapes = {"tokens": (torch.int64, (2, largest)), "ints": (torch.int64, (3, largest)),
                  "floats": (torch.float32, (3, largest)), "seqlens": (torch.int32, (largest,)),
                  "block_table": (torch.int32, (largest, max_blocks_per_seq))}
        for name, (dtype, shape) in shapes.items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self.block_table[:, 0] = scratch_block
        # Their pinned host mirrors, two used in turn: with async scheduling a step is prepared
        # while the previous one's inputs may still be unread, queued behind the step before.
        # Two steps back, they were read before a step whose tokens reached the host.
        self.host_inputs = []
        for _ in range(2):
            pinned = {name: torch.zeros(shape, dtype=dtype, pin_memory=True)
                      for name, (dtype, shape) in shapes.items()}
            self.host_inputs.append((pinned, {name: t.numpy() for name, t in pinned.items()}))
        self._turn = 0
        self.graphs: dict = {}  # (size, bound) -> (graph, logits, token ids)
        self.captured = capture
        start = time.perf_counter()
        if capture:
            self._capture()
        self.capture_seconds = time.perf_counter() - start

    def _step(self, size: int, bound: int):
        meta = AttentionMetadata(num_decodes=size, decode_cache_seqlens=self.seqlens[:size],
                                 decode_block_table=self.block_table[:size],
                                 decode_max_seqlen_k=bound)
        hidden = self.model(self.tokens[0, :size], self.tokens[1, :size], meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return logits, sample_rows(logits, self.floats[:, :size], self.ints[:, :size],
                                   self.sampler.backend)

    def _capture(self) -> None:
        pool = None
        # Largest first: smaller graphs reuse its pool.
        for size, bound in [(s, b) for s in reversed(self.sizes) for b in self.bounds]:
            with torch.inference_mode():
                self._step(size, bound)  # warm-up outside capture: lazy init, autotuning
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        logits, token_ids = self._step(size, bound)
                except RuntimeError as e:
                    raise RuntimeError(
                        f"capturing the decode CUDA graph (batch {size}) failed: {e}; an op "
                        f"synchronises with the host inside the model. Pass enforce_eager=True "
                        f"to run without CUDA graphs.") from e
            pool = graph.pool()
            self.graphs[size, bound] = (graph, logits, token_ids)
        torch.cuda.synchronize()

    def size_for(self, batch_size: int) -> int | None:
        """The smallest captured batch size that fits ``batch_size`` decodes, if any."""
        return next((s for s in self.sizes if s >= batch_size), None)

    def run(self, seqs: list, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Launch one decode step of ``seqs`` (each computes its last token); returns their
        new token ids, int64 on the device (not waited for).

        ``input_ids`` (int64 on the device, one per sequence) replaces the sequences' last
        token ids, for a step launched before the previous one's samples reached the host.
        """
        n, size = len(seqs), self.size_for(len(seqs))
        table = block_tables(seqs)
        positions = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        pinned, host = self.host_inputs[self._turn]
        self._turn ^= 1
        tokens = host["tokens"]
        tokens[0, :n] = [s.token_ids[-1] for s in seqs]
        tokens[1, :n] = positions
        tokens[:, n:size] = 0
        host["seqlens"][:n] = positions
        host["seqlens"][n:size] = 0
        fill_sampling_rows(seqs, host["floats"], host["ints"])
        # A padding row writes its K/V at position 0 of its first block: the scratch one.
        # Columns past a sequence's blocks are never read: stale values there are harmless, so
        # only the columns these sequences use are sent.
        cols = table.shape[1]
        host["block_table"][:n, :cols] = table
        host["block_table"][n:size, 0] = self.scratch_block
        dsts = [self.ints[:, :size], self.floats[:, :size], self.seqlens[:size],
                self.block_table[:size, :cols]]
        srcs = [pinned["ints"][:, :size], pinned["floats"][:, :size], pinned["seqlens"][:size],
                pinned["block_table"][:size, :cols]]
        if input_ids is None:
            dsts.append(self.tokens[:, :size])
            srcs.append(pinned["tokens"][:, :size])
        else:  # padding rows keep earlier ids: zeros or real tokens, valid either way
            dsts += [self.tokens[1, :size], self.tokens[0, :n]]
            srcs += [pinned["tokens"][1, :size], input_ids]
        ops.multi_copy(dsts, srcs)
        keys = int(positions.max()) + 1  # the longest sequence's, its new token included
        bound = next(b for b in self.bounds if keys <= b)
        if self.captured:
            graph, logits, token_ids = self.graphs[size, bound]
            graph.replay()
        else:
            logits, token_ids = self._step(size, bound)
        if self.sampler.needs_logit_edits(seqs):
            return self.sampler(logits[:n].clone(), seqs)
        return token_ids[:n]
