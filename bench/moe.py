"""moe: Mixtral's MoE layer (``fused_moe``) against the same layer built on torch's grouped GEMM.

Mixtral-8x7B's layer shape (hidden 4096, 8 experts of intermediate 14336, top-2), bf16, from a
decode step's few tokens to a prefill chunk. Every provider computes the whole layer from the
router logits (same routing: ``reference.moe_route``):

- ``ember-<b>``: ``ember.ops.fused_moe`` on backend b;
- ``torch-grouped-mm``: sort the (token, k) slots by expert, ``torch._grouped_mm`` (CUTLASS) for
  gate/up, silu * up, ``torch._grouped_mm`` for down, weighted ``index_add`` back to tokens;
- ``torch-loop``: the same with one cuBLAS GEMM pair per expert (host-side counts: a sync).

FLOPs = 6·T·k·H·I (two GEMMs over T·k slots); bytes = the weights of the experts that get at
least one slot (3·I·H each) plus the activations in and out. At a few tokens the layer reads
weights for a handful of rows: memory-bound, judged on TB/s; at thousands, compute-bound.
"""

import torch
import torch.nn.functional as F

from bench import anchors, harness
from bench.harness import ember_backends, relative_error, suite

OP = "fused_moe"
HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
TOKENS = (1, 8, 64, 512, 4096)
QUICK_TOKENS = (8, 512)
DTYPE = torch.bfloat16
ANCHORS = ("torch-grouped-mm", "torch-loop")
CHECK_TOLERANCE = 2e-2  # bf16 GEMMs of K = 4096 and 14336, rounded differently


def moe_flops(tokens: int) -> float:
    return 6.0 * tokens * TOP_K * HIDDEN * INTER


def moe_bytes(tokens: int, active_experts: int, elem: int = 2) -> float:
    return float(elem * (3 * active_experts * INTER * HIDDEN + 2 * tokens * HIDDEN))


def _inputs(tokens: int):
    dev = harness.DEVICE
    hidden = torch.randn(tokens, HIDDEN, device=dev, dtype=DTYPE)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=dev, dtype=DTYPE) * HIDDEN ** -0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device=dev, dtype=DTYPE) * INTER ** -0.5
    logits = torch.randn(tokens, EXPERTS, device=dev)
    return hidden, w13, w2, logits


def _sorted_slots(logits):
    """Routing weights, and the (token, k) slots sorted by expert with per-expert counts."""
    from ember.ops import reference

    weights, ids = reference.moe_route(logits, TOP_K)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=EXPERTS)
    return weights.reshape(-1)[order], order, order // TOP_K, counts


def torch_moe(hidden, w13, w2, logits, grouped: bool):
    """The MoE layer on torch's grouped GEMM (or a per-expert loop of GEMMs)."""
    weights, _, tokens, counts = _sorted_slots(logits)
    x = hidden[tokens]
    if grouped:
        ends = counts.cumsum(0).to(torch.int32)
        gate_up = anchors.grouped_mm(x, w13, ends)
    else:
        sizes = counts.tolist()
        gate_up = anchors.grouped_mm_loop(x, w13, sizes)
    act = F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]
    down = anchors.grouped_mm(act, w2, ends) if grouped else anchors.grouped_mm_loop(act, w2,
                                                                                     sizes)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, tokens, down.float() * weights[:, None])
    return out.to(hidden.dtype)


def _providers(backends):
    from ember.ops import _registry

    providers = {}
    for backend in backends:
        kernel = _registry.implementation(OP, backend)
        providers[f"ember-{backend}"] = (
            lambda h, w13, w2, logits, f=kernel: f(h, w13, w2, logits, TOP_K, True))
    providers["torch-grouped-mm"] = lambda h, w13, w2, logits: torch_moe(h, w13, w2, logits, True)
    providers["torch-loop"] = lambda h, w13, w2, logits: torch_moe(h, w13, w2, logits, False)
    return providers


@suite("moe", order=40, description=f"""
    Mixtral-8x7B MoE layer (hidden {HIDDEN}, {EXPERTS} experts of intermediate {INTER},
    top-{TOP_K}, bf16) from router logits to output: `ember-<b>` is `ember.ops.fused_moe`'s
    backend b (no input validation), `torch-grouped-mm` the same layer on `torch._grouped_mm`,
    `torch-loop` on one cuBLAS GEMM pair per expert. TFLOP/s = 6·T·k·H·I / time; TB/s counts
    the weights of the experts that got slots and the activations in and out. Each provider's
    output is compared with the float32 reference before timing (`check`: relative error).""")
def run(ctx):
    backends, notes = ember_backends(OP, wanted=("triton",))
    for message in notes:
        ctx.note(message)
    for tokens in QUICK_TOKENS if ctx.quick else TOKENS:
        _case(ctx, backends, tokens)
        torch.cuda.empty_cache()  # the 2.8 GB of expert weights go with the case


def _case(ctx, backends, tokens):
    from ember.ops import reference

    inputs = _inputs(tokens)
    hidden, w13, w2, logits = inputs
    want = reference.fused_moe(hidden, w13, w2, logits, TOP_K)
    routed = reference.moe_route(logits, TOP_K)[1].reshape(-1).long()
    active = int((torch.bincount(routed, minlength=EXPERTS) > 0).sum())
    providers = _providers(backends)
    extras = {}
    for name, fn in providers.items():
        err = ctx.guarded(f"{name} check ({tokens} tokens)",
                          lambda f=fn: relative_error(f(*inputs), want))
        if err is not None:
            extras[name] = {"check": err}
            if err > CHECK_TOLERANCE:
                ctx.note(f"{name} differs from the reference at {tokens} tokens "
                         f"(relative error {err:.2e}): its numbers are void")
    ctx.bench(op=OP, params={"tokens": tokens, "hidden": HIDDEN, "inter": INTER,
                             "experts": EXPERTS, "top_k": TOP_K, "active_experts": active},
              flops=moe_flops(tokens), bytes=moe_bytes(tokens, active),
              providers={name: (lambda f=fn: f(*inputs)) for name, fn in providers.items()},
              anchors=ANCHORS, extras=extras)
