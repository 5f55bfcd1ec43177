"""FlashAttention forward on a NeuronCore: ``flash_attn_func`` (NHD, causal/sliding window with
bottom-right alignment, GQA, softmax scale, LSE).

Structure (after nki-samples' ``flash_fwd`` and nki-library's ``attention_cte``, in the current
NKI API): the kernel loops over batch and KV heads itself; for one KV head it keeps a group of
(query head, 128-row query tile) items resident in SBUF (their Q^T tiles and float32 softmax
state) and streams the K/V sequence once through them in 512-key tiles, so GQA reuses each
K/V tile for all query heads of the group without copying it.

Per 512-key tile and item:
  1. ``S [rows, 512] = Q K^T`` on TensorE (head_dim on the partitions; Q^T and K^T come from
     TensorE transposes of row tiles), float32 in one PSUM bank;
  2. tiles the mask hides entirely are skipped at trace time; partly hidden ones are copied to
     SBUF and masked by ``affine_select`` (the mask is affine in row and key index);
  3. the online-softmax update and ``P V`` (``attention_core.step``).
"""

import torch

from ember.neuron_kernels import host
from ember.neuron_kernels.attention_core import MASKED, finish, new_state, scores, step
from ember.neuron_kernels.nki_api import nisa, nki, nl
from ember.neuron_kernels.tiles import FMAX, PMAX, chunks, columns_of, transpose_blocks

# (query head, query tile) items whose state stays in SBUF while K/V stream past: 16 items of
# head_dim 256 hold ~24 KiB per partition (Q^T, o, m, l), far below SBUF's 192-256 KiB.
RESIDENT_ITEMS = 16


def visible_keys(row, seqlen_q, seqlen_k, window_left, window_right):
    """``(lo, hi)``: the keys query ``row`` sees, inclusive (empty when lo > hi)."""
    pos = row + seqlen_k - seqlen_q
    lo = max(pos - window_left, 0) if window_left >= 0 else 0
    hi = min(pos + window_right, seqlen_k - 1) if window_right >= 0 else seqlen_k - 1
    return lo, hi


def tile_plan(i0, rows, j0, n, seqlen_q, seqlen_k, window_left, window_right):
    """What query rows ``[i0, i0+rows)`` need from keys ``[j0, j0+n)``, decided at trace time:
    ``(needed, mask_right, mask_left)``."""
    ranges = [visible_keys(i, seqlen_q, seqlen_k, window_left, window_right)
              for i in range(i0, i0 + rows)]
    needed = any(lo <= hi and lo <= j0 + n - 1 and hi >= j0 for lo, hi in ranges)
    mask_right = any(hi < j0 + n - 1 for _, hi in ranges)
    mask_left = any(lo > j0 for lo, _ in ranges)
    return needed, mask_right, mask_left


@nki.jit
def flash_fwd_kernel(q, k, v, softmax_scale, window_left, window_right):
    """q ``[b, sq, hq, d]``, k/v ``[b, sk, hkv, d]`` (HBM, fp16/bf16/fp32; sk >= 1).

    window_left/window_right: -1 unbounded; causal is window_right = 0.
    Returns out ``[b, sq, hq, d]`` in q's dtype and lse float32 ``[b, hq, sq]``.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm, name="out")
    lse = nl.ndarray((batch, heads_q, seqlen_q), dtype=nl.float32, buffer=nl.shared_hbm,
                     name="lse")
    items = [(g, i0, rows) for g in range(group) for i0, rows in chunks(seqlen_q, PMAX)]

    for b in range(batch):
        for hk in range(heads_kv):
            for first in range(0, len(items), RESIDENT_ITEMS):
                resident = items[first:first + RESIDENT_ITEMS]
                q_cols, states = [], []
                for g, i0, rows in resident:
                    q_rows = nl.ndarray((rows, head_dim), dtype=q.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(dst=q_rows, src=q[b, i0:i0 + rows, hk * group + g, :])
                    q_cols.append(columns_of(q_rows, q.dtype))
                    states.append(new_state(rows, head_dim))

                for j0, n in chunks(seqlen_k, FMAX):
                    plans = [tile_plan(i0, rows, j0, n, seqlen_q, seqlen_k, window_left,
                                       window_right) for _, i0, rows in resident]
                    if not any(plan[0] for plan in plans):
                        continue
                    k_cols, v_rows = _load_kv(k, v, b, hk, j0, n)
                    for idx in range(len(resident)):
                        needed, mask_right, mask_left = plans[idx]
                        if not needed:
                            continue
                        _, i0, rows = resident[idx]
                        s_psum = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.psum)
                        scores(s_psum, q_cols[idx], k_cols)
                        s = s_psum
                        diag = i0 + seqlen_k - seqlen_q  # key position of row i0
                        if mask_right or mask_left:
                            # affine_select reads and writes SBUF
                            s = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
                            nisa.tensor_copy(dst=s, src=s_psum)
                        if mask_right:
                            # keep key j0+f for row i0+r iff (diag + r + right) - (j0 + f) >= 0
                            nisa.affine_select(dst=s, pattern=[[-1, n]], channel_multiplier=1,
                                               on_true_tile=s, on_false_value=MASKED,
                                               cmp_op=nl.greater_equal,
                                               offset=diag + window_right - j0)
                        if mask_left:
                            # keep iff (j0 + f) - (diag + r - left) >= 0
                            nisa.affine_select(dst=s, pattern=[[1, n]], channel_multiplier=-1,
                                               on_true_tile=s, on_false_value=MASKED,
                                               cmp_op=nl.greater_equal,
                                               offset=j0 - diag + window_left)
                        step(states[idx], s, softmax_scale, v_rows, v.dtype)

                for idx in range(len(resident)):
                    g, i0, rows = resident[idx]
                    ranges = [visible_keys(i, seqlen_q, seqlen_k, window_left, window_right)
                              for i in range(i0, i0 + rows)]
                    empty = any(lo > hi for lo, hi in ranges)
                    o_tile, lse_tile = finish(states[idx], softmax_scale, q.dtype, empty)
                    h = hk * group + g
                    nisa.dma_copy(dst=out[b, i0:i0 + rows, h, :], src=o_tile)
                    nisa.dma_copy(dst=lse[b, h, i0:i0 + rows], src=lse_tile)
    return out, lse


def _load_kv(k, v, b, hk, j0, n):
    """K^T chunks ``[dc, n]`` (head_dim on partitions) and V row tiles ``[kc, d]`` of keys
    ``[j0, j0+n)`` of KV head ``hk``."""
    head_dim = k.shape[3]
    k_rows, v_rows = [], []
    for c0, kc in chunks(n, PMAX):
        k_tile = nl.ndarray((kc, head_dim), dtype=k.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=k_tile, src=k[b, j0 + c0:j0 + c0 + kc, hk, :])
        v_tile = nl.ndarray((kc, head_dim), dtype=v.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=v_tile, src=v[b, j0 + c0:j0 + c0 + kc, hk, :])
        k_rows.append(k_tile)
        v_rows.append(v_tile)
    k_cols = []
    for d0, dc in chunks(head_dim, PMAX):
        cols = nl.ndarray((dc, n), dtype=k.dtype, buffer=nl.sbuf)
        transpose_blocks(cols, [t[:, d0:d0 + dc] for t in k_rows])
        k_cols.append(cols)
    return k_cols, v_rows


def flash_attn(q, k, v, softmax_scale, causal, window_left, window_right):
    """Backend ``"flash_attn_func"`` (signature of ``ember.ops.attention``): ``(out, lse)``."""
    right = 0 if causal else window_right
    if k.shape[1] == 0:
        # No keys: every row is empty (the kernel needs at least one key tile to exist).
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        return out, lse
    out, lse = flash_fwd_kernel(host.to_numpy(q), host.to_numpy(k), host.to_numpy(v),
                                float(softmax_scale), int(window_left), int(right))
    return host.to_torch(out, q.device), host.to_torch(lse, q.device)
