"""The benchmark harness without a GPU: the CLI's no-GPU path, the FLOP/byte formulas against
hand-computed values, row arithmetic, input rotation, result merging, and every suite's plumbing
run on CPU at tiny sizes with a stand-in timer (no timing is asserted anywhere)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import anchors, attention, decode, harness, moe, quant, report, store_kvcache

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_no_gpu_exits_zero_with_message():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench", "attention", "--quick"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert harness.NO_GPU_MESSAGE in proc.stdout


def test_unknown_suite_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        harness.main(["no-such-suite"])
    assert exc.value.code == 2
    assert "unknown suite(s) no-such-suite" in capsys.readouterr().err


def test_suites_are_discovered_in_order():
    names = list(harness.discover_suites())
    assert names[0] == harness.ROOFLINE_SUITE
    assert names.index("store_kvcache") < names.index("attention")


def test_formulas_hand_computed():
    # 4 * 2 * 16 * 1024 * 1024 * 128
    assert attention.attention_flops(2, 16, 1024, 1024, 128, causal=False) == 17_179_869_184
    assert attention.attention_flops(2, 16, 1024, 1024, 128, causal=True) == 8_589_934_592
    # 4 * 32 * (100^2 + 300^2) * 64 / 2
    assert attention.varlen_attention_flops([100, 300], 32, 64, causal=True) == 409_600_000
    # bf16: q and o 2 * 4 * 512 * 32 * 128, k and v 2 * 4 * 512 * 8 * 128, times 2 bytes
    assert attention.attention_bytes(4, 32, 8, 512, 512, 128, 2) == 41_943_040
    # 2 * 32768 * 8 * 128 rows of (2 + 2) bytes, plus 8 bytes of slot per token
    assert store_kvcache.store_kvcache_bytes(32768, 8, 128, 2, 2) == 268_697_600
    # fp8 cache: (2 + 1) bytes per element, plus the two float32 scales
    assert store_kvcache.store_kvcache_bytes(32768, 8, 128, 2, 1, True) == 201_588_744
    assert harness.matmul_flops(8192, 8192, 8192) == 1_099_511_627_776
    assert harness.copy_bytes(1 << 30) == 2_147_483_648


def test_varlen_lengths_sum_to_total_and_repeat():
    lengths = attention.varlen_seqlens(16384, seed=0)
    assert sum(lengths) == 16384
    low, high = attention.VARLEN_LENGTHS
    assert all(low <= n <= high for n in lengths[:-1]) and 1 <= lengths[-1] <= high
    assert attention.varlen_seqlens(16384, seed=0) == lengths
    assert attention.varlen_seqlens(16384, seed=1) != lengths


def test_derive_metrics_hand_computed():
    roof = {"copy_tbps": 4.0, "matmul_bf16_tflops": 1000.0}
    # 1e12 FLOPs and 4e9 bytes in 2 ms: 500 TFLOP/s, 2 TB/s; both floors are 1 ms, so 50%.
    got = harness.derive_metrics(2.0, 1e12, 4e9, roof)
    assert got == pytest.approx({"ms": 2.0, "tflops": 500.0, "tbps": 2.0,
                                 "frac_of_roofline": 0.5})
    # Memory-bound: no FLOPs, the fraction is of copy bandwidth.
    got = harness.derive_metrics(1.0, 0, 3e9, roof)
    assert got["tflops"] is None
    assert got["frac_of_roofline"] == pytest.approx(0.75)
    assert harness.derive_metrics(1.0, 1e9, 0, None)["frac_of_roofline"] is None


def test_gpu_slug():
    assert harness.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _one_ms(fn, **_):
    """A timer that runs the provider once (so failures raise) and says it took 1 ms."""
    fn()
    return 1.0


def _fake_timer(times):
    """A timer that runs the provider once (so failures raise) and returns preset ms."""
    def timer(fn, **_):
        fn()
        return times[fn]
    return timer


def test_bench_rows_ratios_and_errors():
    def fast():
        return None

    def anchor():
        return None

    def broken():
        raise RuntimeError("no kernel for this shape\nmore detail")

    timer = _fake_timer({fast: 0.5, anchor: 2.0})
    ctx = harness.Context("demo", roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 700.0},
                          timer=timer)
    rows = ctx.bench(op="gemm", params={"m": 4}, flops=7e11, bytes=3e9,
                     providers={"ember-x": fast, "anchor": anchor, "ember-bad": broken},
                     anchors=("anchor",), extras={"ember-x": {"check": "ok"}})
    by = {r["provider"]: r for r in rows}
    assert by["ember-x"]["ratio_to_anchor"] == pytest.approx(4.0)
    assert by["ember-x"]["tflops"] == pytest.approx(1400.0)
    # floor = max(7e11 / 700e12, 3e9 / 3e12) = 1 ms; measured 0.5 ms
    assert by["ember-x"]["frac_of_roofline"] == pytest.approx(2.0)
    assert by["ember-x"]["check"] == "ok" and by["ember-x"]["m"] == 4
    assert "ratio_to_anchor" not in by["anchor"]
    assert by["ember-bad"]["error"] == "RuntimeError: no kernel for this shape"
    assert "ms" not in by["ember-bad"]
    assert any("ember-bad failed" in n for n in ctx.notes)
    assert ctx.rows == rows


def test_rotation_copies_and_cycles():
    made = []

    def make():
        made.append(torch.randn(250))  # 1000 bytes
        return (made[-1], "label")

    rot = harness.Rotation(make, min_bytes=3500)
    assert len(rot.inputs) == 4
    call = rot.bind(lambda t, label: t)
    seen = [call() for _ in range(8)]
    assert all(seen[i] is made[i % 4] for i in range(8))
    assert len(harness.Rotation(lambda: (1, 2), min_bytes=10**9).inputs) == 1


def _ctx_with_rows(name, value):
    ctx = harness.Context(name, roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 700.0},
                          timer=lambda fn, **_: value)
    ctx.bench(op="op1", params={"n": 1}, flops=1e9, bytes=1e6,
              providers={"ember-a": lambda: None, "anchor": lambda: None}, anchors=("anchor",))
    ctx.note(f"note of {name}")
    return ctx


def test_results_merge_per_suite(tmp_path):
    env = {"gpu": "Test GPU", "gpu_slug": "test-gpu-not-real", "torch": "x", "commit": "abc",
           "date": "2026-01-01"}
    suites = {}
    report.save_suite(tmp_path, env, suites, _ctx_with_rows("one", 1.0), "complete")
    report.save_suite(tmp_path, env, suites, _ctx_with_rows("two", 2.0), "interrupted")
    report.save_suite(tmp_path, env, suites, _ctx_with_rows("one", 4.0), "complete")
    data = json.loads((tmp_path / "test-gpu-not-real.json").read_text())
    assert set(data["suites"]) == {"one", "two"}
    assert data["suites"]["one"]["rows"][0]["ms"] == 4.0     # replaced by the later run
    assert data["suites"]["two"]["rows"][0]["ms"] == 2.0     # kept
    assert data["suites"]["two"]["status"] == "interrupted"
    assert data["gpu"] == "Test GPU" and data["roofline"]["copy_tbps"] == 3.0
    md = (tmp_path / "test-gpu-not-real.md").read_text()
    assert "## one" in md and "## two" in md and "interrupted" in md
    assert "| n | ember-a TFLOP/s | anchor TFLOP/s | ember-a / anchor |" in md
    assert "| 1 | 0.25 (0%) | 0.25 (0%) | 1.00× |" in md
    assert "- note of two" in md


@pytest.fixture
def tiny_suites(monkeypatch):
    """Shrink the suites to CPU-sized problems and run them on CPU tensors."""
    monkeypatch.setattr(harness, "DEVICE", "cpu")
    monkeypatch.setattr(harness, "l2_cache_bytes", lambda: 1 << 16)
    for name, value in dict(TOTAL_TOKENS=256, HIDDEN=128, HEAD_DIMS=(64,), SEQLENS=(64, 128),
                            GQA_HEADS_Q=4, GQA_HEADS_KV=2, GQA_HEAD_DIM=32, GQA_SEQLEN=64,
                            VARLEN_HEAD_DIM=64, VARLEN_LENGTHS=(16, 96)).items():
        monkeypatch.setattr(attention, name, value)
    monkeypatch.setattr(store_kvcache, "TOKENS", (5, 40))
    # The torch backends are the ones that run here; on a GPU the suites pick cuda and triton.
    for module in (attention, store_kvcache):
        monkeypatch.setattr(module, "ember_backends",
                            lambda op: harness.ember_backends(op, wanted=("torch",)))


def test_attention_suite_plumbing_on_cpu(tiny_suites, tmp_path):
    ctx = harness.Context("attention", roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 700.0},
                          timer=_one_ms)
    attention.run(ctx)
    ops = {r["op"] for r in ctx.rows}
    assert ops == {"attention", "attention_gqa", "attention_varlen"}
    grid = [r for r in ctx.rows if r["op"] == "attention" and r["provider"] == "sdpa-flash"]
    assert len(grid) == 4  # 2 seqlens x causal on/off
    for r in grid:
        want = attention.attention_flops(r["batch"], r["heads"], r["seqlen"], r["seqlen"],
                                         r["head_dim"], r["causal"]) / 1e9  # at 1 ms
        assert r["tflops"] == pytest.approx(want, rel=1e-4)
        assert r["batch"] * r["seqlen"] == 256
    # cuDNN cannot run on CPU: error rows and notes, never a crash.
    assert all("error" in r for r in ctx.rows if r["provider"] == "sdpa-cudnn")
    assert any("sdpa-cudnn failed" in n for n in ctx.notes)
    for r in ctx.rows:
        if r["provider"] == "ember-torch":   # present once flash_attn_func exists
            assert r["check"] == "ok", r
            assert r["ratio_to_sdpa-flash"] == pytest.approx(1.0)
    pytest.importorskip("matplotlib")
    env = {"gpu": "cpu", "gpu_slug": "test-cpu-not-real", "date": "now"}
    written = report.save_suite(tmp_path, env, {"attention": harness.SUITES["attention"]}, ctx,
                                "complete")
    assert tmp_path / "test-cpu-not-real_attention.png" in written
    assert "### attention_varlen" in (tmp_path / "test-cpu-not-real.md").read_text()


def test_store_kvcache_suite_plumbing_on_cpu(tiny_suites):
    ctx = harness.Context("store_kvcache", roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 1.0},
                          timer=_one_ms)
    store_kvcache.run(ctx)
    providers = {r["provider"] for r in ctx.rows}
    assert providers == {"ember-torch", "ember-torch-kernel", "torch-ref"}
    assert len(ctx.rows) == 3 * 2 * 2  # providers x token counts x cache dtypes
    for r in ctx.rows:
        fp8 = r["cache"] == "float8_e4m3fn"
        want = store_kvcache.store_kvcache_bytes(r["tokens"], 8, 128, 2, 1 if fp8 else 2, fp8)
        assert r["tbps"] == pytest.approx(want / 1e9, rel=1e-4)
        if r["provider"] == "ember-torch":
            assert r["check"] == "exact"


def run_on_cpu(module, monkeypatch, **sizes):
    """Run a GEMM suite (one with ``ember_backends(op, wanted)``) at ``sizes`` on the torch
    backend with the stand-in timer; returns its context."""
    for name, value in sizes.items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(module, "ember_backends",
                        lambda op, wanted: harness.ember_backends(op, wanted=("torch",)))
    ctx = harness.Context(module.__name__.rpartition(".")[2],
                          roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 700.0},
                          timer=_one_ms)
    module.run(ctx)
    return ctx


def test_moe_suite_plumbing_on_cpu(tiny_suites, monkeypatch):
    ctx = run_on_cpu(moe, monkeypatch, HIDDEN=32, INTER=48, TOKENS=(3, 20))
    rows = {(r["tokens"], r["provider"]): r for r in ctx.rows}
    assert {p for _, p in rows} == {"ember-torch", "torch-grouped-mm", "torch-loop"}
    for tokens in (3, 20):
        ember_row, loop = rows[tokens, "ember-torch"], rows[tokens, "torch-loop"]
        # 6 T k H I FLOPs; the weights of the experts that got slots, and activations in and out.
        assert ember_row["tflops"] == pytest.approx(6 * tokens * 2 * 32 * 48 / 1e9, rel=1e-4)
        active = ember_row["active_experts"]
        assert 1 <= active <= 8
        assert ember_row["tbps"] == pytest.approx(
            2 * (3 * active * 48 * 32 + 2 * tokens * 32) / 1e9, rel=1e-4)
        assert ember_row["check"] < 1e-6 and loop["check"] < moe.CHECK_TOLERANCE
    # torch._grouped_mm has no CPU kernel: error rows and notes, never a crash.
    assert all("error" in r for (_, p), r in rows.items() if p == "torch-grouped-mm") or all(
        r["check"] < moe.CHECK_TOLERANCE for (_, p), r in rows.items() if p == "torch-grouped-mm")


def test_quant_suite_plumbing_on_cpu(tiny_suites, monkeypatch):
    ctx = run_on_cpu(quant, monkeypatch, SHAPES=((64, 256),), ROWS=(1, 5))
    rows = {(r["m"], r["provider"]): r for r in ctx.rows}
    for m in (1, 5):
        for name, method in (("ember-torch-int8", "int8"), ("ember-torch-int4", "int4"),
                             ("cublas-bf16", "bf16")):
            r = rows[m, name]
            assert r["weights"] == method and r["check"] < quant.CHECK_TOLERANCE
            # int8: codes + float32 scale per row; int4: half-byte codes + scale and zero per
            # group of 128; bf16: 2 bytes a weight; plus x and the output in bf16.
            weight = {"int8": 64 * 256 + 4 * 64, "int4": 64 * 128 + 5 * 64 * 2,
                      "bf16": 2 * 64 * 256}[method]
            assert r["tbps"] == pytest.approx((weight + 2 * m * 256 + 2 * m * 64) / 1e9,
                                              rel=1e-4)
            assert r["tflops"] == pytest.approx(2 * m * 64 * 256 / 1e9, rel=1e-4)
    # tinygemm's packing has no CPU kernel: skipped with a note (or checked), never a crash.
    assert ((1, "torch-tinygemm-int4") not in rows and any("tinygemm" in n for n in ctx.notes)
            or rows[1, "torch-tinygemm-int4"]["check"] < quant.CHECK_TOLERANCE)


def test_unreadable_results_are_set_aside(tmp_path):
    (tmp_path / "test-gpu-not-real.json").write_text('{"schema": 1, "suites": {')  # cut short
    env = {"gpu": "Test GPU", "gpu_slug": "test-gpu-not-real"}
    report.save_suite(tmp_path, env, {}, _ctx_with_rows("one", 1.0), "complete")
    data = json.loads((tmp_path / "test-gpu-not-real.json").read_text())
    assert set(data["suites"]) == {"one"}
    assert (tmp_path / "test-gpu-not-real.json.unreadable").read_text().endswith("{")


def test_decode_formulas_hand_computed():
    # bf16, 1 x 128k keys, 8 KV heads x 128: K and V 2 * 131072 * 8 * 128 * 2 bytes = 512 MiB,
    # plus q and out 2 * 32 * 128 * 2
    assert decode.decode_bytes(1, 1, 131072, 32, 8, 128, 2) == 536_887_296
    # fp8 cache: K and V at 1 byte per element, q and out still bf16
    assert decode.decode_bytes(1, 1, 131072, 32, 8, 128, 1) == 268_451_840
    # append, 7 sequences of 16 queries: 2 * 7 * 4096 * 3 * 64 * 2 + 2 * 7 * 16 * 9 * 64 * 2
    assert decode.decode_bytes(7, 16, 4096, 9, 3, 64, 2) == 22_278_144
    # 4 * 32 * 512 * 65536 * 128, causal triangle not subtracted
    assert decode.append_flops(32, 512, 65536, 128) == 549_755_813_888


@pytest.fixture
def tiny_decode(tiny_suites, monkeypatch):
    """The decode suite at CPU sizes: an awkward cache length (33: a partial last page), batch
    1 and 3, GQA 4:2 and 3:1."""
    for name, value in dict(GRID=((1, 40), (3, 33)), HEADS=((4, 2), (3, 1)), HEAD_DIMS=(32,),
                            APPEND_HEADS_Q=4, APPEND_HEADS_KV=2, APPEND_HEAD_DIM=32,
                            APPEND_SEQLENS_Q=(5,), APPEND_CACHE_LENS=(21, 40)).items():
        monkeypatch.setattr(decode, name, value)
    monkeypatch.setattr(decode, "ember_backends",
                        lambda op: harness.ember_backends(op, wanted=("torch",)))


def test_decode_suite_plumbing_on_cpu(tiny_decode, tmp_path):
    # A different time for every timing, so each cross ratio must pair the right rows.
    ticks = iter(range(1, 10**6))

    def timer(fn, **_):
        fn()
        return float(next(ticks))

    ctx = harness.Context("decode", roofline={"copy_tbps": 3.0, "matmul_bf16_tflops": 700.0},
                          timer=timer)
    decode.run(ctx)
    by_op = {op: [r for r in ctx.rows if r["op"] == op]
             for op in ("decode", "decode_fp8", "decode_append")}
    assert sum(map(len, by_op.values())) == len(ctx.rows)
    # per (heads, grid point): contiguous 2 ember + 2 anchors, paged 2; fp8 kernel rows only
    assert len(by_op["decode"]) == 4 * 6 and len(by_op["decode_fp8"]) == 4 * 2
    assert {r["provider"] for r in by_op["decode_fp8"]} == {"ember-torch-kernel"}
    assert len(by_op["decode_append"]) == 2 * 4  # cache lengths x providers
    # Kernel rows and anchors are graph-timed; the public rows (host syncs) per call.
    for r in ctx.rows:
        public = r["provider"].startswith("ember-") and not r["provider"].endswith("-kernel")
        assert r["timing"] == ("events" if public else "graph"), r

    def timed(op, provider, row, layout):
        keys = ("heads_q", "heads_kv", "head_dim", "batch", "cache_len")
        [match] = [r for r in by_op[op] if r["provider"] == provider and r["layout"] == layout
                   and all(r[k] == row[k] for k in keys)]
        return match["ms"]

    for r in by_op["decode"] + by_op["decode_fp8"]:
        if r["provider"] == "sdpa-cudnn":   # cuDNN cannot run on CPU: an error row, no crash
            assert "error" in r
            continue
        assert r["check"] == "ok", r
        fp8 = r["op"] == "decode_fp8"
        want = decode.decode_bytes(r["batch"], 1, r["cache_len"], r["heads_q"], r["heads_kv"],
                                   r["head_dim"], 1 if fp8 else 2)
        assert r["tbps"] == pytest.approx(want / r["ms"] / 1e9, rel=1e-4)
        if r["provider"].startswith("sdpa-"):
            continue
        flash = timed("decode", "sdpa-flash", r, "contiguous")
        assert r["ratio_to_sdpa-flash"] == pytest.approx(flash / r["ms"], rel=1e-4)
        if r["layout"] != "contiguous":
            same = timed(r["op"], r["provider"], r, "contiguous")
            assert r["ratio_to_contiguous"] == pytest.approx(same / r["ms"], rel=1e-4)
        else:
            assert "ratio_to_contiguous" not in r
        if fp8:
            bf16 = timed("decode", r["provider"], r, r["layout"])
            assert r["ratio_to_bf16"] == pytest.approx(bf16 / r["ms"], rel=1e-4)
    for r in by_op["decode_append"]:
        if r["provider"] in decode.APPEND_ANCHORS:   # neither runs on CPU
            assert "error" in r
            continue
        assert r["check"] == "ok", r
        want = decode.append_flops(4, 5, r["cache_len"], 32)
        assert r["tflops"] == pytest.approx(want / r["ms"] / 1e9, rel=1e-4)
    assert any("sdpa-cudnn with enable_gqa=True failed" in n for n in ctx.notes)

    pytest.importorskip("matplotlib")
    env = {"gpu": "cpu", "gpu_slug": "test-cpu-not-real", "date": "now"}
    written = report.save_suite(tmp_path, env, {"decode": harness.SUITES["decode"]}, ctx,
                                "complete")
    assert tmp_path / "test-cpu-not-real_decode.png" in written
    md = (tmp_path / "test-cpu-not-real.md").read_text()
    assert "### decode_fp8" in md and "ember-torch-kernel / bf16" in md


def test_sdpa_masked_anchor_layout_and_mask():
    # On CPU only SDPA's flash kernel takes a mask; it checks the anchor's layout, GQA and
    # bottom-right mask handling (cuDNN and memory-efficient run in the bench on a GPU).
    from ember.ops import reference

    q = torch.randn(2, 7, 6, 32)
    k, v = (torch.randn(2, 19, 2, 32) for _ in range(2))
    mask = reference.attention_mask(7, 19, causal=True)
    out = anchors.sdpa_masked(q, k, v, mask, backend="flash")
    assert out.shape == q.shape
    want = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=True)
    assert harness.relative_error(out, want) < 1e-5
