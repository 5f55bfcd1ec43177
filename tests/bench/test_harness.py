"""The benchmark anchors and runner on a GPU.

Each anchor must compute what its docstring says, or the ratios against it mean nothing: it is
compared with ember's float32 reference on fresh random inputs. The runner is run end to end on
the short suites. Nothing here asserts a timing.
"""

import json
import math
import re

import pytest
import torch

from bench import anchors, harness
from ember.ops import reference

pytestmark = pytest.mark.cuda

# Relative L2 error of a bf16 result: rounding gives a few 1e-3, a wrong layout or scale O(1).
TOL = 1e-2
# What SDPA says when the backend it is restricted to cannot take the inputs.
_NO_KERNEL = re.compile("No available kernel|No viable backend")


def rel(out, ref):
    return harness.relative_error(out, ref)


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_q,heads_kv,head_dim", [(8, 8, 128), (32, 8, 128), (6, 2, 64)])
def test_sdpa_matches_reference(backend, causal, heads_q, heads_kv, head_dim):
    q = torch.randn(3, 257, heads_q, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 257, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(3, 257, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16)
    try:
        out = anchors.sdpa(q, k, v, causal=causal, backend=backend)
    except RuntimeError as exc:
        # torch's own limits (e.g. a cuDNN build without GQA) show as failed rows in the bench;
        # anything else is a bug of the anchor.
        if backend == "cudnn" and heads_q != heads_kv and _NO_KERNEL.search(str(exc)):
            pytest.skip(f"this torch's cuDNN SDPA refuses GQA: {exc}")
        raise
    assert out.shape == q.shape
    assert rel(out, reference.flash_attn_func(q, k, v, causal=causal)) < TOL


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_varlen_loop_matches_reference(backend, causal):
    # cuDNN refuses a key length of 1 ("No available kernel"); the flash backend takes it.
    lengths = [2 if backend == "cudnn" else 1, 17, 300, 128, 255]
    heads, head_dim = 4, 128
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                      dtype=torch.int32)
    outs = anchors.sdpa_varlen_loop(q, k, v, lengths, causal=causal, backend=backend)
    assert [o.shape[1] for o in outs] == lengths
    want = reference.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),
                                            causal=causal)
    assert rel(torch.cat([o[0] for o in outs]), want) < TOL


def test_cublas_matmul():
    a = torch.randn(129, 320, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(320, 257, device="cuda", dtype=torch.bfloat16)
    out = torch.full((129, 257), float("nan"), device="cuda", dtype=torch.bfloat16)
    anchors.cublas_matmul(a, b, out=out)
    assert rel(out, a.float() @ b.float()) < TOL


def test_grouped_mm_and_loop_match_reference():
    # Uneven groups as routing gives them, one of them empty.
    sizes = [5, 0, 37, 150, 64, 1, 99, 28]
    experts, n, k = len(sizes), 256, 512
    x = torch.randn(sum(sizes), k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    ends = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    want = reference.grouped_gemm(x, w, ends)
    assert rel(anchors.grouped_mm(x, w, ends), want) < TOL
    assert rel(anchors.grouped_mm_loop(x, w, sizes), want) < TOL


def test_fp8_scaled_mm_matches_reference():
    m, n, k = 64, 256, 512
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_fp8, w_scale = reference.quantize_fp8(torch.randn(n, k, device="cuda"))
    x_fp8, x_scale = reference.quantize_fp8(x)
    out = anchors.fp8_scaled_mm(x_fp8, x_scale, w_fp8, w_scale)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel(out, reference.fp8_gemm(x, w_fp8, w_scale)) < TOL


def test_int4_tinygemm_matches_dequantized_product():
    m, n, k, group = 7, 256, 512, 128
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes = torch.randint(0, 16, (n, k), device="cuda")
    scales = torch.rand(n, k // group, device="cuda") * 0.1 + 0.01
    zeros = torch.randn(n, k // group, device="cuda") * 0.1
    packed, scales_and_zeros = anchors.int4_tinygemm_pack(codes, scales, zeros)
    out = anchors.int4_tinygemm_mm(x, packed, scales_and_zeros, group)
    assert out.shape == (m, n)
    # The weight the docstring promises, from the bf16 scales and zeros the kernel reads.
    s, z = (scales_and_zeros[..., i].float().T[..., None] for i in (0, 1))
    w = ((codes.float().reshape(n, k // group, group) - 8) * s + z).reshape(n, k)
    assert rel(out, x.float() @ w.T) < TOL


def test_sparse24_matches_dense_product():
    m, n, k = 64, 128, 256
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = reference.prune_24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    out = anchors.sparse24_linear(x, anchors.sparse24_compress(w))
    assert out.shape == (m, n)
    assert rel(out, x.float() @ w.float().T) < TOL


def test_runner_end_to_end(tmp_path):
    assert harness.main(["store_kvcache", "--quick", "--out", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    # Suites of the committed results file are carried over; the two run here must be there.
    assert {"roofline", "store_kvcache"} <= set(data["suites"])
    assert data["gpu"] == torch.cuda.get_device_name()
    for name in ("copy_tbps", "matmul_bf16_tflops"):
        assert math.isfinite(data["roofline"][name]) and data["roofline"][name] > 0
    rows = data["suites"]["store_kvcache"]["rows"]
    assert rows and all("error" not in r for r in rows)
    for r in rows:
        if r["provider"] in ("ember-cuda", "ember-triton"):
            assert r["check"] == "exact", r
    assert json_path.with_suffix(".md").is_file()
