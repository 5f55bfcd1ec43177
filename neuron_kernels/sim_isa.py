"""``nki.isa`` as the simulator implements it: the instructions ember's kernels issue, with the
documented semantics (NKI 0.3+: destination first, nothing returned) and their checks.

Engines (for the cost model): TensorE ``nc_matmul``/``nc_transpose``; ScalarE ``activation``;
VectorE ``tensor_*`` and ``reciprocal``; GpSimd ``iota``/``affine_select``; DMA
``dma_copy``. ``tensor_copy`` and ``memset`` go to the least busy engine
that can run them, as the compiler's choice for ``engine=unknown``.
"""

import enum
import math

import numpy as np

from ember.neuron_kernels import sim_language as nl
from ember.neuron_kernels import simulator as sim
from ember.neuron_kernels.simulator import (  # noqa: F401  (nki.isa.NkiValidationError)
    IndirectView,
    NkiTensor,
    NkiValidationError,
    fail,
)


class oob_mode(enum.Enum):  # noqa: N801
    error = "error"
    skip = "skip"


class reduce_cmd(enum.Enum):  # noqa: N801
    idle = "idle"
    reset = "reset"
    reduce = "reduce"
    reset_reduce = "reset_reduce"


# The instructions' keyword arguments share these names; the bodies use the aliases.
_OOB, _RC = oob_mode, reduce_cmd


# ----------------------------------------------------------------------------------------------
# Operand checks shared by the instructions
# ----------------------------------------------------------------------------------------------

ON_CHIP = ("sbuf", "psum")


def _tile(op, name, t, buffers=ON_CHIP) -> NkiTensor:
    sim.program()
    if isinstance(t, IndirectView):
        fail("indirect-access", f"{op}: {name} uses runtime offsets; only dma_copy takes them")
    if not isinstance(t, NkiTensor):
        fail("operand-kind", f"{op}: {name} must be an NKI tensor, got {type(t).__name__}")
    if t.buffer.kind not in buffers:
        fail("memory-space", f"{op}: {name} is {t.describe()}; {op} takes "
                             f"{' or '.join(buffers)} here")
    if t.on_chip and t.shape[0] > sim.PARTITIONS:
        fail("partition-dim", f"{op}: {name} spans {t.shape[0]} partitions")
    return t


def _free(t) -> int:
    return math.prod(t.shape[1:])


def _same_layout(op, **tiles):
    """Same partitions and the same number of elements per partition."""
    (first_name, first), *rest = tiles.items()
    for name, t in rest:
        if t.shape[0] != first.shape[0]:
            fail("partition-mismatch", f"{op}: {name} spans {t.shape[0]} partitions, "
                                       f"{first_name} {first.shape[0]} ({t.describe()} vs "
                                       f"{first.describe()})")
        if _free(t) != _free(first):
            fail("shape-mismatch", f"{op}: {name} has {_free(t)} elements per partition, "
                                   f"{first_name} {_free(first)}")


def _not_both_psum(op, a, b):
    if a.buffer.kind == "psum" and b.buffer.kind == "psum":
        fail("memory-space", f"{op}: at most one input may be in PSUM")


def _f32(t: NkiTensor) -> np.ndarray:
    """Engine input: values up-cast to float32, laid out [P, free]."""
    return sim.read_values(t).astype(np.float32).reshape(t.shape[0], -1)


def _ints(t: NkiTensor) -> np.ndarray:
    return sim.read_values(t).reshape(t.shape[0], -1)


def _store(dst: NkiTensor, values: np.ndarray):
    sim.write_values(dst, sim.cast(values, dst.dtype).reshape(dst.shape))


def _operand(op, name, value, partitions, *, need_fp32=True):
    """A compile-time number or a [P, 1] tensor, as an array broadcasting over [P, free]."""
    if isinstance(value, NkiTensor):
        _tile(op, name, value)
        if value.shape != (partitions, 1):
            fail("operand-kind", f"{op}: {name} must be a scalar or a [{partitions}, 1] vector, "
                                 f"got {value.describe()}")
        if need_fp32 and value.dtype != sim.float32:
            fail("dtype", f"{op}: {name} must be float32, got {sim.dtype_name(value.dtype)}")
        return sim.read_values(value).reshape(partitions, 1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        fail("operand-kind", f"{op}: {name} must be a number or an NKI tensor, got "
                             f"{type(value).__name__}")
    return value


def _alu(op, name, operator, kinds=("arith", "cmp")) -> nl.Operator:
    if not isinstance(operator, nl.Operator) or operator.kind not in kinds:
        fail("operand-kind", f"{op}: {name} must be an nl operator of kind {kinds}, got "
                             f"{operator!r}")
    return operator


def _apply(operator, a, b):
    if operator.kind == "cmp":
        return operator.fn(a, b).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return operator.fn(np.float32(a) if np.isscalar(a) else a,
                           np.float32(b) if np.isscalar(b) else b).astype(np.float32)


def _elementwise_cycles(*tiles) -> int:
    return max(sim.MIN_INSTR_CYCLES, max(_free(t) for t in tiles))


# ----------------------------------------------------------------------------------------------
# DMA
# ----------------------------------------------------------------------------------------------

def _dma_side(op, name, t):
    if isinstance(t, IndirectView):
        return t
    _tile(op, name, t, buffers=("sbuf", "hbm"))
    return t


def _descriptors(idx: np.ndarray) -> int:
    flat = idx.reshape(-1)
    if flat.size == 0:
        return 0
    return int(np.count_nonzero(np.diff(flat) != 1)) + 1


def dma_copy(dst, src, oob_mode=oob_mode.error):
    """Copy ``src`` to ``dst`` (HBM <-> SBUF) on the DMA engines; casts via float32."""
    op = "dma_copy"
    dst, src = _dma_side(op, "dst", dst), _dma_side(op, "src", src)
    n_src, n_dst = math.prod(src.shape), math.prod(dst.shape)
    if n_src != n_dst:
        fail("shape-mismatch", f"{op}: src has {n_src} elements, dst {n_dst} "
                               f"({src.describe()} -> {dst.describe()})")
    indirect = [v for v in (src, dst) if isinstance(v, IndirectView)]
    if len(indirect) == 2:
        fail("indirect-access", f"{op}: only one side may use runtime offsets")
    # Flat storage indices of both sides, element i of src going to element i of dst.
    ok = np.ones(n_src, dtype=bool)
    sides = {}
    for name, side in (("src", src), ("dst", dst)):
        if isinstance(side, IndirectView):
            flat_idx, in_bounds = side.resolve()
            if not in_bounds.all() and oob_mode != _OOB.skip:
                fail("dma-oob", f"{op}: runtime offsets "
                                f"{sim.read_values(side.offsets).ravel().tolist()} leave "
                                f"{side.describe()} (oob_mode.error)")
            ok = in_bounds.reshape(-1)
            sides[name] = (side.base._alloc, flat_idx.reshape(-1))
        else:
            sides[name] = (side._alloc, side._idx.reshape(-1))
    (src_alloc, src_idx), (dst_alloc, dst_idx) = sides["src"], sides["dst"]
    src_idx, dst_idx = src_idx[ok], dst_idx[ok]

    values = sim.read_values(NkiTensor(src_alloc, src_idx, root=False))
    if src_alloc.dtype != dst_alloc.dtype:
        values = sim.cast(values.astype(np.float32), dst_alloc.dtype)
    sim.write_values(NkiTensor(dst_alloc, dst_idx, root=False), values)

    prog = sim.program()
    prog.count("dma")
    src_hbm, dst_hbm = src_alloc.buffer.kind == "hbm", dst_alloc.buffer.kind == "hbm"
    if src_hbm and not dst_hbm:
        prog.stats.dma_read_bytes += src_idx.size * src_alloc.dtype.itemsize
    elif dst_hbm and not src_hbm:
        prog.stats.dma_write_bytes += dst_idx.size * dst_alloc.dtype.itemsize
    else:
        prog.stats.dma_other_bytes += src_idx.size * max(src_alloc.dtype.itemsize,
                                                         dst_alloc.dtype.itemsize)
    prog.stats.dma_descriptors += _descriptors(dst_idx if dst_hbm else src_idx)


# ----------------------------------------------------------------------------------------------
# TensorE
# ----------------------------------------------------------------------------------------------

_MATMUL_DTYPES = (sim.float32, sim.float16, sim.bfloat16, sim.float8_e4m3, sim.float8_e5m2,
                  sim.float8_e4m3fn)


def nc_matmul(dst, stationary, moving, accumulate=None):
    """``dst[M, N] (+)= stationary[K, M].T @ moving[K, N]``, float32 accumulation in PSUM.

    accumulate: False overwrites, True adds, None adds where a matmul already wrote since the
    tile was allocated and overwrites elsewhere.
    """
    op = "nc_matmul"
    prog = sim.program()
    _tile(op, "stationary", stationary, ("sbuf",))
    _tile(op, "moving", moving, ("sbuf",))
    _tile(op, "dst", dst, ("psum",))
    for name, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MATMUL_DTYPES:
            fail("matmul-dtype", f"{op}: {name} is {sim.dtype_name(t.dtype)}; TensorE takes "
                                 f"fp8/bf16/fp16/fp32 (convert integers first)")
        if t.dtype == sim.float8_e4m3fn and not prog.target.e4m3fn_matmul:
            fail("target", f"{op}: float8_e4m3fn operands need NeuronCore-v4 (trn3); "
                           f"{prog.target.name} takes float8_e4m3")
        if t.ndim != 2:
            fail("matmul-shape", f"{op}: {name} must be 2-D [K, free], got {t.describe()}")
    fp32_in = [t.dtype == sim.float32 for t in (stationary, moving)]
    if any(fp32_in) and not all(fp32_in):
        fail("matmul-dtype", f"{op}: a float32 operand needs a float32 partner, got "
                             f"{sim.dtype_name(stationary.dtype)} x {sim.dtype_name(moving.dtype)}")
    k, m = stationary.shape
    k2, n = moving.shape
    if k != k2:
        fail("partition-mismatch", f"{op}: stationary contracts over {k} partitions, moving "
                                   f"over {k2}")
    if m > 128:
        fail("matmul-shape", f"{op}: stationary free size {m} exceeds 128")
    if n > prog.target.moving_fmax:
        fail("matmul-shape", f"{op}: moving free size {n} exceeds {prog.target.moving_fmax}")
    if dst.shape != (m, n):
        fail("matmul-shape", f"{op}: dst must be [{m}, {n}], got {dst.describe()}")
    if dst.dtype != sim.float32:
        fail("matmul-dtype", f"{op}: dst must be a float32 PSUM tile, got "
                             f"{sim.dtype_name(dst.dtype)}")
    if accumulate not in (None, True, False):
        fail("operand-kind", f"{op}: accumulate must be None, True or False")

    product = _f32(stationary).T.astype(np.float64) @ _f32(moving).astype(np.float64)
    product = product.astype(np.float32)
    alloc = dst._alloc
    had = alloc.mm_written[dst._idx]
    if accumulate is True and not had.all():
        fail("psum-accumulate", f"{op}: accumulate=True onto {dst.describe()} that no matmul "
                                f"wrote (undefined on hardware)")
    add = had if accumulate is None else np.full(had.shape, bool(accumulate))
    if add.any():
        previous = alloc.data[dst._idx].astype(np.float32)
        product = np.where(add, previous + product, product)
    sim.write_values(dst, product.astype(np.float32), from_matmul=True)

    scale = 4 if fp32_in[0] else 1
    prog.count("pe", max(n, sim.MIN_INSTR_CYCLES) * scale)
    prog.stats.matmul_flops += 2 * k * m * n


def nc_transpose(dst, data):
    """TensorE transpose (a matmul against the identity): SBUF [P, F] -> PSUM [F, P]."""
    op = "nc_transpose"
    prog = sim.program()
    _tile(op, "data", data, ("sbuf",))
    _tile(op, "dst", dst, ("psum",))
    p, f = data.shape[0], _free(data)
    if p > 128 or f > 128:
        fail("transpose", f"{op}: input {data.describe()} exceeds [128, 128]")
    if dst.shape != (f, p):
        fail("transpose", f"{op}: dst must be [{f}, {p}], got {dst.describe()}")
    if dst.dtype != data.dtype:
        fail("transpose", f"{op}: dst dtype {sim.dtype_name(dst.dtype)} must equal input dtype "
                          f"{sim.dtype_name(data.dtype)}")
    values = sim.read_values(data).reshape(p, f).T.copy()
    sim.write_values(dst, values)
    scale = 4 if data.dtype == sim.float32 else 1
    prog.count("pe", max(p, sim.MIN_INSTR_CYCLES) * scale)


# ----------------------------------------------------------------------------------------------
# ScalarE
# ----------------------------------------------------------------------------------------------

def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None,
               reduce_cmd=reduce_cmd.idle):
    """``dst = op(data * scale + bias)`` in float32 on ScalarE, with the engine's per-partition
    accumulation registers: ``reset``/``reset_reduce`` zero them, ``reduce``/``reset_reduce``
    add this instruction's free-axis sum of the result, ``reduce_res`` reads them out."""
    name = "activation"
    prog = sim.program()
    _tile(name, "data", data)
    _tile(name, "dst", dst)
    _same_layout(name, dst=dst, data=data)
    if not isinstance(op, nl.Operator) or op.kind != "act":
        fail("operand-kind", f"{name}: op must be an activation function, got {op!r}")
    p = data.shape[0]
    scale_v = _operand(name, "scale", scale, p)
    if bias is None:
        bias_v = 0.0
    elif isinstance(bias, NkiTensor):
        _tile(name, "bias", bias)
        if bias.shape != (p, 1):
            fail("operand-kind", f"{name}: bias must be a [{p}, 1] vector, got {bias.describe()}")
        if bias.dtype not in (sim.float32, sim.float16, sim.bfloat16):
            fail("dtype", f"{name}: bias must be fp32/fp16/bf16, got "
                          f"{sim.dtype_name(bias.dtype)}")
        bias_v = sim.read_values(bias).astype(np.float32).reshape(p, 1)
    else:
        if not prog.target.scalar_bias:
            fail("operand-kind", f"{name}: bias must be a [P, 1] vector on "
                                 f"{prog.target.core}")
        bias_v = _operand(name, "bias", bias, p)
    x = _f32(data) * np.float32(scale_v) if np.isscalar(scale_v) else _f32(data) * scale_v
    x = (x + bias_v).astype(np.float32)
    if op.valid is not None:
        lo, hi = op.valid
        finite = x[~np.isnan(x)]
        if finite.size and (finite.min() < lo or finite.max() > hi):
            fail("activation-range", f"{name}: {op!r} input range [{finite.min():g}, "
                                     f"{finite.max():g}] is outside its valid [{lo:g}, {hi:g}]")
    with np.errstate(divide="ignore", invalid="ignore"):
        y = op.fn(x).astype(np.float32)
    _store(dst, y)

    if reduce_cmd != _RC.idle or reduce_res is not None:
        if reduce_cmd in (_RC.reduce, _RC.reset_reduce) and reduce_op is not nl.add:
            fail("operand-kind", f"{name}: reduce_op must be nl.add, got {reduce_op!r}")
        regs = prog.act_regs
        if reduce_cmd in (_RC.reset, _RC.reset_reduce):
            regs[:p] = 0.0
        if reduce_cmd in (_RC.reduce, _RC.reset_reduce):
            regs[:p] += y.sum(axis=1, dtype=np.float32)
        if reduce_res is not None:
            _tile(name, "reduce_res", reduce_res)
            if reduce_res.shape != (p, 1):
                fail("operand-kind", f"{name}: reduce_res must be [{p}, 1], got "
                                     f"{reduce_res.describe()}")
            _store(reduce_res, regs[:p].reshape(p, 1))
    prog.count("act", _elementwise_cycles(data))


# ----------------------------------------------------------------------------------------------
# VectorE / GpSimd
# ----------------------------------------------------------------------------------------------

def tensor_copy(dst, src):
    """On-chip copy (PSUM <-> SBUF); bit-exact for equal dtypes, else a float32 cast.

    Vector, Scalar or GpSimd engine (GpSimd only without PSUM operands), as the compiler
    balances them (``least_busy``)."""
    op = "tensor_copy"
    _tile(op, "src", src)
    _tile(op, "dst", dst)
    _same_layout(op, dst=dst, src=src)
    values = sim.read_values(src)
    if src.dtype == dst.dtype:
        sim.write_values(dst, values.reshape(dst.shape))
    else:
        _store(dst, values.astype(np.float32))
    prog = sim.program()
    engines = ["dve", "act"] + ([] if "psum" in (src.buffer.kind, dst.buffer.kind) else ["pool"])
    prog.count(prog.least_busy(engines), _elementwise_cycles(src))


def memset(dst, value):
    """Fill ``dst`` with a compile-time constant of its kind (int for integer tensors), on the
    Vector or (SBUF only) GpSimd engine."""
    op = "memset"
    _tile(op, "dst", dst)
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not is_number or (sim.is_int(dst.dtype) and not isinstance(value, (int, np.integer))):
        fail("dtype", f"memset: value {value!r} does not match {dst.describe()}")
    _store(dst, np.full(dst.shape, value, dtype=np.float64 if sim.is_float(dst.dtype)
                        else np.int64))
    prog = sim.program()
    engines = ["dve"] + ([] if dst.buffer.kind == "psum" else ["pool"])
    prog.count(prog.least_busy(engines), _elementwise_cycles(dst))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None,
                  reverse1=False):
    """``dst = (data op0 operand0) op1 operand1`` in float32, with float32 scalar / [P, 1]
    operands (``reverse*`` swaps an operator's inputs)."""
    op = "tensor_scalar"
    _tile(op, "data", data)
    _tile(op, "dst", dst)
    _same_layout(op, dst=dst, data=data)
    p = data.shape[0]
    ops = [(_alu(op, "op0", op0), operand0, reverse0)]
    if op1 is not None:
        ops.append((_alu(op, "op1", op1), operand1, reverse1))
    elif operand1 is not None:
        fail("operand-kind", f"{op}: operand1 given without op1")
    x = _f32(data)
    for operator, operand, reverse in ops:
        value = _operand(op, "operand", operand, p)
        x = _apply(operator, value, x) if reverse else _apply(operator, x, value)
    _store(dst, x)
    sim.program().count("dve", _elementwise_cycles(data))


def tensor_tensor(dst, data1, data2, op):
    """``dst = data1 op data2`` element-wise in float32 (same partitions and elements per
    partition; at most one input in PSUM)."""
    name = "tensor_tensor"
    for n, t in (("data1", data1), ("data2", data2), ("dst", dst)):
        _tile(name, n, t)
    _same_layout(name, dst=dst, data1=data1, data2=data2)
    _not_both_psum(name, data1, data2)
    operator = _alu(name, "op", op)
    if all(t.dtype == sim.int32 for t in (data1, data2, dst)):
        # The hardware runs this on GpSimd with exact 32-bit integer math.
        raise NotImplementedError("all-int32 tensor_tensor (GpSimd integer math) is outside "
                                  "the simulated subset")
    _store(dst, _apply(operator, _f32(data1), _f32(data2)))
    sim.program().count("dve", _elementwise_cycles(data1))


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1):
    """``dst = (data op0 operand0) op1 operand1``: operand0 scalar or [P, 1], operand1 a tile."""
    name = "scalar_tensor_tensor"
    for n, t in (("data", data), ("operand1", operand1), ("dst", dst)):
        _tile(name, n, t)
    _same_layout(name, dst=dst, data=data, operand1=operand1)
    _not_both_psum(name, data, operand1)
    first, second = _alu(name, "op0", op0, ("arith",)), _alu(name, "op1", op1, ("arith",))
    value = _operand(name, "operand0", operand0, data.shape[0])
    _store(dst, _apply(second, _apply(first, _f32(data), value), _f32(operand1)))
    sim.program().count("dve", _elementwise_cycles(data))


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False):
    """Reduce trailing free axes of ``data`` with an arithmetic operator, in float32."""
    name = "tensor_reduce"
    _tile(name, "data", data)
    _tile(name, "dst", dst)
    operator = _alu(name, "op", op, ("arith",))
    if operator.identity is None:
        fail("operand-kind", f"{name}: {operator!r} cannot reduce")
    axes = sorted((axis,) if isinstance(axis, int) else tuple(axis))
    if not axes or axes[0] < 1 or axes != list(range(axes[0], data.ndim)):
        fail("reduce-axis", f"{name}: axis {axis} must be the trailing free axes of "
                            f"{data.describe()}")
    kept = data.shape[:axes[0]]
    if dst.shape[0] != data.shape[0]:
        fail("partition-mismatch", f"{name}: dst spans {dst.shape[0]} partitions, data "
                                   f"{data.shape[0]}")
    if _free(dst) != math.prod(kept[1:]):
        fail("shape-mismatch", f"{name}: dst {dst.describe()} does not match the reduction of "
                               f"{data.describe()} over {axes}")
    x = sim.read_values(data).astype(np.float32).reshape(*kept, -1)
    result = operator.fn.reduce(x, axis=-1).astype(np.float32)
    if negate:
        result = -result
    _store(dst, result)
    sim.program().count("dve", _elementwise_cycles(data))


def reciprocal(dst, data):
    """``dst = 1 / data`` on VectorE in float32."""
    name = "reciprocal"
    _tile(name, "data", data)
    _tile(name, "dst", dst)
    _same_layout(name, dst=dst, data=data)
    with np.errstate(divide="ignore"):
        _store(dst, np.float32(1.0) / _f32(data))
    sim.program().count("dve", _elementwise_cycles(data))


def tensor_copy_predicated(dst, src, predicate):
    """Copy ``src`` (a tile or a number) into ``dst`` where ``predicate`` is nonzero."""
    name = "tensor_copy_predicated"
    _tile(name, "dst", dst)
    _tile(name, "predicate", predicate)
    if predicate.dtype not in (sim.uint8, sim.uint32):
        fail("dtype", f"{name}: predicate must be uint8/uint16/uint32, got "
                      f"{sim.dtype_name(predicate.dtype)}")
    _same_layout(name, dst=dst, predicate=predicate)
    if isinstance(src, NkiTensor):
        _tile(name, "src", src)
        _same_layout(name, dst=dst, src=src)
        _not_both_psum(name, src, predicate)
        if src.dtype != dst.dtype:
            fail("dtype", f"{name}: src and dst must share a dtype")
        values = sim.read_values(src).reshape(dst.shape)
    else:
        value = _operand(name, "src", src, dst.shape[0])
        values = sim.cast(np.full(dst.shape, value, dtype=np.float64), dst.dtype)
    keep = _ints(predicate).reshape(dst.shape) != 0
    sim.write_values(dst, values, mask=keep)
    sim.program().count("dve", _elementwise_cycles(dst))


def _affine(op, dst, pattern, offset, channel_multiplier) -> np.ndarray:
    try:
        steps = [int(s) for s, _ in pattern]
        nums = [int(n) for _, n in pattern]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: pattern must be a list of [step, num] pairs, "
                        f"got {pattern!r}") from None
    if not 1 <= len(nums) <= 4 or math.prod(nums) != _free(dst):
        fail("shape-mismatch", f"{op}: pattern {pattern!r} does not cover the "
                               f"{_free(dst)} elements per partition of {dst.describe()}")
    free = sim._pattern_index(steps, nums, int(offset)).reshape(1, -1)
    channel = np.arange(dst.shape[0], dtype=np.int64).reshape(-1, 1) * int(channel_multiplier)
    return (free + channel).astype(np.int32)


def iota(dst, pattern, offset=0, channel_multiplier=0):
    """``dst[p, i] = offset + p * channel_multiplier + sum(step_j * i_j)`` in int32 (GpSimd)."""
    op = "iota"
    _tile(op, "dst", dst, ("sbuf",))
    values = _affine(op, dst, pattern, offset, channel_multiplier)
    sim.write_values(dst, sim.cast(values, dst.dtype).reshape(dst.shape))
    sim.program().count("pool", _elementwise_cycles(dst))


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value,
                  cmp_op=nl.equal, offset=0):
    """Keep ``on_true_tile`` where ``cmp_op(affine value, 0)``, else ``on_false_value``."""
    op = "affine_select"
    _tile(op, "dst", dst, ("sbuf",))
    _tile(op, "on_true_tile", on_true_tile, ("sbuf",))
    _same_layout(op, dst=dst, on_true_tile=on_true_tile)
    compare = _alu(op, "cmp_op", cmp_op, ("cmp",))
    if isinstance(on_false_value, bool) or not isinstance(on_false_value, (int, float)):
        fail("operand-kind", f"{op}: on_false_value must be a float32 number")
    keep = compare.fn(_affine(op, dst, pattern, offset, channel_multiplier), 0)
    chosen = np.where(keep, _f32(on_true_tile), np.float32(on_false_value))
    _store(dst, chosen)
    sim.program().count("pool", _elementwise_cycles(dst))
