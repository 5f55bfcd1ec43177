"""The NKI simulator: its semantics (rounding, memory, PSUM accumulation, DMA, engines' state,
logical cores, statistics) and one test per rule that trips it and names it."""

import numpy as np
import pytest

# The simulator's bf16/fp8 NumPy types; a machine without them (the GPU box) skips these tests.
ml_dtypes = pytest.importorskip("ml_dtypes")

from ember.neuron_kernels import nki_api  # noqa: E402
from ember.neuron_kernels import simulator as sim  # noqa: E402

nki, nl, nisa = sim, sim.language, sim.isa
BF16 = ml_dtypes.bfloat16

pytestmark = pytest.mark.skipif(not nki_api.SIMULATED, reason="real NKI is installed")


RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(np.float32).astype(dtype)


def load(src, buffer=None):
    """SBUF copy of an HBM tensor (inside a kernel)."""
    tile = nl.ndarray(src.shape, dtype=src.dtype, buffer=buffer or nl.sbuf)
    nisa.dma_copy(dst=tile, src=src)
    return tile


def store(tile):
    """A new kernel output holding ``tile``."""
    out = nl.ndarray(tile.shape, dtype=tile.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=tile)
    return out


def launch(body, *inputs):
    """Run ``body(*hbm_inputs)`` as a kernel."""
    kernel = nki.jit(body)
    return kernel(*inputs)


def expect(rule, body, *inputs):
    with pytest.raises(sim.NkiValidationError, match=rf"\[{rule}\]"):
        launch(body, *inputs)


# ----------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------

def test_engines_compute_in_fp32_and_round_on_write():
    a, b = rand(4, 64, dtype=BF16), rand(4, 64, dtype=BF16)

    def body(x, y):
        tx, ty = load(x), load(y)
        total = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=total, data1=tx, data2=ty, op=nl.add)
        return store(total)

    got = launch(body, a, b)
    want = (a.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    assert got.dtype == BF16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_int_writes_round_half_even_and_saturate():
    values = np.array([[300.7, -1.5, 2.5, -400.0, 0.49]], dtype=np.float32)

    def body(x):
        t = load(x)
        q = nl.ndarray(x.shape, dtype=nl.int8, buffer=nl.sbuf)
        nisa.tensor_copy(dst=q, src=t)
        return store(q)

    assert launch(body, values).tolist() == [[127, -2, 2, -128, 0]]


def test_views_write_through_and_dma_casts_via_fp32():
    a = np.arange(32, dtype=np.int32).reshape(4, 8)

    def body(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)  # int32 -> float32 on the DMA
        nisa.memset(dst=t[:, 2:4], value=-1.0)
        return store(t)

    want = a.astype(np.float32)
    want[:, 2:4] = -1.0
    assert np.array_equal(launch(body, a), want)


def test_integer_index_keeps_partition_dim_and_two_dims():
    def body(x):
        t = load(x)
        assert t[0, :, :].shape == (1, 4, 8)
        assert t[:, 0, 5].shape == (2, 1)
        assert x[1, 2].shape == (8,)  # HBM follows NumPy
        return store(t[:, 1, :])

    a = rand(2, 4, 8)
    assert np.array_equal(launch(body, a), a[:, 1, :])


def test_matmul_contracts_over_partitions_and_accumulates_in_psum():
    st, mv = rand(96, 40, dtype=BF16), rand(96, 300, dtype=BF16)
    st2 = rand(96, 40, dtype=BF16)

    def body(s, m, s2):
        ts, tm, ts2 = load(s), load(m), load(s2)
        acc = nl.ndarray((40, 300), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=ts, moving=tm)           # auto: first write
        nisa.nc_matmul(dst=acc, stationary=ts2, moving=tm)          # auto: accumulates
        res = nl.ndarray((40, 300), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=acc)
        return store(res)

    got = launch(body, st, mv, st2)
    want = (st.astype(np.float64).T + st2.astype(np.float64).T) @ mv.astype(np.float64)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)

    def overwrite(s, m):
        ts, tm = load(s), load(m)
        acc = nl.ndarray((40, 300), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=ts, moving=tm)
        nisa.nc_matmul(dst=acc, stationary=ts, moving=tm, accumulate=False)
        res = nl.ndarray((40, 300), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=acc)
        return store(res)

    once = st.astype(np.float64).T @ mv.astype(np.float64)
    assert np.allclose(launch(overwrite, st, mv), once, rtol=1e-5, atol=1e-4)


def test_transpose_and_activation_with_reduce_registers():
    a = rand(8, 32)

    def body(x):
        t = load(x)
        ps = nl.ndarray((32, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=ps, data=t)
        tt = nl.ndarray((32, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=tt, src=ps)
        e = nl.ndarray((32, 8), dtype=nl.float32, buffer=nl.sbuf)
        sums = nl.ndarray((32, 1), dtype=nl.float32, buffer=nl.sbuf)
        # two instructions accumulate in ScalarE's registers; the second reads them out
        nisa.activation(dst=e, op=nl.exp, data=tt, scale=0.5, reduce_op=nl.add,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
        nisa.activation(dst=e, op=nl.exp, data=tt, bias=1.0, reduce_op=nl.add,
                        reduce_res=sums, reduce_cmd=nisa.reduce_cmd.reduce)
        return store(sums)

    got = launch(body, a)[:, 0]
    want = np.exp(0.5 * a.T).sum(1) + np.exp(a.T + 1.0).sum(1)
    assert np.allclose(got, want, rtol=1e-5)


def test_indirect_gather_skips_out_of_bounds_rows():
    table = rand(10, 6)
    index = np.array([[3], [-1], [9], [12], [0]], dtype=np.int32)

    def body(data, idx):
        i = load(idx)
        rows = nl.ndarray((5, 6), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=rows, value=7.0)
        nisa.dma_copy(dst=rows, src=data.ap(pattern=[[6, 5], [1, 6]], vector_offset=i,
                                            indirect_dim=0), oob_mode=nisa.oob_mode.skip)
        return store(rows)

    got = launch(body, table, index)
    assert np.array_equal(got[[0, 2, 4]], table[[3, 9, 0]])
    assert np.all(got[[1, 3]] == 7.0)


def test_scalar_offset_and_stride_zero_broadcast():
    data = rand(3, 4, 5)
    which = np.array([2], dtype=np.int32)

    def body(x, e):
        reg = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=reg, src=e)
        rows = nl.ndarray((4, 5), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=x.ap(pattern=[[5, 4], [1, 5]], scalar_offset=reg,
                                         indirect_dim=0))
        first = nl.ndarray((4, 5), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=first, src=x.ap(pattern=[[0, 4], [1, 5]], offset=7))
        both = nl.ndarray((4, 5), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=both, data1=rows, data2=first, op=nl.subtract)
        return store(both)

    want = data[2] - data.reshape(-1)[7:12][None, :]
    assert np.allclose(launch(body, data, which), want)


def test_iota_affine_select_and_predicated_copy():
    a = rand(6, 10)

    def body(x):
        t = load(x)
        nisa.affine_select(dst=t, pattern=[[-1, 10]], channel_multiplier=1, on_true_tile=t,
                           on_false_value=-5.0, cmp_op=nl.greater_equal, offset=2)
        pos = nl.ndarray((6, 10), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=pos, pattern=[[1, 10]], offset=0, channel_multiplier=0)
        late = nl.ndarray((6, 10), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=late, data=pos, op0=nl.greater_equal, operand0=7.0)
        nisa.tensor_copy_predicated(dst=t, src=0.0, predicate=late)
        return store(t)

    rows, cols = np.meshgrid(np.arange(6), np.arange(10), indexing="ij")
    want = np.where(rows + 2 - cols >= 0, a, -5.0)
    want[:, 7:] = 0.0
    assert np.array_equal(launch(body, a), want.astype(np.float32))


def test_logical_cores_share_outputs_and_stats_count_the_work():
    a = rand(4, 256)

    def body(x):
        pid = nl.program_id(0)
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        half = x.shape[1] // nl.num_programs()
        t = nl.ndarray((4, half), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[:, pid * half:(pid + 1) * half])
        nisa.activation(dst=t, op=nl.exp, data=t)
        nisa.dma_copy(dst=out[:, pid * half:(pid + 1) * half], src=t)
        return out

    with sim.trace() as launches:
        got = nki.jit(body)[2](a)
    assert np.allclose(got, np.exp(a), rtol=1e-6)
    (programs,) = launches
    assert [p.program_id for p in programs] == [0, 1]
    for p in programs:
        assert p.instructions == {"dma": 2, "act": 1}
        assert p.dma_read_bytes == p.dma_write_bytes == 4 * 128 * 4
        assert p.dma_descriptors == 8  # 4 rows of contiguous 512 B, each way
        assert p.cycles["act"] == 128
    summary = sim.combine_programs(programs)
    assert summary["programs"] == 2 and summary["instructions"]["dma"] == 4


def test_matmul_cost_model():
    st, mv = rand(128, 128, dtype=BF16), rand(128, 512, dtype=BF16)

    def body(s, m):
        acc = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(s), moving=load(m))
        res = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=acc)
        return store(res)

    launch(body, st, mv)
    (stats,) = sim.last_stats()
    assert stats.matmul_flops == 2 * 128 * 128 * 512
    assert stats.cycles["pe"] == 512
    # A full-size bf16 matmul issues at TensorE's peak.
    pe_us = stats.engine_us()["pe"]
    assert stats.matmul_flops / (pe_us * 1e-6) / 1e12 == pytest.approx(
        stats.target.bf16_tflops, rel=0.01)
    assert stats.peak_psum_banks == 1


# ----------------------------------------------------------------------------------------------
# Rules: one kernel each that breaks it
# ----------------------------------------------------------------------------------------------

def test_rule_partition_dim():
    expect("partition-dim", lambda x: nl.ndarray((129, 4), dtype=nl.float32, buffer=nl.sbuf),
           rand(1, 1))
    expect("partition-dim", lambda x: nl.ndarray((64,), dtype=nl.float32, buffer=nl.sbuf),
           rand(1, 1))
    expect("partition-dim", lambda x: load(x)[0:8:2, :], rand(8, 4))


def test_rule_partition_mismatch():
    def body(x):
        a, b = load(x[0:64, :]), load(x[64:96, :])
        out = nl.ndarray((64, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=out, data1=a, data2=b, op=nl.add)

    expect("partition-mismatch", body, rand(96, 8))


def test_rule_shape_mismatch():
    def copy(x):
        out = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out, src=load(x))

    expect("shape-mismatch", copy, rand(8, 16))

    def dma(x):
        nisa.dma_copy(dst=nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.sbuf), src=x)

    expect("shape-mismatch", dma, rand(8, 16))


def test_rule_memory_space():
    def compute_on_hbm(x):
        nisa.activation(dst=nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf), op=nl.exp,
                        data=x)

    expect("memory-space", compute_on_hbm, rand(4, 4))

    def dma_from_psum(x):
        ps = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=ps, value=0.0)
        nisa.dma_copy(dst=nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm), src=ps)

    expect("memory-space", dma_from_psum, rand(4, 4))

    def matmul_from_psum(x):
        ps = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=ps, value=0.0)
        nisa.nc_matmul(dst=nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum),
                       stationary=ps, moving=load(x))

    expect("memory-space", matmul_from_psum, rand(4, 4))

    def iota_into_psum(x):
        nisa.iota(dst=nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum), pattern=[[1, 4]])

    expect("memory-space", iota_into_psum, rand(4, 4))


def test_rule_psum_bank_and_capacity():
    expect("psum-bank", lambda x: nl.ndarray((128, 513), dtype=nl.float32, buffer=nl.psum),
           rand(1, 1))

    def nine_banks(x):
        live = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]
        return live

    expect("psum-capacity", nine_banks, rand(1, 1))

    def reuse(x):  # tiles that die free their bank: 20 in sequence are fine
        for _ in range(20):
            ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
            nisa.memset(dst=ps, value=0.0)
        return store(load(x))

    launch(reuse, rand(2, 2))


def test_rule_sbuf_capacity(monkeypatch):
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")

    def body(x):  # 2 x 120 KiB per partition > 224 KiB
        return [nl.ndarray((128, 30720), dtype=nl.float32, buffer=nl.sbuf) for _ in range(2)]

    expect("sbuf-capacity", body, rand(1, 1))
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn3")  # 256 KiB per partition
    launch(lambda x: [body(x), store(load(x))][1], rand(1, 1))


def test_rule_matmul_shape():
    def body(s, m):
        nisa.nc_matmul(dst=nl.ndarray((min(s.shape[1], 128), m.shape[1]), dtype=nl.float32,
                                      buffer=nl.psum), stationary=load(s), moving=load(m))

    expect("matmul-shape", body, rand(128, 129), rand(128, 8))

    def wide_moving(s, m):  # a bf16 dst fits the bank; the shape check comes first
        nisa.nc_matmul(dst=nl.ndarray((8, 513), dtype=nl.bfloat16, buffer=nl.psum),
                       stationary=load(s), moving=load(m))

    expect("matmul-shape", wide_moving, rand(64, 8), rand(64, 513))

    def wrong_dst(s, m):
        nisa.nc_matmul(dst=nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.psum),
                       stationary=load(s), moving=load(m))

    expect("matmul-shape", wrong_dst, rand(64, 8), rand(64, 32))


def test_rule_matmul_dtype():
    def body(s, m):
        nisa.nc_matmul(dst=nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum),
                       stationary=load(s), moving=load(m))

    expect("matmul-dtype", body, np.ones((16, 8), np.int8), rand(16, 8, dtype=BF16))
    expect("matmul-dtype", body, rand(16, 8), rand(16, 8, dtype=BF16))

    def bf16_dst(s, m):
        nisa.nc_matmul(dst=nl.ndarray((8, 8), dtype=nl.bfloat16, buffer=nl.psum),
                       stationary=load(s), moving=load(m))

    expect("matmul-dtype", bf16_dst, rand(16, 8, dtype=BF16), rand(16, 8, dtype=BF16))


def test_rule_target(monkeypatch):
    fp8 = rand(16, 8).astype(ml_dtypes.float8_e4m3fn)

    def body(s, m):
        acc = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(s), moving=load(m))
        res = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=acc)
        return store(res)

    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    expect("target", body, fp8, fp8)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "gen4")  # trn3 takes OCP e4m3fn
    want = fp8.astype(np.float32).T @ fp8.astype(np.float32)
    assert np.allclose(launch(body, fp8, fp8), want, rtol=1e-6)


def test_rule_psum_accumulate():
    def body(s, m):
        acc = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=acc, value=0.0)
        nisa.nc_matmul(dst=acc, stationary=load(s), moving=load(m), accumulate=True)

    expect("psum-accumulate", body, rand(16, 8, dtype=BF16), rand(16, 8, dtype=BF16))


def test_rule_transpose():
    def too_big(x):  # no dst can hold the result: 129 partitions
        nisa.nc_transpose(dst=nl.ndarray((128, 4), dtype=nl.float32, buffer=nl.psum),
                          data=load(x))

    expect("transpose", too_big, rand(4, 129))

    def dtype_change(x):
        nisa.nc_transpose(dst=nl.ndarray((8, 4), dtype=nl.float32, buffer=nl.psum),
                          data=load(x))

    expect("transpose", dtype_change, rand(4, 8, dtype=BF16))


def test_rule_dtype():
    def float_predicate(x):
        t = load(x)
        nisa.tensor_copy_predicated(dst=t, src=0.0, predicate=load(x))

    expect("dtype", float_predicate, rand(4, 4))

    def int_operand(x, v):
        out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=out, data=load(x), op0=nl.add, operand0=load(v))

    expect("dtype", int_operand, rand(4, 4), np.ones((4, 1), np.int32))

    def float_into_int_memset(x):
        nisa.memset(dst=nl.ndarray((4, 4), dtype=nl.int32, buffer=nl.sbuf), value=0.5)

    expect("dtype", float_into_int_memset, rand(1, 1))

    expect("dtype", lambda x: None, np.ones((2, 2), np.float64))


def test_rule_operand_kind():
    def alu_as_activation(x):
        t = load(x)
        nisa.activation(dst=t, op=nl.add, data=t)

    expect("operand-kind", alu_as_activation, rand(4, 4))

    def wide_operand(x):
        t = load(x)
        nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=t)

    expect("operand-kind", wide_operand, rand(4, 4))


def test_rule_reduce_axis():
    def partition_axis(x):
        nisa.tensor_reduce(dst=nl.ndarray((1, 4), dtype=nl.float32, buffer=nl.sbuf),
                           op=nl.add, data=load(x), axis=0)

    expect("reduce-axis", partition_axis, rand(4, 4))

    def middle_axis(x):
        nisa.tensor_reduce(dst=nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.sbuf),
                           op=nl.add, data=load(x), axis=1)

    expect("reduce-axis", middle_axis, rand(2, 3, 4))


def test_rule_index_bounds():
    expect("index-bounds", lambda x: load(x)[:, 0:9], rand(4, 8))
    expect("index-bounds", lambda x: x[4, 0], rand(4, 8))
    expect("index-bounds", lambda x: x[-1, 0], rand(4, 8))
    expect("index-bounds", lambda x: x.ap(pattern=[[8, 4], [1, 9]]), rand(4, 8))


def test_rule_access_pattern():
    expect("access-pattern", lambda x: x[0:2, :].ap(pattern=[[8, 2], [1, 8]]), rand(4, 8))
    expect("access-pattern", lambda x: load(x).ap(pattern=[[16, 2], [1, 8]]), rand(4, 8))


def test_rule_indirect_access():
    def sbuf_target(x, i):
        load(x).ap(pattern=[[8, 2], [1, 8]], vector_offset=load(i), indirect_dim=0)

    expect("indirect-access", sbuf_target, rand(4, 8), np.zeros((2, 1), np.int32))

    def float_offsets(x, i):
        x.ap(pattern=[[8, 2], [1, 8]], vector_offset=load(i), indirect_dim=0)

    expect("indirect-access", float_offsets, rand(4, 8), np.zeros((2, 1), np.float32))

    def compute_on_indirect(x, i):
        view = x.ap(pattern=[[8, 2], [1, 8]], vector_offset=load(i), indirect_dim=0)
        nisa.tensor_copy(dst=nl.ndarray((2, 8), dtype=nl.float32, buffer=nl.sbuf), src=view)

    expect("indirect-access", compute_on_indirect, rand(4, 8), np.zeros((2, 1), np.int32))

    expect("indirect-access", lambda x, i: x[load(i), 0], rand(4, 8), np.zeros((1, 1), np.int32))


def test_rule_dma_oob():
    def body(x, i):
        rows = nl.ndarray((2, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=x.ap(pattern=[[8, 2], [1, 8]], vector_offset=load(i),
                                         indirect_dim=0))

    expect("dma-oob", body, rand(4, 8), np.array([[1], [4]], np.int32))


def test_rule_activation_range():
    def log_of_zero(x):
        t = load(x)
        nisa.activation(dst=t, op=nl.log, data=t)

    expect("activation-range", log_of_zero, np.zeros((2, 2), np.float32))


def test_rule_uninitialized_read():
    def fresh(x):
        t = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=t, op=nl.exp, data=t)

    expect("uninitialized-read", fresh, rand(1, 1))

    def half_written(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[:, 0:4], src=x)
        return store(t)

    expect("uninitialized-read", half_written, rand(4, 4))


def test_new_buffers_hold_nan():
    def body(x):
        t = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.sbuf)
        assert np.isnan(t._alloc.data).all()
        i = nl.ndarray((2, 3), dtype=nl.int32, buffer=nl.sbuf)
        assert (i._alloc.data == sim.UNINIT_INT).all()
        return store(load(x))

    launch(body, rand(1, 1))


def test_rule_output_not_written_and_kernel_output():
    def partial(x):
        out = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out[:, 0:4], src=load(x))
        return out

    expect("output-not-written", partial, rand(4, 4))
    expect("kernel-output", lambda x: load(x), rand(4, 4))
    expect("kernel-output", lambda x: x, rand(4, 4))


def test_rule_kernel_args():
    expect("kernel-args", lambda x, sizes: store(load(x)), rand(2, 2), [1, 2])
    assert launch(lambda x, sizes: store(load(x)), rand(2, 2), (1, 2)).shape == (2, 2)


def test_rule_host_access():
    expect("host-access", lambda x: float(load(x)[0, 0]), rand(2, 2))
    expect("host-access", lambda x: np.asarray(load(x)), rand(2, 2))
    expect("host-access", lambda x: bool(load(x)), rand(2, 2))

    def assign(x):
        t = load(x)
        t[0, 0] = 1.0

    expect("host-access", assign, rand(2, 2))


def test_rule_no_kernel():
    with pytest.raises(sim.NkiValidationError, match=r"\[no-kernel\]"):
        nl.ndarray((2, 2), dtype=nl.float32, buffer=nl.sbuf)


def _uses_is(x):
    if x is None:
        return None
    return store(load(x))


def _kwonly(x, *, scale=1.0):
    return store(load(x))


def test_rule_python_subset():
    expect("python-subset", _uses_is, rand(2, 2))
    expect("python-subset", _kwonly, rand(2, 2))

    inner = nki.jit(lambda x: store(load(x)))
    expect("python-subset", lambda x: inner(x), rand(2, 2))


def test_rule_python_subset_covers_sub_kernels():
    def kernel(x):
        return _uses_is(x)

    expect("python-subset", kernel, rand(2, 2))


def test_rule_lnc():
    kernel = nki.jit(lambda x: store(load(x)))
    for grid in (4, (1, 2), 0):
        with pytest.raises(sim.NkiValidationError, match=r"\[lnc\]"):
            kernel[grid]
    with pytest.raises(sim.NkiValidationError, match=r"\[lnc\]"):
        nki.jit(lambda x: nl.program_id(1))(rand(1, 1))


def test_every_rule_has_a_test():
    source = open(__file__).read()
    untested = [rule for rule in sim.RULES
                if f'expect("{rule}"' not in source and rf"\[{rule}\]" not in source]
    assert not untested, f"rules without a test: {untested}"
