"""``sample`` in Triton: one program per row streams the vocabulary in chunks of BLOCK_V.

Semantics are exactly ``reference.sample``'s; the token is the reference's whenever both
keep the same tokens (the filters' probabilities are computed differently, so a token whose
probability lies within float rounding of a filter boundary may be kept by one and not the
other).

Algorithm, per row of V logits (``u`` = the usable logits of ``reference._usable_logits``:
NaN read as -inf, +inf entries sharing all the mass, a row with no usable logit uniform):

1. Max pass: the largest non-NaN logit and its first index. A greedy row (temperature <= 0
   or NaN) stops here: the token is that index (0 when every logit is NaN/-inf).
2. Filters, all without sorting. Every filter keeps "the tokens with p >= some threshold",
   so the kept set is ``key >= threshold`` where ``key`` is the int32 bit pattern of the
   unnormalised probability ``e = exp((u - max) / T)`` in [0, 1]: for non-negative floats
   the bit pattern orders like the value, and the scale 1 / sum(e) cancels out of every rule.
   - top-k (0 < k < V): the threshold is the k-th largest key: the largest key A with
     ``count(key >= A) >= k``, so ties at the threshold stay.
   - top-p (top_p < 1): token i stays iff the kept mass strictly above it is < top_p times
     the top-k-kept mass M. With A the largest key whose ``mass(key >= A) >= top_p * M``,
     that is exactly ``key >= A``.
   - min-p: ``e >= min_p`` (the largest e is 1), i.e. ``key >= bits(min_p)``.
   The threshold is the largest of the three, capped at bits(1.0) so the most likely tokens
   always stay. top-k and top-p find theirs with the same search over key values: each pass
   over the vocabulary sums the weight (1 for top-k, e for top-p) of the keys at or above
   NUM_PIVOTS evenly spaced pivots of the current bracket [lo, hi), narrowing it 8-fold, and
   snaps the bracket to the smallest and largest key inside it, which ends the search as soon
   as a single key value is left. The key range is 2^30 wide, so a search takes at most 10
   passes: 2-9 in simulations on 152k-token rows, about 3 on a handful of tokens.
3. Gumbel pass: ``argmax(z_i + g_i)`` over kept tokens, first index on ties, with
   ``z = (u - max) / T`` (IEEE division, as torch divides) and ``g_i = -log(-log(u_i))`` of
   the uniform ``reference.philox_uniform(seed, offset, i, 0)``: Triton's ``tl.philox`` is
   the same Philox4x32-10. The most likely token has z = 0 and g >= -log(24 log 2) > -2.82,
   while g <= log(2^24) < 16.64, so a token with z < -19.46 can never win: with a filter on,
   chunks holding only such tokens (most of the vocabulary) skip the noise.

When the batch leaves most SMs idle (fewer rows than SMs) and the row is longer than one
max-pass chunk, the max pass runs first as its own grid of (row, chunk) programs, one chunk
each, and the sampling program only combines their maxima: at batch 1 a 128k-token row is then
16 loads in parallel instead of 16 round trips in a row (the H100 decode step's sampler took
9.2 us as one program).

Reads per row (s = bytes per logit; fp64 logits are converted to float32 first, as the
reference computes in float32): greedy V*s; sampled without filters 2*V*s; each active
top-k / top-p search adds at most 10 more passes of V*s, which come from L2 while B*V*s
fits in it. Writes 8 bytes per row. Compute is dominated by Philox (10 rounds of two
32-bit multiplies) plus two logs per token in the Gumbel pass, and by NUM_PIVOTS compares
per token and search pass. Nothing is read back to the host.
"""

import torch
import triton
import triton.language as tl

from ember.ops._split_kv import sm_count

# Tokens per chunk of the vocabulary, and warps per row (8 elements per thread per chunk).
BLOCK_V = 2048
NUM_WARPS = 8
# Tokens per chunk of the max pass, which keeps only two values per lane: bigger chunks put
# more loads in flight per round trip. At batch 1 one program streams the whole row, so the
# pass is latency-bound (a 128k-token row in 2048-token chunks is 63 round trips in a row).
MAX_BLOCK_V = 8192
# Pivots per search pass (including the bracket's low end): each pass narrows it 8-fold.
NUM_PIVOTS = 8
# The filters count tokens in float32, exact up to 2^24.
MAX_VOCAB = 2 ** 24

KEY_ONE = tl.constexpr(0x3F800000)  # bits of 1.0, the largest key
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32
LOG2E = tl.constexpr(1.4426950408889634)
# A token with z below this can never be drawn (see step 3 of the module docstring).
NEVER_DRAWN = tl.constexpr(-20.0)
SAMPLE_STREAM = tl.constexpr(0)  # reference.SAMPLE_STREAM


@triton.jit
def _philox_uniform(seed, index, offset, stream):
    """float32 uniforms in (0, 1), bit-identical to ``reference.philox_uniform``.

    seed, offset: int64 scalars; index: int32 tensor of token indices; stream: an int.
    Philox key = seed, counter = (index, offset low word, offset high word, stream).
    """
    counter0 = index.to(tl.uint32, bitcast=True)
    zero = counter0 * 0
    offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32) + zero
    offset_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    word, _, _, _ = tl.philox(seed, counter0, offset_lo, offset_hi, zero + stream)
    return ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23


@triton.jit
def _first_argmax(best, best_index, vocab):
    """The largest of the per-lane maxima ``best`` and the first vocabulary index holding it."""
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_index, vocab), axis=0)


@triton.jit
def _row_max(row_ptr, vocab, BLOCK_V: tl.constexpr):
    """The largest non-NaN logit of the row (float32, -inf if none) and its first index (0
    if none)."""
    # Per-lane running maxima, reduced once at the end rather than once per chunk.
    best = tl.full([BLOCK_V], NEG_INF, tl.float32)
    best_index = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=NEG_INF).to(tl.float32)
        # Strictly larger: a lane keeps its earlier (smaller) index on ties.
        better = x > best  # false for NaN
        best = tl.where(better, x, best)
        best_index = tl.where(better, cols, best_index)
    # A row of NaN and -inf logits updates no lane, so its index is 0.
    return _first_argmax(best, best_index, vocab)


@triton.jit
def _chunk_max_kernel(logits_ptr, part_max_ptr, part_index_ptr, vocab, row_stride,
                      MAX_BLOCK_V: tl.constexpr):
    """Max pass of chunk ``program_id(1)`` of row ``program_id(0)``: its largest non-NaN logit
    (float32, -inf if none) and that logit's first index (0 if none) into ``part_*[row,
    chunk]``, rows ``num_programs(1)`` apart."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * MAX_BLOCK_V + tl.arange(0, MAX_BLOCK_V)
    x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < vocab,
                other=NEG_INF).to(tl.float32)
    top, index = _first_argmax(tl.where(x == x, x, NEG_INF), cols, vocab)
    index = tl.where(top == NEG_INF, 0, index)
    slot = row * tl.num_programs(1) + chunk
    tl.store(part_max_ptr + slot, top)
    tl.store(part_index_ptr + slot, index)


@triton.jit
def _combine_chunk_maxima(part_max_ptr, part_index_ptr, row, num_chunks, vocab,
                          CHUNKS: tl.constexpr):
    """The row's largest logit and first index from its chunks' (see _chunk_max_kernel): the
    largest maximum, and the smallest index among the chunks holding it (0 if none)."""
    chunk = tl.arange(0, CHUNKS)
    inside = chunk < num_chunks
    part_max = tl.load(part_max_ptr + row * num_chunks + chunk, mask=inside, other=NEG_INF)
    part_index = tl.load(part_index_ptr + row * num_chunks + chunk, mask=inside, other=0)
    return _first_argmax(part_max, part_index, vocab)


@triton.jit
def _usable_chunk(row_ptr, cols, vocab, has_posinf, no_usable):
    """float32 usable logits (``reference._usable_logits``) of columns ``cols``, and the mask
    of columns inside the row; columns past the row read -inf."""
    in_row = cols < vocab
    x = tl.load(row_ptr + cols, mask=in_row, other=NEG_INF).to(tl.float32)
    x = tl.where(x == x, x, NEG_INF)
    x = tl.where(has_posinf, tl.where(x == POS_INF, 0.0, NEG_INF), x)
    x = tl.where(no_usable, 0.0, x)
    return tl.where(in_row, x, NEG_INF), in_row


@triton.jit
def _filter_keys(usable, in_row, row_max, exp2_scale):
    """int32 keys and float32 unnormalised probabilities ``e = exp((u - max) / T)``.

    Keys are the bit patterns of e, in [0, bits(1.0)], ordered like e; columns past the row
    get key -1 so that no pivot (>= 0) counts them. The row's maximum gets e = 1 exactly, also
    when exp2_scale is inf (a tiny temperature), where 0 * inf would be NaN.
    """
    shifted = usable - row_max
    e = tl.where(shifted == 0.0, 1.0, tl.exp2(shifted * exp2_scale))
    keys = tl.where(in_row, e.to(tl.int32, bitcast=True), -1)
    return keys, e


@triton.jit
def _threshold_search(row_ptr, vocab, has_posinf, no_usable, row_max, exp2_scale, lo, goal,
                      BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """The largest key A >= lo with ``W(key >= A) >= target``, where W sums the weight of the
    row's tokens: 1 each (BY_MASS false, target = goal = k: A is the k-th largest key), or
    e each (BY_MASS: target = goal * W(key >= lo), the fraction top_p of the mass at or above
    lo, measured on the first pass).

    Bracket invariant: ``W(key >= lo) >= target > W(key >= hi)``, so A is in [lo, hi). Each
    pass weighs the keys at or above NUM_PIVOTS evenly spaced pivots (the first is lo), keeps
    the sub-bracket between the last pivot that meets the target and the next, and snaps
    it to the smallest and largest key seen inside the old bracket (no token lies between).
    """
    hi = tl.full([], KEY_ONE + 1, tl.int32)
    target = tl.full([], -1.0, tl.float32) if BY_MASS else goal
    steps = tl.arange(0, NUM_PIVOTS)
    while hi - lo > 1:
        span = (hi - lo).to(tl.int64)  # span * step passes 2^31
        pivots = lo + ((span * steps) // NUM_PIVOTS).to(tl.int32)
        weight_at = tl.zeros([NUM_PIVOTS], tl.float32)
        # Per lane, reduced after the pass.
        lowest_inside = tl.full([BLOCK_V], KEY_ONE + 1, tl.int32)
        highest_inside = tl.full([BLOCK_V], -1, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            usable, in_row = _usable_chunk(row_ptr, cols, vocab, has_posinf, no_usable)
            keys, e = _filter_keys(usable, in_row, row_max, exp2_scale)
            weight = e if BY_MASS else tl.where(in_row, 1.0, 0.0)
            at_or_above = keys[:, None] >= pivots[None, :]
            weight_at += tl.sum(tl.where(at_or_above, weight[:, None], 0.0), axis=0)
            inside = (keys >= lo) & (keys < hi)
            lowest_inside = tl.minimum(lowest_inside, tl.where(inside, keys, KEY_ONE + 1))
            highest_inside = tl.maximum(highest_inside, tl.where(inside, keys, -1))
        if BY_MASS:
            mass_from_lo = tl.sum(tl.where(steps == 0, weight_at, 0.0), axis=0)
            target = tl.where(target < 0.0, goal * mass_from_lo, target)
        # lo meets the target by the invariant; forcing it guards against float rounding.
        meets = (weight_at >= target) | (steps == 0)
        new_lo = tl.max(tl.where(meets, pivots, lo), axis=0)
        new_hi = tl.min(tl.where(meets, hi, pivots), axis=0)
        lo = tl.maximum(new_lo, tl.min(lowest_inside, axis=0))
        hi = tl.minimum(new_hi, tl.max(highest_inside, axis=0) + 1)
    return lo


@triton.jit
def _gumbel_argmax(row_ptr, vocab, has_posinf, no_usable, row_max, scale, exp2_scale,
                   threshold, seed, offset, BLOCK_V: tl.constexpr):
    """First index of the largest ``z_i + g_i`` over tokens with key >= threshold (all when
    threshold is 0), with z and g as in ``reference.sample``."""
    best = tl.full([BLOCK_V], NEG_INF, tl.float32)
    best_index = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        usable, in_row = _usable_chunk(row_ptr, cols, vocab, has_posinf, no_usable)
        z = tl.math.div_rn(usable - row_max, scale)
        drawable = tl.full([], 1, tl.int1)
        if threshold > 0:
            keys, _ = _filter_keys(usable, in_row, row_max, exp2_scale)
            z = tl.where(keys >= threshold, z, NEG_INF)
            # With a filter on, most chunks hold no token that could win: skip their noise.
            drawable = tl.max(z, axis=0) >= NEVER_DRAWN
        if drawable:
            uniform = _philox_uniform(seed, cols, offset, SAMPLE_STREAM)
            score = z - tl.log(-tl.log(uniform))
            better = score > best
            best = tl.where(better, score, best)
            best_index = tl.where(better, cols, best_index)
    _, token = _first_argmax(best, best_index, vocab)
    return token


# The per-row parameters are read one scalar per program, so specializing on their alignment
# buys nothing, and the engine passes row views of packed [3, batch] tensors whose alignment
# changes with the batch: each new combination cost a ~2 s recompile in the middle of a
# throughput run (H100, session 17). num_chunks varies with the batch too.
@triton.jit(do_not_specialize=["num_chunks"],
            do_not_specialize_on_alignment=["temperature_ptr", "top_k_ptr", "top_p_ptr",
                                            "min_p_ptr", "seeds_ptr", "offsets_ptr"])
def _sample_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                   offsets_ptr, out_ptr, vocab, row_stride, part_max_ptr, part_index_ptr,
                   num_chunks, BLOCK_V: tl.constexpr, MAX_BLOCK_V: tl.constexpr,
                   NUM_PIVOTS: tl.constexpr, CHUNKS: tl.constexpr):
    """Token of row ``program_id(0)``: logits ``[B, V]`` fp16/bf16/fp32 rows ``row_stride``
    elements apart; temperature, top_p, min_p float32 ``[B]``; top_k int32/int64 ``[B]``; seeds,
    offsets int64 ``[B]``; out int64 ``[B]``. With CHUNKS > 0 the max pass is already done:
    ``part_*`` hold ``num_chunks`` (<= CHUNKS) chunk maxima per row (_chunk_max_kernel)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    temperature = tl.load(temperature_ptr + row)
    if CHUNKS > 0:
        raw_max, raw_argmax = _combine_chunk_maxima(part_max_ptr, part_index_ptr, row,
                                                    num_chunks, vocab, CHUNKS)
    else:
        raw_max, raw_argmax = _row_max(row_ptr, vocab, MAX_BLOCK_V)
    if temperature > 0:
        has_posinf = raw_max == POS_INF
        no_usable = raw_max == NEG_INF
        row_max = tl.where(has_posinf | no_usable, 0.0, raw_max)
        scale = tl.minimum(temperature, FLT_MAX)
        # Kept normal (an infinite temperature gives a subnormal), since a 0 flushed from it
        # would turn the -inf of unusable tokens into NaN.
        exp2_scale = tl.maximum(LOG2E / scale, FLT_MIN)
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)

        threshold = tl.full([], 0, tl.int32)
        if (top_k > 0) & (top_k < vocab):
            threshold = _threshold_search(row_ptr, vocab, has_posinf, no_usable, row_max,
                                          exp2_scale, threshold, top_k.to(tl.float32),
                                          False, BLOCK_V, NUM_PIVOTS)
        if not (top_p >= 1.0):
            # top_p <= 0 (or NaN) keeps no token by mass: only the most likely stay.
            fraction = tl.where(top_p > 0.0, top_p, 0.0)
            threshold = _threshold_search(row_ptr, vocab, has_posinf, no_usable, row_max,
                                          exp2_scale, threshold, fraction, True, BLOCK_V,
                                          NUM_PIVOTS)
        # e >= min_p; min_p > 1 or NaN keeps only the most likely tokens.
        min_p_key = tl.where(min_p <= 0.0, 0,
                             tl.where(min_p <= 1.0, min_p.to(tl.int32, bitcast=True), KEY_ONE))
        threshold = tl.minimum(tl.maximum(threshold, min_p_key), KEY_ONE)

        seed = tl.load(seeds_ptr + row)
        offset = tl.load(offsets_ptr + row)
        token = _gumbel_argmax(row_ptr, vocab, has_posinf, no_usable, row_max, scale,
                               exp2_scale, threshold, seed, offset, BLOCK_V)
    else:
        token = raw_argmax
    tl.store(out_ptr + row, token.to(tl.int64))


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """One token per row; the launcher behind ``ember.ops.sample`` (inputs already checked).

    logits ``[B, V]`` fp16/bf16/fp32/fp64 with a contiguous last dim; temperature, top_p,
    min_p float32 ``[B]``; top_k int32 or int64 ``[B]``; seeds, offsets int64 ``[B]``, all on one
    device. Returns int64 ``[B]``.
    """
    batch, vocab = logits.shape
    if vocab > MAX_VOCAB:
        raise ValueError(f"sample: the triton backend handles vocabularies of at most "
                         f"{MAX_VOCAB} tokens, got {vocab}")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if logits.dtype == torch.float64:
        logits = logits.float()
    max_block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_chunks = max_pass_chunks(batch, vocab, sm_count(logits.device))
    part_max = part_index = out  # unused without chunks
    if num_chunks > 1:
        part_max = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
        part_index = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
        _chunk_max_kernel[(batch, num_chunks)](logits, part_max, part_index, vocab,
                                               logits.stride(0), MAX_BLOCK_V=max_block,
                                               num_warps=NUM_WARPS)
    _sample_kernel[(batch,)](
        logits, temperature, top_k, top_p, min_p, seeds, offsets, out, vocab, logits.stride(0),
        part_max, part_index, num_chunks,
        BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), MAX_BLOCK_V=max_block,
        NUM_PIVOTS=NUM_PIVOTS,
        CHUNKS=triton.next_power_of_2(num_chunks) if num_chunks > 1 else 0,
        num_warps=NUM_WARPS,
    )
    return out


def max_pass_chunks(batch: int, vocab: int, num_sms: int) -> int:
    """Programs per row of the separate max pass, or 1 for none: one per MAX_BLOCK_V tokens
    while the batch leaves SMs idle (see the module docstring)."""
    return triton.cdiv(vocab, MAX_BLOCK_V) if batch < num_sms else 1
