"""grouped_gemm and fused_moe kernels against the float64 reference, with flash-attn's
tolerance rule: the error may be at most twice that of the same computation done by torch in
the input dtype (for fused_moe with the routing shared, so both pick the same experts).
CPU: the Triton interpreter in fp16/fp32; GPU: the Triton kernels in fp16/bf16 (marked cuda)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_lowp_error, backends_to_test

import ember
from ember.ops import reference

# (tokens, hidden, intermediate, experts, top_k): one token; sizes off the 16/64 tiles;
# experts left without tokens (33 tokens over 8 experts at top-1 may skip some, 2 tokens
# over 8 experts surely do); top_k = experts.
SHAPES = [(1, 64, 32, 4, 2), (7, 96, 80, 8, 2), (33, 64, 48, 8, 1), (2, 128, 64, 8, 2),
          (17, 64, 40, 3, 3)]


def make_inputs(tokens, hidden, inter, experts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return (randn(tokens, hidden), randn(experts, 2 * inter, hidden, scale=hidden ** -0.5),
            randn(experts, hidden, inter, scale=inter ** -0.5),
            torch.randn(tokens, experts, generator=g).to(device))


def lowp_moe(hidden, w13, w2, router_logits, top_k):
    """The layer in the input dtype with torch ops (routing as the reference does it)."""
    weights, ids = reference.moe_route(router_logits, top_k)
    inter = w2.shape[2]
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        gate_up = hidden[token] @ w13[e].T
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out.index_add_(0, token, (act @ w2[e].T) * weights[token, slot, None].to(hidden.dtype))
    return out


def dtypes_for(device):
    return [torch.float16, torch.float32] if device == "cpu" else [torch.float16,
                                                                   torch.bfloat16]


@pytest.mark.parametrize("backend,device", backends_to_test(
    "fused_moe", cpu_backends=("triton",), gpu_backends=("triton",)))
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fused_moe_matches_reference(backend, device, shape, poisoned_outputs):
    tokens, hidden, inter, experts, top_k = shape
    for dtype in dtypes_for(device):
        h, w13, w2, logits = make_inputs(tokens, hidden, inter, experts, dtype, device,
                                         seed=tokens)
        out = ember.ops.fused_moe(h, w13, w2, logits, top_k, backend=backend)
        ref = reference.fused_moe(h.double(), w13.double(), w2.double(), logits.double(), top_k)
        assert out.dtype == dtype and out.shape == h.shape
        scale = ref.abs().max().item()
        assert_within_lowp_error(out, ref, lowp_moe(h, w13, w2, logits, top_k),
                                 atol=1e-5 * max(1.0, scale), name=f"fused_moe {dtype}")


@pytest.mark.parametrize("backend,device", backends_to_test(
    "fused_moe", cpu_backends=("triton",), gpu_backends=("triton",)))
def test_fused_moe_edge_cases(backend, device):
    h, w13, w2, logits = make_inputs(5, 64, 32, 4, torch.float16, device)
    # No tokens: an empty result.
    assert ember.ops.fused_moe(h[:0], w13, w2, logits[:0], 2, backend=backend).shape == (0, 64)
    # Every token routed to one expert (a logit far above the rest): one expert's GEMMs only.
    biased = logits.clone()
    biased[:, 2] += 100.0
    out = ember.ops.fused_moe(h, w13, w2, biased, 1, backend=backend)
    act = F.silu(h.double() @ w13[2, :32].double().T) * (h.double() @ w13[2, 32:].double().T)
    torch.testing.assert_close(out.double(), act @ w2[2].double().T, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend,device", backends_to_test(
    "grouped_gemm", cpu_backends=("triton",), gpu_backends=("triton",)))
@pytest.mark.parametrize("m,ends", [(1, [0, 1]), (257, [40, 40, 200]), (70, [0, 5, 69, 70])],
                         ids=["one-row", "empty-group-and-tail", "empty-first-group"])
def test_grouped_gemm_matches_reference(backend, device, m, ends, poisoned_outputs):
    k, n = 96, 130
    for dtype in dtypes_for(device):
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(len(ends), n, k, generator=g) / k ** 0.5).to(device=device, dtype=dtype)
        offsets = torch.tensor(ends, dtype=torch.int32, device=device)
        out = ember.ops.grouped_gemm(x, w, offsets, backend=backend)
        ref = reference.grouped_gemm(x.double(), w.double(), offsets)
        lowp = torch.zeros_like(ref, dtype=dtype)
        start = 0
        for e, end in enumerate(torch.tensor(ends).clamp(0, m).cummax(0).values.tolist()):
            lowp[start:end] = x[start:end] @ w[e].T
            start = end
        assert_within_lowp_error(out, ref, lowp, atol=1e-5, name=f"grouped_gemm {dtype}")
        assert torch.equal(out[start:], torch.zeros_like(out[start:]))  # past the last end


@pytest.mark.parametrize("backend,device", backends_to_test(
    "grouped_gemm", cpu_backends=("triton",), gpu_backends=("triton",)))
def test_grouped_gemm_reads_unchecked_offsets_like_the_reference(backend, device):
    """Inside a CUDA graph offsets are not validated: out-of-order or out-of-range ends are
    clipped and made non-decreasing, as every backend reads them, never read out of bounds."""
    from ember.ops import _registry

    kernel = _registry.implementation("grouped_gemm", backend)
    x = torch.randn(70, 64).to(device=device, dtype=torch.float16)
    w = (torch.randn(4, 48, 64) / 8).to(device=device, dtype=torch.float16)
    for ends in ([5, 0, 69, 90], [-3, 100, 2, 7]):
        offsets = torch.tensor(ends, dtype=torch.int32, device=device)
        torch.testing.assert_close(kernel(x, w, offsets).float(),
                                   reference.grouped_gemm(x, w, offsets).float(),
                                   rtol=2e-3, atol=2e-3)
