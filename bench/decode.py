"""decode: attention over a KV cache (``flash_attn_with_kvcache``) against torch SDPA.

Decode (one query token per sequence) is memory-bound: its ceiling is the copy bandwidth, and the
rows report TB/s of the K/V bytes a call must read. The grid is issue 4's: GQA 32:8 and 9:3,
head dim 128 and 64, (batch, cache length) from a single long sequence to a large batch of short
ones, over contiguous and paged (block 16, shuffled) caches, in bf16 and fp8. Append rows (a
chunk of 16..512 queries over a long cache: prefix caching, chunked prefill) report TFLOP/s too.
"""

import math

import torch

from bench import anchors, harness
from bench.attention import CHECK_TOLERANCE, attention_flops
from bench.harness import Rotation, ember_backends, relative_error, suite

OP = "flash_attn_with_kvcache"
DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
HEADS = ((32, 8), (9, 3))     # (heads_q, heads_kv): Llama-3-8B / Llama-3.2-1B; SmolLM2-135M
HEAD_DIMS = (128, 64)
GRID = ((1, 4096), (1, 32768), (1, 131072), (8, 8192), (32, 4096), (64, 2048), (128, 1024),
        (16, 32768))          # (batch, cache length)
QUICK_HEADS, QUICK_HEAD_DIMS = ((32, 8),), (128,)
QUICK_GRID = ((1, 32768), (32, 4096), (16, 32768))
BLOCK_SIZE = 16               # vLLM's default page, the smallest the kernels take
CONTIGUOUS, PAGED = "contiguous", f"paged-{BLOCK_SIZE}"
LAYOUTS = (CONTIGUOUS, PAGED)
DECODE_ANCHORS = ("sdpa-cudnn", "sdpa-flash")

APPEND_HEADS_Q, APPEND_HEADS_KV, APPEND_HEAD_DIM = 32, 8, 128
APPEND_SEQLENS_Q = (16, 128, 512)
APPEND_CACHE_LENS = (4096, 16384, 65536)
QUICK_APPEND_SEQLENS_Q, QUICK_APPEND_CACHE_LENS = (128,), (16384,)
# The flash backend takes no explicit mask; these two do.
APPEND_ANCHORS = ("sdpa-cudnn", "sdpa-efficient")

# About 500 timings per run: shorter timing than the harness default keeps the suite near 90 s
# on an H100, and even the 128k-key calls (~0.2 ms) still get over 100 timed repetitions.
WARMUP_MS, REP_MS = 10, 30
# Series of the plot: the kernel rows (what the bars are judged on) and the two anchors.
PLOTTED = ("ember-cuda-kernel", "ember-triton-kernel", "sdpa-cudnn", "sdpa-flash")


def decode_bytes(batch: int, seqlen_q: int, cache_len: int, heads_q: int, heads_kv: int,
                 head_dim: int, cache_bytes: int, q_bytes: int = 2) -> float:
    """Fewest bytes one call moves: read K and V of ``cache_len`` keys per sequence and KV head
    at ``cache_bytes`` per element (2 for bf16, 1 for fp8), read q and write out at ``q_bytes``.
    Not counted: a paged cache's block table (4 bytes per 16 keys, under 0.01% of K+V) and the
    fp8 scales, so paged and contiguous rows of a shape share one byte count."""
    k_and_v = 2 * batch * cache_len * heads_kv * head_dim * cache_bytes
    q_and_out = 2 * batch * seqlen_q * heads_q * head_dim * q_bytes
    return float(k_and_v + q_and_out)


def append_flops(heads_q: int, seqlen_q: int, cache_len: int, head_dim: int) -> float:
    """4·hq·sq·L·d for one sequence: Q·Kᵀ and P·V over every (query, key) pair. The causal mask
    hides sq(sq-1)/2 of the sq·L pairs, a fraction under sq / 2L (6% at 512 over 4k): not
    subtracted, so the rate is slightly flattering at the shortest cache."""
    return attention_flops(1, heads_q, seqlen_q, cache_len, head_dim, causal=False)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def _cache_inputs(batch, seqlen_q, cache_len, heads_q, heads_kv, head_dim, *, paged,
                  cache_dtype):
    """One call's arguments, fresh random data: ``(q, k_cache, v_cache, cache_seqlens,
    block_table, k_scale, v_scale)``; every sequence holds ``cache_len`` keys (the last
    ``seqlen_q`` of them the queries' own)."""
    dev = harness.DEVICE
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=dev, dtype=DTYPE)
    block_table = None
    if paged:
        per_seq = math.ceil(cache_len / BLOCK_SIZE)
        # A random permutation of the pool, as in an engine that has run a while: consecutive
        # blocks of a sequence lie anywhere in memory.
        block_table = (torch.randperm(batch * per_seq, device=dev).to(torch.int32)
                       .view(batch, per_seq))
        shape = (batch * per_seq, BLOCK_SIZE, heads_kv, head_dim)
    else:
        shape = (batch, cache_len, heads_kv, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=dev, dtype=DTYPE).to(cache_dtype)
                        for _ in range(2))
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_scale, v_scale = (torch.rand(1, device=dev) * 0.5 + 0.5 for _ in range(2))
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=dev)
    return q, k_cache, v_cache, seqlens, block_table, k_scale, v_scale


def _sdpa_inputs(batch, seqlen_q, cache_len, heads_q, heads_kv, head_dim, *, repeat, mask):
    """``(q, k, v, mask)`` in SDPA's own layout, contiguous: q ``[b, hq, sq, d]``, k/v
    ``[b, hkv, L, d]``, or ``[b, hq, L, d]`` repeat_interleave'd when ``repeat`` (for a backend
    that refuses GQA)."""
    dev = harness.DEVICE
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, device=dev, dtype=DTYPE)
    k, v = (torch.randn(batch, heads_kv, cache_len, head_dim, device=dev, dtype=DTYPE)
            for _ in range(2))
    if repeat:
        k, v = (t.repeat_interleave(heads_q // heads_kv, dim=1) for t in (k, v))
    return q, k, v, mask


def _reference(q, k_cache, v_cache, seqlens, block_table, k_scale, v_scale):
    from ember.ops import reference

    return reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table, causal=True,
        k_scale=k_scale, v_scale=v_scale)


def _sdpa_reference(q, k, v, mask):
    """The reference on SDPA-layout inputs (seen as flash-attn's through transposed views);
    the anchors' masks are bottom-right causal, and one decode query sees every key anyway."""
    from ember.ops import reference

    return reference.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), causal=True)


# ----------------------------------------------------------------------------------------------
# Providers: ember ones take the ``_cache_inputs`` tuple, anchors the ``_sdpa_inputs`` one
# ----------------------------------------------------------------------------------------------

def _ember_providers(backends, head_dim, *, public, num_splits=0):
    import ember.ops
    from ember.ops import _registry
    from ember.ops.attention import _check_options

    # The backend gets the arguments the public function would hand it, resolved the same way.
    scale, causal, left, right = _check_options(OP, None, True, (-1, -1), head_dim)
    providers = {}
    for backend in backends:
        if public:
            providers[f"ember-{backend}"] = (
                lambda q, kc, vc, lens, table, ks, vs, b=backend: ember.ops.flash_attn_with_kvcache(
                    q, kc, vc, cache_seqlens=lens, block_table=table, causal=True, k_scale=ks,
                    v_scale=vs, backend=b))
        # The kernel alone, without the public function's validation (which reads
        # cache_seqlens and the block table back to the host): what the bars are judged on.
        # Every sequence holds the full cache, so the length bound is the capacity.
        kernel = _registry.implementation(OP, backend)
        providers[f"ember-{backend}-kernel"] = (
            lambda q, kc, vc, lens, table, ks, vs, f=kernel:
            f(q, kc, vc, lens, table, scale, causal, left, right, num_splits,
              kc.shape[1] * (1 if table is None else table.shape[1]), None, ks, vs))
    return providers


def _sdpa_provider(name):
    backend = name.removeprefix("sdpa-")

    def run(q, k, v, mask):
        # The anchors take flash-attn's layout and transpose back: SDPA sees contiguous tensors.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            return anchors.sdpa(q, k, v, backend=backend)
        return anchors.sdpa_masked(q, k, v, mask, backend=backend)
    return run


# ----------------------------------------------------------------------------------------------
# Checks: every output against ember's float32 torch reference, on the first input copy
# ----------------------------------------------------------------------------------------------

def _check(ctx, name, label, out, ref) -> dict:
    if isinstance(out, tuple):   # the kernel backends return (out, lse)
        out = out[0]
    err = relative_error(out, ref)
    ok = err <= CHECK_TOLERANCE
    if not ok:
        ctx.note(f"{name} ({label}) differs from the reference: relative error {err:.3g} > "
                 f"{CHECK_TOLERANCE}; its numbers are void")
    return {"check": "ok" if ok else "MISMATCH", "rel_err": err}


def _check_ember(ctx, providers, inputs, label) -> dict:
    ref = ctx.guarded(f"reference ({label})", lambda: _reference(*inputs))
    if ref is None:
        return {}
    extras = {}
    for name, fn in providers.items():
        out = ctx.guarded(f"{name} ({label})", lambda f=fn: f(*inputs))
        if out is not None:
            extras[name] = _check(ctx, name, label, out, ref)
    return extras


def _anchor_providers(ctx, names, make, *, gqa, label, fallbacks):
    """Anchors bound to their own input copies, and their check extras.

    ``make(repeat)`` builds SDPA inputs. Each backend first gets ``enable_gqa=True``; one that
    refuses it (when ``gqa``) is run on repeat_interleave'd K/V instead, and ``fallbacks``
    (anchor -> cases) records where. A backend that refuses both keeps its failing callable so
    that the timing records an error row.
    """
    rotations = {}

    def rotation(repeat):
        if repeat not in rotations:
            rotations[repeat] = Rotation(lambda: make(repeat))
        return rotations[repeat]

    bound, extras = {}, {}
    for name in names:
        fn = _sdpa_provider(name)
        rot = rotation(False)
        # No case in the message: one note per backend and error, however many cases.
        out = ctx.guarded(f"{name} with enable_gqa=True" if gqa else name,
                          lambda f=fn, r=rot: f(*r.inputs[0]))
        if out is None and gqa:
            rot = rotation(True)
            out = ctx.guarded(f"{name} on repeat_interleave'd K/V",
                              lambda f=fn, r=rot: f(*r.inputs[0]))
            if out is not None:
                fallbacks.setdefault(name, []).append(label)
        bound[name] = rot.bind(fn)
        if out is not None:
            ref = ctx.guarded(f"reference ({label})", lambda r=rot: _sdpa_reference(*r.inputs[0]))
            if ref is not None:
                extras[name] = _check(ctx, name, label, out, ref)
    return bound, extras


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def _add_ratio(rows, name, base_ms) -> None:
    """Add ``ratio_to_<name>`` = base time / row time to the timed rows: ``base_ms`` is one time
    for every row (an anchor's) or a provider -> time map (the same provider elsewhere)."""
    for row in rows:
        base = base_ms if isinstance(base_ms, float) else base_ms.get(row["provider"])
        if base and row.get("ms"):
            row[f"ratio_to_{name}"] = float(f"{base / row['ms']:.5g}")


def _timed(rows) -> dict[str, float]:
    return {r["provider"]: r["ms"] for r in rows if r.get("ms")}


def _decode_case(ctx, backends, fallbacks, shape, layout, cache_dtype):
    """Time one (shape, layout, cache dtype); returns its rows. Only the contiguous bf16 case
    runs the anchors (SDPA has no paged or fp8 cache)."""
    heads_q, heads_kv, head_dim = shape["heads_q"], shape["heads_kv"], shape["head_dim"]
    batch, cache_len = shape["batch"], shape["cache_len"]
    fp8 = cache_dtype == FP8
    with_anchors = layout == CONTIGUOUS and not fp8
    label = (f"{heads_q}:{heads_kv} d={head_dim} {batch}x{cache_len} {layout} "
             f"{str(cache_dtype).removeprefix('torch.')}")

    rot = Rotation(lambda: _cache_inputs(batch, 1, cache_len, heads_q, heads_kv, head_dim,
                                         paged=layout != CONTIGUOUS, cache_dtype=cache_dtype))
    # fp8 rows time the kernels alone: the public function's host-side cost is the bf16 rows'.
    providers = _ember_providers(backends, head_dim, public=not fp8)
    extras = _check_ember(ctx, providers, rot.inputs[0], label)
    bound = {name: rot.bind(fn) for name, fn in providers.items()}
    if with_anchors:
        anchor_bound, anchor_extras = _anchor_providers(
            ctx, DECODE_ANCHORS, lambda repeat: _sdpa_inputs(
                batch, 1, cache_len, heads_q, heads_kv, head_dim, repeat=repeat, mask=None),
            gqa=heads_q != heads_kv, label=label, fallbacks=fallbacks)
        bound.update(anchor_bound)
        extras.update(anchor_extras)
    return ctx.bench(op="decode_fp8" if fp8 else "decode", params={**shape, "layout": layout},
                     flops=0,
                     bytes=decode_bytes(batch, 1, cache_len, heads_q, heads_kv, head_dim,
                                        cache_dtype.itemsize, DTYPE.itemsize),
                     providers=bound, anchors=DECODE_ANCHORS if with_anchors else (),
                     extras=extras, graph_timed=graph_timed(bound))


def graph_timed(providers) -> list[str]:
    """The providers timed by CUDA-graph replay: the kernel rows and the SDPA anchors, whose
    calls never sync with the host. The public ``ember-<b>`` rows read cache_seqlens back for
    validation, which cannot be captured: they keep per-call event timing, host cost included."""
    return [name for name in providers if name.endswith("-kernel") or name.startswith("sdpa-")]


def _decode_point(ctx, backends, fallbacks, shape):
    """Every layout and cache dtype of one grid point, with the cross ratios: paged and fp8 rows
    get the anchors' ratios from the contiguous bf16 case, paged rows the ratio to the same
    provider on a contiguous cache, fp8 rows the ratio to the same provider on bf16."""
    times = {}
    for cache_dtype in (DTYPE, FP8):
        for layout in LAYOUTS:
            rows = _decode_case(ctx, backends, fallbacks, shape, layout, cache_dtype)
            times[layout, cache_dtype] = _timed(rows)
            if (layout, cache_dtype) != (CONTIGUOUS, DTYPE):
                for anchor in DECODE_ANCHORS:
                    if anchor in times[CONTIGUOUS, DTYPE]:
                        _add_ratio(rows, anchor, times[CONTIGUOUS, DTYPE][anchor])
            if cache_dtype == FP8:
                _add_ratio(rows, "bf16", times[layout, DTYPE])
            if layout != CONTIGUOUS:
                _add_ratio(rows, "contiguous", times[CONTIGUOUS, cache_dtype])


def _append_case(ctx, backends, fallbacks, seqlen_q, cache_len):
    from ember.ops import reference

    heads_q, heads_kv, head_dim = APPEND_HEADS_Q, APPEND_HEADS_KV, APPEND_HEAD_DIM
    label = f"append sq={seqlen_q} L={cache_len}"
    rot = Rotation(lambda: _cache_inputs(1, seqlen_q, cache_len, heads_q, heads_kv, head_dim,
                                         paged=False, cache_dtype=DTYPE))
    providers = _ember_providers(backends, head_dim, public=True)
    extras = _check_ember(ctx, providers, rot.inputs[0], label)
    bound = {name: rot.bind(fn) for name, fn in providers.items()}
    # flash-attn's causal mask, aligned bottom-right, written out for SDPA.
    mask = reference.attention_mask(seqlen_q, cache_len, causal=True, device=harness.DEVICE)
    anchor_bound, anchor_extras = _anchor_providers(
        ctx, APPEND_ANCHORS, lambda repeat: _sdpa_inputs(
            1, seqlen_q, cache_len, heads_q, heads_kv, head_dim, repeat=repeat, mask=mask),
        gqa=heads_q != heads_kv, label=label, fallbacks=fallbacks)
    bound.update(anchor_bound)
    extras.update(anchor_extras)
    ctx.bench(op="decode_append",
              params={"heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim, "batch": 1,
                      "seqlen_q": seqlen_q, "cache_len": cache_len, "causal": True},
              flops=append_flops(heads_q, seqlen_q, cache_len, head_dim),
              bytes=decode_bytes(1, seqlen_q, cache_len, heads_q, heads_kv, head_dim,
                                 DTYPE.itemsize, DTYPE.itemsize),
              providers=bound, anchors=APPEND_ANCHORS, extras=extras,
              graph_timed=graph_timed(bound))


# ----------------------------------------------------------------------------------------------
# Plot and suite
# ----------------------------------------------------------------------------------------------

def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _braces(items) -> str:
    return "{" + ", ".join(map(str, items)) + "}"


def plot(rows, result, path):
    """TB/s per grid point, one panel per (heads, head dim); kernel rows on both layouts
    (contiguous solid, paged dashed) and the anchors, under the copy bandwidth."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == "decode" and r["provider"] in PLOTTED
            and r.get("tbps") is not None]
    if not rows:
        return False
    panels = list(dict.fromkeys((r["heads_q"], r["heads_kv"], r["head_dim"]) for r in rows))
    points = list(dict.fromkeys((r["batch"], r["cache_len"]) for r in rows))
    copy_tbps = (result.get("roofline") or {}).get("copy_tbps")
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.2 * ncols, 4.6 * nrows), squeeze=False)
    for ax, (heads_q, heads_kv, head_dim) in zip(list(axes.flat)[:len(panels)], panels,
                                                 strict=True):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in rows:
            if (r["heads_q"], r["heads_kv"], r["head_dim"]) == (heads_q, heads_kv, head_dim):
                lines.setdefault((r["provider"], r["layout"]), []).append(
                    (points.index((r["batch"], r["cache_len"])), r["tbps"]))
        for (provider, layout), pts in lines.items():
            pts.sort()
            contiguous = layout == CONTIGUOUS
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{PLOTTED.index(provider)}",
                    marker="o" if contiguous else "s", linestyle="-" if contiguous else "--",
                    label=f"{provider}, {layout}")
        if copy_tbps:
            ax.axhline(copy_tbps, color="grey", linestyle=":", linewidth=1, label="copy bandwidth")
        ax.set_xticks(range(len(points)), [f"{b}×{_tokens(n)}" for b, n in points])
        ax.set_ylim(bottom=0)
        ax.set_title(f"GQA {heads_q}:{heads_kv}, head dim {head_dim}")
        ax.set_xlabel("batch × cache length")
        ax.set_ylabel("TB/s (K+V read, q and out)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    gpu = result.get("env", {}).get("gpu", "")
    fig.suptitle(f"Decode attention (seqlen_q = 1), bf16 cache ({gpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@suite("decode", order=30, plot=plot, description=f"""
    Attention over a KV cache (`flash_attn_with_kvcache`, bf16 queries, causal, `num_splits=0`:
    the kernels choose the split). `decode`: seqlen_q = 1; GQA
    {_braces(f'{hq}:{hkv}' for hq, hkv in HEADS)} × head dim {_braces(HEAD_DIMS)};
    (batch, cache length) in {_braces(f'{b}×{_tokens(n)}' for b, n in GRID)},
    every sequence holding the full length; caches contiguous `[batch, len, hkv, d]` or paged
    (block {BLOCK_SIZE}, block table a random permutation of the pool). TB/s = (K+V read,
    2·b·L·hkv·d·bytes per cache element, + q and out, 2·b·hq·d·2) / time; the paged block table
    (4 B per {BLOCK_SIZE} keys) is not counted; the fraction is of the copy bandwidth.
    `ember-<b>` is the public `ember.ops.flash_attn_with_kvcache` (host-side validation reads
    cache_seqlens and the block table back), `ember-<b>-kernel` the backend alone: the bars are
    judged on the kernel rows. Anchors on a contiguous bf16 cache in SDPA's layout (q
    `[b, hq, 1, d]`, k/v `[b, hkv, L, d]`) with enable_gqa=True; a backend that refuses GQA runs
    on K/V repeat_interleave'd to hq heads (a note says where; its TB/s still counts hkv heads,
    so ratios stay ratios of times). Paged and fp8 rows carry the anchor ratios of the
    contiguous bf16 case of their shape; `/ contiguous`: the same provider's time on the
    contiguous cache over its paged time. `decode_fp8`: float8_e4m3fn caches with scales,
    1 B/element, kernel rows only; `/ bf16`: the same provider's time on the bf16 cache (same
    shape, layout) over its fp8 time, the fp8 speed-up. `decode_append`: batch 1,
    {APPEND_HEADS_Q}:{APPEND_HEADS_KV}, d={APPEND_HEAD_DIM}, seqlen_q in
    {_braces(APPEND_SEQLENS_Q)} over caches of {_braces(map(_tokens, APPEND_CACHE_LENS))} keys
    (the queries' own keys the last seqlen_q), causal; TFLOP/s = 4·hq·sq·L·d / time (the
    causal mask hides under sq/2L of the pairs, 6% at 512 over 4k: not subtracted), TB/s as
    above in the JSON; anchors SDPA cuDNN and memory-efficient with an explicit bool mask
    (bottom-right causal), GQA as above. Every ember and anchor output is checked against
    ember's float32 torch reference before timing (✗: mismatch). Timing (each row's `timing` in
    the JSON): the kernel rows and the SDPA anchors by CUDA-graph replay of back-to-back calls
    (`triton.testing.do_bench_cudagraph`, median, {REP_MS} ms; inputs rotate through copies that
    together exceed twice the L2 cache), what a model's decode graph sees, without host launch
    cost; ember's kernels are launched with programmatic dependent launch, so a call's launch
    overlaps the previous call's tail. The public `ember-<b>` rows sync with the host and are
    timed per call with CUDA events after an L2 flush ({WARMUP_MS} ms warm-up, {REP_MS} ms).""")
def run(ctx):
    backends, notes = ember_backends(OP)
    for message in notes:
        ctx.note(message)
    ctx.warmup_ms, ctx.rep_ms = min(ctx.warmup_ms, WARMUP_MS), min(ctx.rep_ms, REP_MS)
    fallbacks: dict[str, list[str]] = {}

    for heads_q, heads_kv in QUICK_HEADS if ctx.quick else HEADS:
        for head_dim in QUICK_HEAD_DIMS if ctx.quick else HEAD_DIMS:
            for batch, cache_len in QUICK_GRID if ctx.quick else GRID:
                _decode_point(ctx, backends, fallbacks,
                              {"heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim,
                               "batch": batch, "cache_len": cache_len})
    for seqlen_q in QUICK_APPEND_SEQLENS_Q if ctx.quick else APPEND_SEQLENS_Q:
        for cache_len in QUICK_APPEND_CACHE_LENS if ctx.quick else APPEND_CACHE_LENS:
            _append_case(ctx, backends, fallbacks, seqlen_q, cache_len)

    for name, cases in fallbacks.items():
        ctx.note(f"{name} refused enable_gqa and ran on repeat_interleave'd K/V (group× the K/V "
                 f"bytes) in {len(cases)} case(s): {'; '.join(cases)}")
