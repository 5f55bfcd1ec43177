"""How many ways to split the KV range of a decode/append attention (Flash-Decoding).

Shared by every backend of ``flash_attn_with_kvcache`` so that ``num_splits=0`` means the same
thing everywhere. Decode attention is memory-bound: one program per (batch, kv head) reads that
head's whole cache, so with few sequences and heads most SMs sit idle. Splitting the KV range
into ``num_splits`` slices run by separate programs fills the GPU, at the price of writing each
slice's partial output and LSE to a workspace and merging them: in the CUDA kernel the last
split of a row block to finish merges them, the Triton backend runs a second small kernel.

Partition rule (the CUDA and Triton kernels follow it, so their results do not depend on the
grid): a sequence whose attended keys span ``T`` KV tiles of ``block_n`` keys gives split ``s``
the tiles ``[s * P, min((s + 1) * P, T))`` with ``P = T`` when ``T <= unsplit_tiles`` (one live
split), else ``P = ceil(T / S)``; splits past the end are empty and must write ``lse = -inf`` so
that merging ignores them (the Triton backend also zeroes their partial output, which its merge
weighs by 0; the CUDA merge skips them unread). ``T`` is taken
per sequence in the kernel (from ``cache_seqlens``, read on the device), while the split count
comes from shapes only: computing it never syncs with the GPU, so it works in CUDA graphs.
"""

import functools
import math
from typing import NamedTuple

import torch

# Streaming programs are light (a few warps, modest shared memory), so two of them fit on an SM;
# with two resident the loads of one hide the softmax/merge latency of the other.
PROGRAMS_PER_SM = 2
# Beyond this many splits the workspace traffic and merge cost outgrow what extra programs win.
MAX_AUTO_SPLITS = 128
# Why about one wave and not more (H100, GQA 32:8, d = 128, bf16, issue 4). The CUDA decode
# kernel fits 2 CTAs per SM (215 registers, 100.5 KB shared memory): 264 slots. One sequence
# with 8 kv heads gets 32 splits = 256 CTAs (0.97 wave); at 32k keys each streams 16 tiles
# (512 KB of K+V) with 2 tiles (64 KB) in flight, 128 KB per SM, while 3 TB/s at ~1 us of
# latency needs only ~25 KB per SM in flight. More waves would add no bytes in flight, only a
# prologue and an epilogue per CTA and partials: at 4 waves (128 splits, 4 tiles per CTA) the
# partials grow to 2 x 128 x 32 x 128 x 4 B = 4 MB (3% of the 134 MB stream) and the fill and
# drain of each CTA's pipeline would be paid over 4 tiles instead of 16. The measured batch-1
# loss (a near-constant 20-30 us against 16 x 32k at the same 256 CTAs, 3 us at 1 split)
# instead tracked the split count through the combine, which waited one L2 round trip per split
# in turn (32 x ~0.5 us); the merge (merge_row.cuh) now keeps a batch of splits' loads in flight
# and, in the CUDA kernel, runs in the last split instead of a second kernel. Predicted
# with the combine at ~2-3 us instead of ~15-20: 1 x 4k 28 -> ~11 us (~1.5 TB/s), 1 x 32k
# 75 -> ~58 us (~2.3 TB/s), 1 x 128k 206 -> ~190 us (~2.8 TB/s). The split rule is unchanged,
# so the Triton backend, which shares it, partitions identically.
# Short sequences in a long cache (the engine's batch-1 decode: capacity 131072 keys, a few
# hundred cached) get the plan of the capacity, 32 splits, of which the few holding a tile run.
# Those of at most MAX_UNSPLIT_KEYS keys run unsplit, though. With each split's block-table
# entries staged once (session 16; an earlier measurement, reading the table per tile, had
# forced 1 to 16 splits within 1.5% of the plan), the Llama-3.2-1B decode step in context
# (`measure_latency`, one process, tok/s), when every live split must take at least F keys of
# its sequence (F = 64 is the capacity's plan, one tile):
#   keys 128-384: F = 64: 826, 256: 842, 512: 858, 1024: 858;
#   keys 700-956: F = 64: 821, 512: 786, 1024: 784.
# In a step, a split costs a cold prologue (lengths, block table, q, cos/sin) and the fold's
# round trips, ~4-5 us here, while one CTA takes ~0.6 us a tile more: one split wins up to about
# 8 narrow tiles, one tile a split beyond. Hence a threshold, not a floor: a sequence of at most
# MAX_UNSPLIT_KEYS keys runs as one split; longer ones keep the capacity's plan.
MAX_UNSPLIT_KEYS = 512
# Already this close to a full wave of programs without splitting: splitting cannot pay.
FULL_ENOUGH = 0.8
# Among split counts, take the smallest whose wave efficiency is this close to the best one
# (close: the kernel is memory-bound, so idle SMs cost more than a bigger workspace).
# The count need not divide the tiles evenly: a longest split one tile longer than another
# count's costs about nothing. GQA 32:8, batch 1, 32k keys (H100, CUDA kernel): the plan's 31
# splits against 33 forced ones, which run the partition of 32 (longest split in the tiles the
# kernel runs: bf16 d=64 9 against 8, d=128 17 against 16, fp8 d=64 5 against 4), took 30.2
# against 30.0 us, 52.5 against 51.8, 20.4 against 20.7 (bench/results/decode_probe_s25_h100.md).
EFFICIENCY_SLACK = 0.95
# One program per SM instead, where the (sequence, kv head) pairs divide the SMs into a split
# count that leaves at most 1% of them idle: as balanced as two an SM, with half the splits,
# which measured faster at every length. H100, graph-timed CUDA kernel, batch 1, GQA 9:3 (3 kv
# heads: 44 splits, 132 CTAs, against the two-an-SM plan's 64 to 86), us: d=64 bf16 4k 10.1 ->
# 8.4, 32k 20.7 -> 16.7, 128k 44.9 -> 41.7 (paged 45.7 -> 42.8), fp8 128k 30.9 -> 27.2; d=128
# bf16 4k 13.6 -> 10.1, 32k 30.3 -> 25.9, 128k 81.4 -> 74.6, fp8 128k 48.5 -> 43.5
# (bench/results/decode_probe_s25_h100.md). Not where the fit is loose: with 8 kv heads, 16
# splits (128 CTAs, 4 SMs idle) won at 4k keys (-8 to -10%) but lost at 128k (+2 to +6%) and
# on fp8 caches at 32k (+10%). With few tiles some of the splits hold none (4k keys: 64 tiles
# in 44 splits of 2, 32 live): those leave at once.
# Only for programs that stream well alone on an SM (``alone_streams``): the Triton kernel on
# fp8 caches does not. Forced to 44 splits instead of the two-an-SM 86 (H100, graph-timed, us,
# 9:3 batch 1), its fp8 programs took 47.4 instead of 36.9 at d=64 128k (paged 55.5 / 41.8),
# 66.2 / 56.8 at d=128 128k, and from 2% less to 11% more at 32k; its bf16 programs, like
# the CUDA kernel's, were faster alone (d=64 128k 40.6 / 42.9, d=128 32k 25.3 / 27.4;
# bench/results/decode_probe_s28_h100.md).
ONE_PER_SM_FILL = 0.99
# When kernels run under the Triton CPU interpreter there are no SMs; plan as for an H100
# (132 SMs), so the CPU tests take the same split decisions as the reference GPU.
NOMINAL_SMS = 132


class SplitPlan(NamedTuple):
    """``num_splits`` programs per (batch, kv head, query block); ``tiles_per_split`` KV tiles
    each for the longest possible sequence (shorter sequences re-divide their own tiles; one of
    at most ``unsplit_tiles`` tiles runs as one split)."""
    num_splits: int
    tiles_per_split: int
    unsplit_tiles: int


def unsplit_tiles(block_n: int, num_splits: int = 0) -> int:
    """The partition rule's threshold: 0 for a caller's explicit ``num_splits`` (honoured as
    given), else the whole tiles of ``MAX_UNSPLIT_KEYS``."""
    return 0 if num_splits > 0 else MAX_UNSPLIT_KEYS // block_n


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device``; ``NOMINAL_SMS`` for a non-CUDA device (Triton interpreter)."""
    if device.type != "cuda":
        return NOMINAL_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def plan_splits(num_sms: int, batch: int, heads_kv: int, max_seqlen_k: int, block_n: int, *,
                num_splits: int = 0, m_blocks: int = 1, alone_streams: bool = True) -> SplitPlan:
    """Choose the split count of the KV range, or take the caller's ``num_splits`` if > 0.

    Args:
        num_sms: SMs on the device (``sm_count(device)``).
        batch, heads_kv: sequences and KV heads; one program per (sequence, kv head) per split.
        max_seqlen_k: the most keys a sequence can have (the cache capacity, from shapes).
        block_n: keys per KV tile of the kernel.
        num_splits: 0 chooses; a positive value is honoured as given, even if it exceeds the
            number of tiles (the extra splits are empty).
        m_blocks: query-row blocks per (sequence, kv head), which already multiply the programs.
        alone_streams: whether one of the kernel's programs alone on an SM keeps it streaming;
            if not, the one-program-per-SM plan (ONE_PER_SM_FILL) is never taken.

    Returns a ``SplitPlan``; ``tiles_per_split`` is ``ceil(tiles / num_splits)`` (at least 1).
    """
    tiles = max(1, math.ceil(max_seqlen_k / block_n))
    unsplit = unsplit_tiles(block_n, num_splits)
    if num_splits > 0:
        return SplitPlan(num_splits, max(1, math.ceil(tiles / num_splits)), unsplit)
    slots = PROGRAMS_PER_SM * num_sms
    work = batch * heads_kv * m_blocks
    if tiles == 1 or work == 0 or work >= FULL_ENOUGH * slots:
        return SplitPlan(1, tiles, unsplit)

    one_per_sm = min(MAX_AUTO_SPLITS, tiles, num_sms // work)
    if alone_streams and work * one_per_sm >= ONE_PER_SM_FILL * num_sms:
        return SplitPlan(one_per_sm, math.ceil(tiles / one_per_sm), unsplit)

    def efficiency(s: int) -> float:
        # Fraction of the last wave of programs that is busy; 1.0 means whole waves.
        waves = work * s / slots
        return waves / math.ceil(waves)

    # Beyond two waves of programs, more splits only add workspace traffic. A split count is
    # worth considering only if it shortens the longest split: otherwise the same wall time is
    # spent with more workspace traffic too.
    most = min(MAX_AUTO_SPLITS, tiles, max(1, 2 * slots // work))
    candidates = [s for s in range(1, most + 1)
                  if s == 1 or math.ceil(tiles / s) < math.ceil(tiles / (s - 1))]
    best = max(efficiency(s) for s in candidates)
    chosen = next(s for s in candidates if efficiency(s) >= EFFICIENCY_SLACK * best)
    return SplitPlan(chosen, math.ceil(tiles / chosen), unsplit)
