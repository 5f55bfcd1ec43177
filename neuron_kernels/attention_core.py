"""Online-softmax attention steps shared by the prefill and decode NKI kernels.

A block of query rows (on the partitions) keeps float32 state in SBUF: the running max ``m``
of the raw scores, the running sum ``l`` of ``exp(scale * (s - m))`` and the unnormalised output
``o``. Each KV tile of scores ``s [rows, n]`` (PSUM or SBUF, float32, hidden keys set to
``MASKED``) updates it; ``finish`` divides by ``l`` and forms the LSE.

Rows that see no key at all must give zeros and lse = -inf, without NaN. The max never drops
below ``FLOOR``, so a hidden score gives ``exp(scale * (MASKED - m)) = 0`` even in a row whose
keys are all hidden (``m = FLOOR``), ``l`` stays 0 there, and ``finish`` takes ``max(l, TINY)``
before dividing and taking the log, then writes -inf into the LSE of those rows.
"""

from ember.neuron_kernels.nki_api import nisa, nl
from ember.neuron_kernels.tiles import PSUM_BANK_BYTES, itemsize, transpose_blocks

MASKED = -3.0e38   # finite (no inf - inf), far below FLOOR
FLOOR = -1.0e30    # below any real score, far above MASKED
TINY = 2.0 ** -60  # inside ScalarE log's valid input range [2^-64, 2^64]


def new_state(rows, head_dim):
    """Softmax state of ``rows`` query rows; the first KV tile creates the tiles."""
    return {"rows": rows, "head_dim": head_dim, "first": True, "m": None, "l": None, "o": None}


def scores(dst, q_cols, k_cols):
    """``dst [rows, n] (PSUM) = Q K^T``: ``q_cols``/``k_cols`` are lists over 128-wide chunks of
    head_dim of SBUF ``[dc, rows]`` / ``[dc, n]`` tiles (head_dim on partitions)."""
    for i in range(len(q_cols)):
        nisa.nc_matmul(dst=dst, stationary=q_cols[i], moving=k_cols[i], accumulate=i > 0)


def step(state, s, scale, v_rows, p_dtype):
    """Fold one KV tile into ``state``.

    s: ``[rows, n]`` float32 scores, hidden keys at ``MASKED``; ``exp`` uses ``scale * s``.
    v_rows: list of SBUF ``[kc, head_dim]`` V tiles covering the tile's n keys in order.
    p_dtype: dtype of the probabilities fed to TensorE (V's dtype, bf16/fp16/fp32).
    """
    rows, n = s.shape
    tile_max = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=tile_max, op=nl.maximum, data=s, axis=1)
    m_new = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    if state["first"]:
        nisa.tensor_scalar(dst=m_new, data=tile_max, op0=nl.maximum, operand0=FLOOR)
    else:
        nisa.tensor_tensor(dst=m_new, data1=state["m"], data2=tile_max, op=nl.maximum)
    neg_max = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg_max, data=m_new, op0=nl.multiply, operand0=-scale)

    # p = exp(scale * s - scale * m), with its row sums from ScalarE's accumulators.
    p = nl.ndarray((rows, n), dtype=p_dtype, buffer=nl.sbuf)
    row_sum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p, op=nl.exp, data=s, bias=neg_max, scale=scale, reduce_op=nl.add,
                    reduce_res=row_sum, reduce_cmd=nisa.reduce_cmd.reset_reduce)

    pv = nl.ndarray((rows, state["head_dim"]), dtype=nl.float32, buffer=nl.psum)
    _p_times_v(pv, p, v_rows)

    if state["first"]:
        o = nl.ndarray((rows, state["head_dim"]), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=pv)
        state["o"], state["l"] = o, row_sum
    else:
        # Rescale what the earlier tiles contributed by alpha = exp(scale * (m_old - m_new)).
        alpha = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=alpha, op=nl.exp, data=state["m"], bias=neg_max, scale=scale)
        nisa.tensor_scalar(dst=state["l"], data=state["l"], op0=nl.multiply, operand0=alpha,
                           op1=nl.add, operand1=row_sum)
        nisa.scalar_tensor_tensor(dst=state["o"], data=state["o"], op0=nl.multiply,
                                  operand0=alpha, op1=nl.add, operand1=pv)
    state["m"] = m_new
    state["first"] = False


def _p_times_v(pv, p, v_rows):
    """``pv [rows, d] (PSUM) = p [rows, n] @ V [n, d]``: P is transposed one V row tile at a
    time (keys onto the partitions, the contraction of the second matmul)."""
    rows = p.shape[0]
    pieces, k0 = [], 0
    for v in v_rows:
        pieces.append((k0, v.shape[0]))
        k0 += v.shape[0]
    # Consecutive pieces of equal height share one PSUM tile (one bank) and one copy out.
    per_bank = PSUM_BANK_BYTES // (rows * itemsize(p.dtype))
    batches = []
    for piece in pieces:
        if batches and batches[-1][0][1] == piece[1] and len(batches[-1]) < per_bank:
            batches[-1].append(piece)
        else:
            batches.append([piece])
    p_cols = []
    for batch in batches:
        kc = batch[0][1]
        cols = nl.ndarray((kc, rows * len(batch)), dtype=p.dtype, buffer=nl.sbuf)
        transpose_blocks(cols, [p[:, k0:k0 + kc] for k0, _ in batch])
        p_cols += [cols[:, i * rows:(i + 1) * rows] for i in range(len(batch))]
    for i in range(len(pieces)):
        nisa.nc_matmul(dst=pv, stationary=p_cols[i], moving=v_rows[i], accumulate=i > 0)


def finish(state, scale, out_dtype, empty_rows, v_scale=1.0):
    """Normalise: ``(out [rows, d] in out_dtype, lse [rows, 1] float32)`` SBUF tiles.

    empty_rows: whether some row may have seen no key (its lse becomes -inf; its output is
    already 0). v_scale: a ``[rows, 1]`` float32 factor of the output (fp8 V caches), or 1.0;
    it rides on the normalising instruction either way.
    """
    rows, d = state["rows"], state["head_dim"]
    out = nl.ndarray((rows, d), dtype=out_dtype, buffer=nl.sbuf)
    lse = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    if state["first"]:
        # No KV tile at all: every row is empty.
        nisa.memset(dst=out, value=0.0)
        nisa.memset(dst=lse, value=float("-inf"))
        return out, lse
    l_safe = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=l_safe, data=state["l"], op0=nl.maximum, operand0=TINY)
    inv = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv, data=l_safe)
    nisa.tensor_scalar(dst=out, data=state["o"], op0=nl.multiply, operand0=inv,
                       op1=nl.multiply, operand1=v_scale)
    log_l = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=log_l, op=nl.log, data=l_safe)
    nisa.scalar_tensor_tensor(dst=lse, data=state["m"], op0=nl.multiply, operand0=scale,
                              op1=nl.add, operand1=log_l)
    if empty_rows:
        empty = nl.ndarray((rows, 1), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=empty, data=state["l"], op0=nl.equal, operand0=0.0)
        nisa.tensor_copy_predicated(dst=lse, src=float("-inf"), predicate=empty)
    return out, lse
