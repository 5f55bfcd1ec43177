"""Decode / append attention over a KV cache on a NeuronCore (``flash_attn_with_kvcache``), and
the LSE merge of partial attentions (``merge_attn_states``).

Layout (after nki-library's ``attention_tkg`` and vLLM's NKI paged attention, in the current
NKI API):

* GQA packing: the ``group = hq / hkv`` query heads of one KV head times the ``seqlen_q`` new
  positions are the rows of one tile (row ``g * seqlen_q + i``), so the TensorE work per key is
  shared by the whole group. Each token tile of the cache is gathered once for all KV heads
  (rows of ``heads_kv * d`` contiguous elements) and its masks are built once per row block,
  then every KV head's softmax state is updated from it.
* Cache reads: the cache is addressed as token slots ``[num_slots, heads_kv, d]`` (a paged
  cache ``[blocks, block_size, ...]`` or a contiguous one ``[batch, max_len, ...]`` viewed
  flat). For up to 128 tokens per DMA the kernel computes each token's slot on the device,
  ``block_table[b, t // block_size] * block_size + t % block_size``, from the block table in
  HBM, and gathers the rows with one indirect DMA (``.ap(vector_offset=...)``). Tokens at or
  past the sequence length get slot -1 and ``oob_mode.skip`` leaves their rows at the zeros
  written before, so unused cache memory (whatever it holds) never reaches the math.
* Masks are runtime: the row's diagonal position is ``seqlens[b] - seqlen_q + i``; key
  positions come from ``iota`` and are compared with per-row thresholds; tree masks are
  placed by a 0/1 matmul (the tree rows against a one-hot of where the last seqlen_q keys sit).
* Split-KV (Flash-Decoding): launched as ``kernel[2]`` the two programs of a logical
  NeuronCore (LNC=2) each take half of the KV tiles and write a float32 partial output and
  LSE; ``merge_kernel`` combines them. Launched plainly, one program writes the result.

Loops run over the cache capacity (block_table width, or max_len): Neuron compiles per shape,
so serving stacks bucket these shapes; tokens past a sequence's length cost compute but no
HBM traffic.
"""

from ember.neuron_kernels import host
from ember.neuron_kernels.attention_core import FLOOR, MASKED, TINY, finish, new_state, scores, step
from ember.neuron_kernels.nki_api import nisa, nki, nl
from ember.neuron_kernels.tiles import FMAX, PMAX, chunks, columns_of, transpose_blocks

# Slots are computed in float32 on VectorE (exact below 2^24).
MAX_SLOTS = 2 ** 24


def gather_tiles(paged, block_size, capacity):
    """Token tiles of at most 128 cache rows, each fetched by one gather:
    ``[(first token, tokens, first block), ...]``. Paged tiles never straddle a block
    boundary in the middle of a block (so each partition's block and offset are known at
    trace time): whole blocks when they are <= 128 tokens, else 128-token pieces of a block."""
    if not paged:
        return [(t0, n, 0) for t0, n in chunks(capacity, PMAX)]
    num_blocks = capacity // block_size
    if block_size <= PMAX:
        per_tile = PMAX // block_size
        return [(j0 * block_size, nb * block_size, j0)
                for j0, nb in chunks(num_blocks, per_tile)]
    return [(j * block_size + o0, n, j) for j in range(num_blocks)
            for o0, n in chunks(block_size, PMAX)]


def score_tiles(paged, block_size, capacity):
    """Consecutive gather tiles grouped into score tiles of at most 512 keys."""
    groups, current, width = [], [], 0
    for tile in gather_tiles(paged, block_size, capacity):
        if width + tile[1] > FMAX:
            groups.append(current)
            current, width = [], 0
        current.append(tile)
        width += tile[1]
    groups.append(current)
    return groups


def row_segments(r0, rows, seqlen_q):
    """Rows ``[r0, r0+rows)`` of a packed tile as ``[(head in group, first position, count,
    offset in tile), ...]`` (row ``g * seqlen_q + i``)."""
    segments = []
    r = r0
    while r < r0 + rows:
        g, i = divmod(r, seqlen_q)
        count = min(seqlen_q - i, r0 + rows - r)
        segments.append((g, i, count, r - r0))
        r += count
    return segments


@nki.jit
def decode_kernel(q, k_slots, v_slots, seqlens, block_table, tree, k_scale, v_scale,
                  block_size, softmax_scale, window_left, window_right, paged, has_tree, fp8):
    """Attention of q over cached keys ``[0, seqlens[b])``, query row i at key position
    ``seqlens[b] - seqlen_q + i``.

    q ``[b, sq, hq, d]`` fp16/bf16/fp32; k_slots/v_slots ``[num_slots, hkv, d]`` in q's dtype
    or float8_e4m3fn (then k_scale/v_scale float32 ``[1]``: value = cache * scale); seqlens
    int32 ``[b]``; block_table int32 ``[b, max_blocks]`` if ``paged`` (else the cache holds
    ``block_size`` = max_len slots per sequence); tree uint8 ``[b, sq, sq]`` if ``has_tree``.
    window_right is 0 for causal, -1 unbounded (also window_left).

    One program: returns out ``[b, sq, hq, d]`` (q's dtype), lse float32 ``[b, hq, sq]``.
    Two programs (``decode_kernel[2]``, split-KV): returns float32 partials out
    ``[2, b * sq, hq, d]`` and lse ``[2, hq, b * sq]`` for ``merge_kernel``.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_slots.shape[1]
    group = heads_q // heads_kv
    capacity = block_table.shape[1] * block_size if paged else block_size
    pid, programs = nl.program_id(0), nl.num_programs()
    if programs == 1:
        out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm, name="out")
        lse = nl.ndarray((batch, heads_q, seqlen_q), dtype=nl.float32, buffer=nl.shared_hbm,
                         name="lse")
    else:
        out = nl.ndarray((programs, batch * seqlen_q, heads_q, head_dim), dtype=nl.float32,
                         buffer=nl.shared_hbm, name="out_partial")
        lse = nl.ndarray((programs, heads_q, batch * seqlen_q), dtype=nl.float32,
                         buffer=nl.shared_hbm, name="lse_partial")

    tiles = score_tiles(paged, block_size, capacity)
    per_program = -(-len(tiles) // programs)
    my_tiles = tiles[pid * per_program:(pid + 1) * per_program]
    offsets = _block_offsets(block_size) if paged and block_size <= PMAX else None

    # Query rows (and what depends on them only) per 128-row block of the packed rows.
    row_blocks = []
    for r0, rows in chunks(group * seqlen_q, PMAX):
        blk = {"rows": rows, "segments": row_segments(r0, rows, seqlen_q), "scale": softmax_scale,
               "v_factor": 1.0}
        if fp8:
            blk["scale"] = 1.0  # scores are scaled by softmax_scale * k_scale on evacuation
            blk["k_factor"] = _broadcast_scalar(k_scale, rows)
            nisa.tensor_scalar(dst=blk["k_factor"], data=blk["k_factor"], op0=nl.multiply,
                               operand0=softmax_scale)
            blk["v_factor"] = _broadcast_scalar(v_scale, rows)
        row_blocks.append(blk)

    for b in range(batch):
        # This sequence's length on every partition, for the gathers' bounds.
        length = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=length, src=seqlens.ap(pattern=[[0, PMAX], [1, 1]], offset=b))
        for blk in row_blocks:
            rows, segments = blk["rows"], blk["segments"]
            blk["bounds"] = _row_bounds(length, segments, rows, seqlen_q, window_left,
                                        window_right, has_tree)
            blk["tree"] = _tree_columns(tree, b, segments, rows, seqlen_q, q.dtype) \
                if has_tree else []
            blk["q_cols"], blk["states"] = [], []
            for hk in range(heads_kv):
                q_rows = nl.ndarray((rows, head_dim), dtype=q.dtype, buffer=nl.sbuf)
                for g, i0, count, at in segments:
                    nisa.dma_copy(dst=q_rows[at:at + count, :],
                                  src=q[b, i0:i0 + count, hk * group + g, :])
                blk["q_cols"].append(columns_of(q_rows, q.dtype))
                blk["states"].append(new_state(rows, head_dim))

        for tile in my_tiles:
            # One gather per token tile brings every KV head's rows; masks depend on the rows
            # only, so they are built once per row block and shared by the heads.
            k_rows, v_rows, first, width = _gather_kv(k_slots, v_slots, block_table, offsets,
                                                      length, b, tile, block_size, paged,
                                                      q.dtype)
            k_cols = [_key_columns(k_rows, hk, head_dim, width, q.dtype)
                      for hk in range(heads_kv)]
            for blk in row_blocks:
                rows = blk["rows"]
                hidden = _hidden_keys(blk["bounds"], blk["tree"], first, width, rows,
                                      window_left, q.dtype)
                for hk in range(heads_kv):
                    s_psum = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.psum)
                    scores(s_psum, blk["q_cols"][hk], k_cols[hk])
                    s = s_psum
                    if fp8:
                        # k_scale is a runtime value of either sign: scale before the max.
                        s = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_scalar(dst=s, data=s_psum, op0=nl.multiply,
                                           operand0=blk["k_factor"])
                    nisa.tensor_copy_predicated(dst=s, src=MASKED, predicate=hidden)
                    v_head = [r[:, hk * head_dim:(hk + 1) * head_dim] for r in v_rows]
                    step(blk["states"][hk], s, blk["scale"], v_head, q.dtype)

        out_dtype = q.dtype if programs == 1 else nl.float32
        for blk in row_blocks:
            for hk in range(heads_kv):
                o_tile, lse_tile = finish(blk["states"][hk], blk["scale"], out_dtype, True,
                                          blk["v_factor"])
                for g, i0, count, at in blk["segments"]:
                    h = hk * group + g
                    if programs == 1:
                        nisa.dma_copy(dst=out[b, i0:i0 + count, h, :],
                                      src=o_tile[at:at + count, :])
                        nisa.dma_copy(dst=lse[b, h, i0:i0 + count],
                                      src=lse_tile[at:at + count, :])
                    else:
                        t0 = b * seqlen_q + i0
                        nisa.dma_copy(dst=out[pid, t0:t0 + count, h, :],
                                      src=o_tile[at:at + count, :])
                        nisa.dma_copy(dst=lse[pid, h, t0:t0 + count],
                                      src=lse_tile[at:at + count, :])
    return out, lse


def _block_offsets(block_size):
    """int32 ``[128 // bs * bs, 1]``: partition p holds ``p % block_size`` (one iota per block;
    the whole-block gather tiles all share it)."""
    blocks = PMAX // block_size
    offsets = nl.ndarray((blocks * block_size, 1), dtype=nl.int32, buffer=nl.sbuf)
    for j in range(blocks):
        nisa.iota(dst=offsets[j * block_size:(j + 1) * block_size, :], pattern=[[0, 1]],
                  offset=0, channel_multiplier=1)
    return offsets


def _broadcast_scalar(scalar, rows):
    """A float32 HBM ``[1]`` value on ``rows`` partitions: ``[rows, 1]`` in SBUF."""
    tile = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=scalar.ap(pattern=[[0, rows], [1, 1]], offset=0))
    return tile


def _row_bounds(length, segments, rows, seqlen_q, window_left, window_right, has_tree):
    """Per-row float32 ``[rows, 1]`` thresholds: keys ``>= hi`` are hidden (past the sequence or
    right of the window/causal edge), keys ``< lo`` too (left window edge, if any), and with a
    tree mask ``ctx`` (``[128, 1]``) = where the last seqlen_q keys start."""
    diag_from_len = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    for _, i0, count, at in segments:
        # row i sits at key seqlens[b] - seqlen_q + i
        nisa.iota(dst=diag_from_len[at:at + count, :], pattern=[[0, 1]],
                  offset=i0 - seqlen_q, channel_multiplier=1)
    diag = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=diag, data1=diag_from_len, data2=length[0:rows, :], op=nl.add)
    bounds = {"hi": length[0:rows, :], "lo": None, "ctx": None}
    if window_right >= 0:
        hi = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=hi, data=diag, op0=nl.add, operand0=float(window_right + 1),
                           op1=nl.minimum, operand1=length[0:rows, :])
        bounds["hi"] = hi
    if window_left >= 0:
        lo = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=lo, data=diag, op0=nl.subtract, operand0=float(window_left))
        bounds["lo"] = lo
    if has_tree:
        ctx = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=ctx, data=length, op0=nl.subtract, operand0=float(seqlen_q))
        bounds["ctx"] = ctx
    return bounds


def _tree_columns(tree, b, segments, rows, seqlen_q, dtype):
    """The tree mask of sequence b, transposed for TensorE: per 128-chunk of tree columns c,
    ``[cc, rows]`` with element (c, row) = tree[b, i(row), c] as 0/1 in ``dtype``."""
    cols = []
    for c0, cc in chunks(seqlen_q, PMAX):
        tile = nl.ndarray((cc, rows), dtype=dtype, buffer=nl.sbuf)
        for _, i0, count, at in segments:
            src = tree.ap(pattern=[[1, cc], [seqlen_q, count]],
                          offset=(b * seqlen_q + i0) * seqlen_q + c0)
            nisa.dma_copy(dst=tile[:, at:at + count], src=src)
        cols.append((c0, cc, tile))
    return cols


def _gather_kv(k_slots, v_slots, block_table, offsets, length, b, tile, block_size, paged,
               dtype):
    """Cache rows of one score tile for every KV head: lists of SBUF ``[tokens, heads_kv * d]``
    K tiles (cache dtype) and V tiles (in ``dtype``); rows past the sequence are zeros.
    Returns (k_rows, v_rows, first key position, width)."""
    row_len = k_slots.shape[1] * k_slots.shape[2]
    k_rows, v_rows = [], []
    for t0, tokens, j0 in tile:
        slot = nl.ndarray((tokens, 1), dtype=nl.int32, buffer=nl.sbuf)
        if not paged:
            nisa.iota(dst=slot, pattern=[[0, 1]], offset=b * block_size + t0,
                      channel_multiplier=1)
        else:
            block = nl.ndarray((tokens, 1), dtype=nl.int32, buffer=nl.sbuf)
            row = b * block_table.shape[1]
            if block_size <= PMAX:
                # partition p: block_table[b, j0 + p // bs], offset p % bs
                src = block_table.ap(pattern=[[1, tokens // block_size], [0, block_size]],
                                     offset=row + j0)
                in_block = offsets[0:tokens, :]
            else:
                src = block_table.ap(pattern=[[0, tokens], [1, 1]], offset=row + j0)
                in_block = nl.ndarray((tokens, 1), dtype=nl.int32, buffer=nl.sbuf)
                nisa.iota(dst=in_block, pattern=[[0, 1]], offset=t0 - j0 * block_size,
                          channel_multiplier=1)
            nisa.dma_copy(dst=block, src=src)
            nisa.scalar_tensor_tensor(dst=slot, data=block, op0=nl.multiply,
                                      operand0=float(block_size), op1=nl.add,
                                      operand1=in_block)
        # Tokens at or past the length: slot -1, which the gathers skip.
        position = nl.ndarray((tokens, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=position, pattern=[[0, 1]], offset=t0, channel_multiplier=1)
        past = nl.ndarray((tokens, 1), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=past, data=position, op0=nl.greater_equal,
                           operand0=length[0:tokens, :])
        nisa.tensor_copy_predicated(dst=slot, src=-1, predicate=past)

        for cache, rows_out in ((k_slots, k_rows), (v_slots, v_rows)):
            rows = nl.ndarray((tokens, row_len), dtype=cache.dtype, buffer=nl.sbuf)
            nisa.memset(dst=rows, value=0.0)
            nisa.dma_copy(dst=rows, src=cache.ap(pattern=[[row_len, tokens], [1, row_len]],
                                                 vector_offset=slot, indirect_dim=0),
                          oob_mode=nisa.oob_mode.skip)
            rows_out.append(rows)

    if v_rows[0].dtype != dtype:
        # fp8 cache rows: TensorE on trn2 takes float8_e4m3 but not the OCP e4m3fn of the
        # cache; the values are exact in bf16/fp16.
        widened = []
        for r in v_rows:
            w = nl.ndarray(r.shape, dtype=dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=w, src=r)
            widened.append(w)
        v_rows = widened
    return k_rows, v_rows, tile[0][0], sum(t[1] for t in tile)


def _key_columns(k_rows, hk, head_dim, width, dtype):
    """K^T of KV head ``hk``: per 128-chunk of head_dim an SBUF ``[dc, width]`` tile in
    ``dtype`` (fp8 rows are widened on the copy out of the transposes)."""
    cols = []
    for d0, dc in chunks(head_dim, PMAX):
        tile = nl.ndarray((dc, width), dtype=dtype, buffer=nl.sbuf)
        lo = hk * head_dim + d0
        transpose_blocks(tile, [r[:, lo:lo + dc] for r in k_rows])
        cols.append(tile)
    return cols


def _hidden_keys(bounds, tree_cols, first, width, rows, window_left, dtype):
    """uint8 ``[rows, width]``: 1 where a row must not see key ``first + f``."""
    position = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=position, pattern=[[1, width]], offset=first, channel_multiplier=0)
    hidden = nl.ndarray((rows, width), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=hidden, data=position, op0=nl.greater_equal, operand0=bounds["hi"])
    if window_left >= 0:
        left_of = nl.ndarray((rows, width), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=left_of, data=position, op0=nl.less, operand0=bounds["lo"])
        nisa.tensor_tensor(dst=hidden, data1=hidden, data2=left_of, op=nl.maximum)
    if tree_cols:
        # in_tree[row, f] = tree[b, i(row), c] where key first+f is tail key c, else 0.
        in_tree = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.psum)
        for idx, (c0, cc, cols) in enumerate(tree_cols):
            key_minus_c = nl.ndarray((cc, width), dtype=nl.float32, buffer=nl.sbuf)
            nisa.iota(dst=key_minus_c, pattern=[[1, width]], offset=first - c0,
                      channel_multiplier=-1)
            one_hot = nl.ndarray((cc, width), dtype=dtype, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=one_hot, data=key_minus_c, op0=nl.equal,
                               operand0=bounds["ctx"][0:cc, :])
            nisa.nc_matmul(dst=in_tree, stationary=cols, moving=one_hot, accumulate=idx > 0)
        # Visible: a key before the tail, or a tail key the tree allows.
        before_tail = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=before_tail, data=position, op0=nl.less,
                           operand0=bounds["ctx"][0:rows, :])
        nisa.tensor_tensor(dst=before_tail, data1=before_tail, data2=in_tree, op=nl.maximum)
        outside = nl.ndarray((rows, width), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=outside, data=before_tail, op0=nl.equal, operand0=0.0)
        nisa.tensor_tensor(dst=hidden, data1=hidden, data2=outside, op=nl.maximum)
    return hidden


@nki.jit
def merge_kernel(out_a, lse_a, out_b, lse_b, out_dtype):
    """Combine partial attentions by their LSE (``merge_attn_states``).

    out_a/out_b ``[tokens, heads, d]`` (fp16/bf16/fp32), lse_a/lse_b float32 ``[heads, tokens]``
    (-inf: that side saw no key). out_dtype: ``nki.language`` dtype name of the output.
    Returns out ``[tokens, heads, d]`` and lse float32 ``[heads, tokens]``; rows empty on both
    sides are zeros with lse -inf.
    """
    tokens, heads, head_dim = out_a.shape
    dtype = getattr(nl, out_dtype)
    out = nl.ndarray(out_a.shape, dtype=dtype, buffer=nl.shared_hbm, name="out")
    lse = nl.ndarray((heads, tokens), dtype=nl.float32, buffer=nl.shared_hbm, name="lse")
    for h in range(heads):
        for t0, rows in chunks(tokens, PMAX):
            sides = []
            for o_hbm, l_hbm in ((out_a, lse_a), (out_b, lse_b)):
                o = nl.ndarray((rows, head_dim), dtype=o_hbm.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=o, src=o_hbm[t0:t0 + rows, h, :])
                lv = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.dma_copy(dst=lv, src=l_hbm[h, t0:t0 + rows])
                sides.append((o, lv))
            (o_a, l_a), (o_b, l_b) = sides
            # Shift by the larger LSE, floored so two empty sides give exp(-inf) = 0, not NaN.
            top = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=top, data1=l_a, data2=l_b, op=nl.maximum)
            nisa.tensor_scalar(dst=top, data=top, op0=nl.maximum, operand0=FLOOR)
            neg_top = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=neg_top, data=top, op0=nl.multiply, operand0=-1.0)
            w_a = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=w_a, op=nl.exp, data=l_a, bias=neg_top)
            w_b = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=w_b, op=nl.exp, data=l_b, bias=neg_top)
            total = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=total, data1=w_a, data2=w_b, op=nl.add)
            safe = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=safe, data=total, op0=nl.maximum, operand0=TINY)
            inv = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.reciprocal(dst=inv, data=safe)
            nisa.tensor_tensor(dst=w_a, data1=w_a, data2=inv, op=nl.multiply)
            nisa.tensor_tensor(dst=w_b, data1=w_b, data2=inv, op=nl.multiply)

            part_b = nl.ndarray((rows, head_dim), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=part_b, data=o_b, op0=nl.multiply, operand0=w_b)
            merged = nl.ndarray((rows, head_dim), dtype=dtype, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=merged, data=o_a, op0=nl.multiply, operand0=w_a,
                                      op1=nl.add, operand1=part_b)
            nisa.dma_copy(dst=out[t0:t0 + rows, h, :], src=merged)

            merged_lse = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=merged_lse, op=nl.log, data=safe)
            nisa.tensor_tensor(dst=merged_lse, data1=merged_lse, data2=top, op=nl.add)
            empty = nl.ndarray((rows, 1), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=empty, data=total, op0=nl.equal, operand0=0.0)
            nisa.tensor_copy_predicated(dst=merged_lse, src=float("-inf"), predicate=empty)
            nisa.dma_copy(dst=lse[h, t0:t0 + rows], src=merged_lse)
    return out, lse


def split_programs(num_splits, paged, block_size, capacity):
    """Programs of the decode launch: 2 (split-KV over the two cores of a logical NeuronCore)
    when there are at least two score tiles to share, unless the caller asked for 1. Larger
    ``num_splits`` are capped at 2, the logical core degree; the result does not change."""
    tiles = len(score_tiles(paged, block_size, capacity))
    return 1 if num_splits == 1 or tiles < 2 else 2


def flash_attn_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal,
                            window_left, window_right, num_splits, max_seqlen_k, tree_mask,
                            k_scale, v_scale):
    """Backend ``"flash_attn_with_kvcache"`` (signature of ``ember.ops.attention``)."""
    del max_seqlen_k  # one tile shape
    paged = block_table is not None
    block_size = k_cache.shape[1]
    heads_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = k_cache.shape[0] * block_size
    if slots >= MAX_SLOTS:
        raise ValueError(f"flash_attn_with_kvcache: the nki backend addresses at most "
                         f"{MAX_SLOTS} cache slots (blocks * block_size), got {slots}")
    capacity = block_size * (block_table.shape[1] if paged else 1)
    programs = split_programs(num_splits, paged, block_size, capacity)
    launch = decode_kernel if programs == 1 else decode_kernel[programs]
    fp8 = k_cache.dtype != q.dtype

    def arg(t):
        return None if t is None else host.to_numpy(t)

    out, lse = launch(host.to_numpy(q), host.to_numpy(k_cache.reshape(slots, heads_kv, head_dim)),
                      host.to_numpy(v_cache.reshape(slots, heads_kv, head_dim)),
                      host.to_numpy(seqlens_k), arg(block_table), arg(tree_mask),
                      arg(None if k_scale is None else k_scale.reshape(1)),
                      arg(None if v_scale is None else v_scale.reshape(1)),
                      block_size, float(softmax_scale), int(window_left),
                      0 if causal else int(window_right), paged, tree_mask is not None, fp8)
    batch, seqlen_q, heads_q, _ = q.shape
    if programs > 1:
        out, lse = merge_kernel(out[0], lse[0], out[1], lse[1], host.dtype_name(q))
        out = out.reshape(q.shape)
        lse = lse.reshape(heads_q, batch, seqlen_q).transpose(1, 0, 2)
    return host.to_torch(out, q.device), host.to_torch(lse, q.device)


def merge_attn_states(out_a, lse_a, out_b, lse_b):
    """Backend ``"merge_attn_states"``: ``(out, lse)``."""
    out, lse = merge_kernel(host.to_numpy(out_a), host.to_numpy(lse_a), host.to_numpy(out_b),
                            host.to_numpy(lse_b), host.dtype_name(out_a))
    return host.to_torch(out, out_a.device), host.to_torch(lse, out_a.device)

