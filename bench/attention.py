"""attention: prefill FlashAttention forward against torch SDPA's flash and cuDNN backends.

The grid of the FlashAttention-2 paper: 16k tokens in total, hidden size 2048, head dim 64 and
128 (heads = 2048 / d), seqlen 512..16k with batch = 16k / seqlen, causal and not, bf16. Plus a
varlen case (random lengths summing to 16k) and a GQA case (32 query heads on 8 KV heads).
"""

import itertools
import random

import torch

from bench import anchors, harness, report
from bench.harness import Rotation, ember_backends, relative_error, suite

TOTAL_TOKENS = 16384
HIDDEN = 2048
HEAD_DIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HEAD_DIMS = (128,)
QUICK_SEQLENS = (1024, 4096, 16384)
GQA_HEADS_Q, GQA_HEADS_KV, GQA_HEAD_DIM, GQA_SEQLEN = 32, 8, 128, 4096   # Llama-3-8B's heads
VARLEN_HEAD_DIM = 128
VARLEN_LENGTHS = (64, 4096)   # each sequence's length is drawn uniformly from this range
VARLEN_SEED = 0               # fixed, so every run times the same lengths
DTYPE = torch.bfloat16
ANCHORS = ("sdpa-flash", "sdpa-cudnn")
# Relative L2 error of a bf16 output against sdpa-flash's: rounding gives ~4e-3, a wrong kernel
# O(1). Above this the row is marked and its speed is void.
CHECK_TOLERANCE = 2e-2


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool) -> float:
    """Forward FLOPs by flash-attn's convention: Q·Kᵀ and P·V each 2·sq·sk·d per head, halved
    when causal (the exact causal count is a little over half; the convention keeps numbers
    comparable with published ones)."""
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal else flops


def varlen_attention_flops(seqlens, heads: int, head_dim: int, causal: bool) -> float:
    """FLOPs of self-attention over packed sequences: the sum over sequences."""
    return sum(attention_flops(1, heads, s, s, head_dim, causal) for s in seqlens)


def attention_bytes(batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int,
                    head_dim: int, elem_bytes: int) -> float:
    """Fewest bytes a forward pass moves: read q, k, v once and write o once."""
    q_and_o = 2 * batch * seqlen_q * heads_q * head_dim
    k_and_v = 2 * batch * seqlen_k * heads_kv * head_dim
    return float(elem_bytes * (q_and_o + k_and_v))


def varlen_seqlens(total: int, seed: int) -> list[int]:
    """Random lengths in VARLEN_LENGTHS summing to ``total`` (the last one cut to fit)."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(rng.randint(*VARLEN_LENGTHS))
    lengths[-1] -= sum(lengths) - total
    return lengths


# ----------------------------------------------------------------------------------------------
# Providers: each takes the inputs of one Rotation copy
# ----------------------------------------------------------------------------------------------

def _dense_providers(backends, causal):
    import ember.ops

    providers = {
        f"ember-{b}": (lambda q, k, v, b=b: ember.ops.flash_attn_func(q, k, v, causal=causal,
                                                                     backend=b))
        for b in backends
    }
    for name in ANCHORS:
        backend = name.removeprefix("sdpa-")
        providers[name] = lambda q, k, v, b=backend: anchors.sdpa(q, k, v, causal=causal,
                                                                  backend=b)
    return providers


def _varlen_providers(backends, causal):
    import ember.ops

    providers = {
        f"ember-{b}": (lambda q, k, v, cu, max_len, lengths, b=b: ember.ops.flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, causal=causal, backend=b))
        for b in backends
    }
    for name in ANCHORS:
        backend = name.removeprefix("sdpa-")
        providers[name] = (lambda q, k, v, cu, max_len, lengths, b=backend:
                           anchors.sdpa_varlen_loop(q, k, v, lengths, causal=causal, backend=b))
    return providers


def _checks(ctx, providers, inputs, label, flatten=None):
    """Compare each ember provider's output with the first anchor that runs, on one input copy
    (``flatten`` turns the anchor's output into the ember layout)."""
    ref_name = ref = None
    for name in ANCHORS:
        ref = ctx.guarded(f"{name} reference ({label})", lambda n=name: providers[n](*inputs))
        if ref is not None:
            ref_name = name
            break
    if ref is None:
        return {}
    if flatten is not None:
        ref = flatten(ref)
    extras = {}
    for name, fn in providers.items():
        if not name.startswith("ember-"):
            continue
        out = ctx.guarded(f"{name} ({label})", lambda f=fn: f(*inputs))
        if out is None:
            continue
        err = relative_error(out, ref)
        ok = err <= CHECK_TOLERANCE
        extras[name] = {"check": "ok" if ok else "MISMATCH", "rel_err": err}
        if not ok:
            ctx.note(f"{name} ({label}) differs from {ref_name}: relative error {err:.3g} > "
                     f"{CHECK_TOLERANCE}; its numbers are void")
    return extras


def _dense_case(ctx, backends, *, op, batch, seqlen, heads_q, heads_kv, head_dim, extra_params):
    def make():
        q = torch.randn(batch, seqlen, heads_q, head_dim, device=harness.DEVICE, dtype=DTYPE)
        k = torch.randn(batch, seqlen, heads_kv, head_dim, device=harness.DEVICE, dtype=DTYPE)
        v = torch.randn(batch, seqlen, heads_kv, head_dim, device=harness.DEVICE, dtype=DTYPE)
        return q, k, v

    rot = Rotation(make)
    for causal in (False, True):
        params = {**extra_params, "causal": causal}
        label = " ".join(f"{k}={v}" for k, v in params.items())
        providers = _dense_providers(backends, causal)
        extras = _checks(ctx, providers, rot.inputs[0], label)
        ctx.bench(op=op, params=params,
                  flops=attention_flops(batch, heads_q, seqlen, seqlen, head_dim, causal),
                  bytes=attention_bytes(batch, heads_q, heads_kv, seqlen, seqlen, head_dim,
                                        DTYPE.itemsize),
                  providers={n: rot.bind(fn) for n, fn in providers.items()},
                  anchors=ANCHORS, extras=extras)


def _varlen_case(ctx, backends):
    lengths = varlen_seqlens(TOTAL_TOKENS, VARLEN_SEED)
    heads = HIDDEN // VARLEN_HEAD_DIM
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=harness.DEVICE)

    def make():
        shape = (TOTAL_TOKENS, heads, VARLEN_HEAD_DIM)
        q, k, v = (torch.randn(shape, device=harness.DEVICE, dtype=DTYPE) for _ in range(3))
        return q, k, v, cu, max(lengths), lengths

    rot = Rotation(make)
    for causal in (False, True):
        params = {"head_dim": VARLEN_HEAD_DIM, "heads": heads, "num_seqs": len(lengths),
                  "max_seqlen": max(lengths), "total_tokens": TOTAL_TOKENS, "causal": causal}
        label = f"varlen causal={causal}"
        providers = _varlen_providers(backends, causal)
        extras = _checks(ctx, providers, rot.inputs[0], label,
                         flatten=lambda outs: torch.cat([o[0] for o in outs]))
        ctx.bench(op="attention_varlen", params=params,
                  flops=varlen_attention_flops(lengths, heads, VARLEN_HEAD_DIM, causal),
                  bytes=attention_bytes(1, heads, heads, TOTAL_TOKENS, TOTAL_TOKENS,
                                        VARLEN_HEAD_DIM, DTYPE.itemsize),
                  providers={n: rot.bind(fn) for n, fn in providers.items()},
                  anchors=ANCHORS, extras=extras)


def plot(rows, result, path):
    grid = [r for r in rows if r["op"] == "attention"]
    roof = (result.get("roofline") or {}).get("matmul_bf16_tflops")
    env = result.get("env", {})
    return report.plot_lines(
        path, grid, x="seqlen", metric="tflops",
        panel=lambda r: f"head dim {r['head_dim']} ({r['heads']} heads)",
        series=lambda r: r["provider"],
        style=lambda r: "causal" if r["causal"] else "non-causal",
        title=f"Attention forward, bf16, {TOTAL_TOKENS} tokens, hidden {HIDDEN} "
              f"({env.get('gpu', '')})",
        xlabel=f"sequence length (batch = {TOTAL_TOKENS} / seqlen)", ylabel="TFLOP/s",
        hline=(roof, "cuBLAS bf16 matmul") if roof else None)


@suite("attention", order=20, plot=plot, description=f"""
    Prefill attention forward, bf16. Grid (op `attention`): {TOTAL_TOKENS} tokens, hidden
    {HIDDEN}, head dim 64/128 with heads = {HIDDEN}/d, batch = {TOTAL_TOKENS}/seqlen;
    TFLOP/s = 4·batch·heads·seqlen²·d / time, halved for causal. `attention_gqa`:
    {GQA_HEADS_Q}:{GQA_HEADS_KV} heads, d={GQA_HEAD_DIM}, seqlen {GQA_SEQLEN} (SDPA gets
    enable_gqa=True). `attention_varlen`: random lengths in {VARLEN_LENGTHS} (seed
    {VARLEN_SEED}) summing to {TOTAL_TOKENS}, FLOPs summed per sequence; ember runs
    flash_attn_varlen_func once, the SDPA anchors run once per sequence (a loop, no padding).
    ember rows are checked against the SDPA output before timing (✗: mismatch).""")
def run(ctx):
    dense_backends, notes = ember_backends("flash_attn_func")
    varlen_backends, varlen_notes = ember_backends("flash_attn_varlen_func")
    for message in notes + varlen_notes:
        ctx.note(message)

    for head_dim in QUICK_HEAD_DIMS if ctx.quick else HEAD_DIMS:
        heads = HIDDEN // head_dim
        for seqlen in QUICK_SEQLENS if ctx.quick else SEQLENS:
            batch = TOTAL_TOKENS // seqlen
            _dense_case(ctx, dense_backends, op="attention", batch=batch, seqlen=seqlen,
                        heads_q=heads, heads_kv=heads, head_dim=head_dim,
                        extra_params={"head_dim": head_dim, "seqlen": seqlen, "batch": batch,
                                      "heads": heads})

    batch = TOTAL_TOKENS // GQA_SEQLEN
    _dense_case(ctx, dense_backends, op="attention_gqa", batch=batch, seqlen=GQA_SEQLEN,
                heads_q=GQA_HEADS_Q, heads_kv=GQA_HEADS_KV, head_dim=GQA_HEAD_DIM,
                extra_params={"head_dim": GQA_HEAD_DIM, "seqlen": GQA_SEQLEN, "batch": batch,
                              "heads_q": GQA_HEADS_Q, "heads_kv": GQA_HEADS_KV})
    _varlen_case(ctx, varlen_backends)
