"""A strict NumPy simulator of the part of AWS NKI that ember's kernels use.

It stands in for the ``nki`` package (``nki.jit``, ``nki.language``, ``nki.isa``) when that is
not importable (see ``nki_api.py``, the one switch). Kernels written against the real current
API run here eagerly on NumPy arrays, the way ``nki.simulate`` runs them, with the hardware
rules enforced the way the compiler and the engines would:

* memory: HBM tensors are touched only by DMA; SBUF/PSUM tensors are 2-D or more with the
  partition dimension first and at most 128 partitions; a PSUM tile fits one 2 KiB bank per
  partition and at most 8 are live (16 KiB); live SBUF fits the target's partition size;
* engines compute in float32 and round on every write into the destination dtype (bfloat16 and
  fp8 through ``ml_dtypes``, round to nearest even; integers round and saturate);
* new buffers hold NaN (integers: the sentinel 4, as in ``nki.simulate``) and reading an element
  no instruction wrote is an error, as is returning an output with unwritten elements;
* every instruction checks operand buffers, partition counts, shapes and dtypes (see
  ``sim_isa.py``) and tensors refuse host access, so a kernel cannot peek at runtime data.

A violated rule raises ``NkiValidationError`` whose message starts with the rule name from
``RULES`` in brackets, e.g. ``[psum-bank] ...``. Every launch also records what a Trainium core
would do with it (``KernelStats``: instructions and cycles per engine, DMA bytes and
descriptors, tensor-engine FLOPs), which ``bench/nki_cost.py`` turns into a cost estimate.

The target (which NeuronCore generation's limits and clocks apply) comes from
``NEURON_PLATFORM_TARGET_OVERRIDE`` like the real tool chain (trn1|gen2, trn2|gen3, trn3|gen4);
the default is trn2.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import os
import textwrap
import weakref
from collections import Counter
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

# ----------------------------------------------------------------------------------------------
# Rules and errors
# ----------------------------------------------------------------------------------------------

RULES = {
    "partition-dim": "SBUF/PSUM tensors are at least 2-D, partition dimension first, at most 128 "
                     "partitions, never strided along partitions",
    "partition-mismatch": "operands of one instruction span the same number of partitions",
    "shape-mismatch": "operands of one instruction have the sizes the instruction requires",
    "memory-space": "HBM is touched only by DMA; TensorE reads SBUF and writes PSUM; GpSimd "
                    "(iota, affine_select) works in SBUF; DMA does not read or write PSUM",
    "psum-bank": "a PSUM tile fits one 2 KiB bank per partition (512 float32); trn3 matmuls "
                 "may span all 8",
    "psum-capacity": "at most 8 PSUM banks (16 KiB per partition) are live at once",
    "sbuf-capacity": "live SBUF tensors fit the target's bytes per partition",
    "matmul-shape": "nc_matmul contracts over partitions: stationary [K<=128, M<=128], moving "
                    "[K, N<=512], dst [M, N]",
    "matmul-dtype": "nc_matmul takes fp8/bf16/fp16/fp32 operands (fp32 only with fp32, no "
                    "integers) and writes a float32 PSUM tile",
    "psum-accumulate": "nc_matmul accumulate=True needs PSUM already written by a matmul",
    "transpose": "nc_transpose on TensorE: input <= [128, 128] in SBUF, output in PSUM with "
                 "the swapped shape and the same dtype",
    "dtype": "operand dtypes the instruction accepts (fp32 scale/operands, uint predicates, "
             "integer bit operations, memset value kind)",
    "operand-kind": "scalar operands are compile-time numbers or [P, 1] tensors; ops are NKI "
                    "operators of the right kind",
    "reduce-axis": "reductions run over trailing free axes only",
    "index-bounds": "static indices and access patterns stay inside the tensor",
    "access-pattern": ".ap() only on an allocated tensor, partition step equal to the free size",
    "indirect-access": "runtime offsets (.ap vector_offset/scalar_offset) only for DMA on HBM, "
                       "with int32/uint32 offsets in SBUF",
    "dma-oob": "a runtime offset outside the tensor with oob_mode.error",
    "activation-range": "activation inputs within the function's valid range (log: "
                        "[2^-64, 2^64])",
    "uninitialized-read": "instructions read only elements some instruction wrote",
    "output-not-written": "kernel outputs are fully written",
    "kernel-output": "a kernel returns shared_hbm tensors it allocated",
    "kernel-args": "non-tensor kernel arguments are hashable compile-time constants",
    "host-access": "kernel code cannot read tensor values or assign into tensors on the host",
    "no-kernel": "tensors and instructions exist only while a kernel runs",
    "python-subset": "the NKI compiler's Python subset: no is/is not, no *args/**kwargs or "
                     "keyword-only kernel parameters, no @nki.jit on sub-kernels",
    "lnc": "a launch bracket holds the logical core degree, 1 or 2",
    "target": "the instruction/dtype exists on the selected NeuronCore generation",
}


class NkiValidationError(Exception):
    """A hardware or compiler rule was broken; ``rule`` is a key of ``RULES``."""

    def __init__(self, rule: str, message: str):
        if rule not in RULES:
            raise KeyError(f"unknown simulator rule {rule!r}")
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


def fail(rule: str, message: str):
    raise NkiValidationError(rule, message)


# ----------------------------------------------------------------------------------------------
# Targets (NKI.md section 2.1 and 7); per-core numbers, one physical NeuronCore
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    core: str
    sbuf_partition_bytes: int
    pe_ghz: float
    vector_ghz: float
    scalar_ghz: float
    gpsimd_ghz: float
    bf16_tflops: float
    hbm_gbps: float          # device HBM bandwidth divided by its NeuronCores
    moving_fmax: int         # nc_matmul moving free size limit (fp32 PSUM)
    psum_tile_bytes: int     # largest PSUM tile per partition (v4 matmuls span banks)
    e4m3fn_matmul: bool      # OCP fp8 e4m3fn accepted by TensorE
    scalar_bias: bool        # activation bias may be a compile-time scalar


TARGETS = {
    "trn1": Target("trn1", "NeuronCore-v2", 192 * 1024, 2.8, 1.12, 1.4, 1.4, 92.0,
                   820.0 / 2, 512, 2048, False, False),
    "trn2": Target("trn2", "NeuronCore-v3", 224 * 1024, 2.4, 0.96, 1.2, 1.2, 79.0,
                   2900.0 / 8, 512, 2048, False, True),
    "trn3": Target("trn3", "NeuronCore-v4", 256 * 1024, 2.4, 1.2, 1.2, 1.2, 79.0,
                   4700.0 / 8, 4096, 16384, True, True),
}
_TARGET_ALIASES = {"trn1": "trn1", "gen2": "trn1", "inf2": "trn1", "trn2": "trn2",
                   "gen3": "trn2", "trn3": "trn3", "gen4": "trn3"}

PARTITIONS = 128
PSUM_BANK_BYTES = 2048
PSUM_BANKS = 8


def current_target() -> Target:
    name = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2").strip().lower()
    if name not in _TARGET_ALIASES:
        raise ValueError(f"NEURON_PLATFORM_TARGET_OVERRIDE must be one of "
                         f"{sorted(_TARGET_ALIASES)}, got {name!r}")
    return TARGETS[_TARGET_ALIASES[name]]


# ----------------------------------------------------------------------------------------------
# Dtypes: NumPy dtypes, ml_dtypes for bfloat16 and fp8 (Neuron's float8_e4m3 is IEEE-like,
# max 240, which is ml_dtypes.float8_e4m3; OCP e4m3fn has max 448)
# ----------------------------------------------------------------------------------------------

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
int8 = np.dtype(np.int8)
int32 = np.dtype(np.int32)
uint8 = np.dtype(np.uint8)
uint32 = np.dtype(np.uint32)

FLOAT_DTYPES = (float32, float16, bfloat16, float8_e4m3, float8_e4m3fn, float8_e5m2)
INT_DTYPES = (int8, int32, uint8, uint32)
UNINIT_INT = 4  # nki.simulate's sentinel for integer memory nobody wrote


def is_float(dtype) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES


def is_int(dtype) -> bool:
    return np.dtype(dtype) in INT_DTYPES


def cast(values: np.ndarray, dtype) -> np.ndarray:
    """Round engine results (float32/int) into ``dtype``: nearest even; ints saturate."""
    dtype = np.dtype(dtype)
    if dtype in INT_DTYPES:
        if values.dtype.kind == "f":
            info = np.iinfo(dtype)
            values = np.clip(np.rint(np.nan_to_num(values, nan=0.0)), info.min, info.max)
        return values.astype(dtype)
    return np.asarray(values, dtype=np.float32).astype(dtype)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


# ----------------------------------------------------------------------------------------------
# Buffers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Buffer:
    name: str
    kind: str  # "sbuf", "psum" or "hbm"

    def __repr__(self):
        return f"nl.{self.name}"


sbuf = Buffer("sbuf", "sbuf")
psum = Buffer("psum", "psum")
private_hbm = Buffer("private_hbm", "hbm")
shared_hbm = Buffer("shared_hbm", "hbm")
hbm = private_hbm


# ----------------------------------------------------------------------------------------------
# Statistics of one launch: what a NeuronCore would spend on it
# ----------------------------------------------------------------------------------------------

ENGINES = ("pe", "act", "dve", "pool", "dma")
ENGINE_NAMES = {"pe": "TensorE", "act": "ScalarE", "dve": "VectorE", "pool": "GpSimd",
                "dma": "DMA"}
# Vector/Scalar/GpSimd instructions cost about one cycle per element of a partition, with a
# minimum initiation interval of ~64 cycles; TensorE issues a matmul every max(N, 64) cycles
# (4x for fp32 operands). NKI.md section 7.
MIN_INSTR_CYCLES = 64


@dataclass
class KernelStats:
    """Counts and modelled busy time of one program (one NeuronCore) of a launch."""

    kernel: str
    target: Target
    program_id: int = 0
    instructions: Counter = field(default_factory=Counter)   # per engine
    cycles: Counter = field(default_factory=Counter)         # per engine (not DMA)
    dma_read_bytes: int = 0     # HBM -> on-chip
    dma_write_bytes: int = 0    # on-chip -> HBM
    dma_other_bytes: int = 0    # on-chip -> on-chip and HBM -> HBM
    dma_descriptors: int = 0    # contiguous HBM runs moved
    matmul_flops: int = 0       # 2*K*M*N of nc_matmul (transposes excluded)
    peak_sbuf_bytes: int = 0    # per partition
    peak_psum_banks: int = 0

    def engine_us(self) -> dict[str, float]:
        """Modelled busy time per engine, in microseconds."""
        clocks = {"pe": self.target.pe_ghz, "act": self.target.scalar_ghz,
                  "dve": self.target.vector_ghz, "pool": self.target.gpsimd_ghz}
        times = {e: self.cycles[e] / (clocks[e] * 1e3) for e in clocks}
        dma_bytes = self.dma_read_bytes + self.dma_write_bytes + self.dma_other_bytes
        times["dma"] = dma_bytes / (self.target.hbm_gbps * 1e3)
        return times

    def estimate_us(self) -> float:
        """Lower bound: engines overlap perfectly, so the busiest one sets the time."""
        return max(self.engine_us().values())


def combine_programs(stats: list[KernelStats]) -> dict:
    """Summary of a launch whose programs ran on separate cores (in parallel)."""
    first = stats[0]
    total = Counter()
    for s in stats:
        total.update(s.instructions)
    return {
        "kernel": first.kernel,
        "target": first.target.name,
        "programs": len(stats),
        "instructions": dict(total),
        "dma_read_bytes": sum(s.dma_read_bytes for s in stats),
        "dma_write_bytes": sum(s.dma_write_bytes for s in stats),
        "dma_descriptors": sum(s.dma_descriptors for s in stats),
        "matmul_flops": sum(s.matmul_flops for s in stats),
        "estimate_us": max(s.estimate_us() for s in stats),
        "engine_us": {e: max(s.engine_us()[e] for s in stats) for e in ENGINES},
        "peak_sbuf_bytes": max(s.peak_sbuf_bytes for s in stats),
        "peak_psum_banks": max(s.peak_psum_banks for s in stats),
    }


_LAUNCHES: list[list[list[KernelStats]]] = []  # open trace() collectors
_LAST: list[KernelStats] = []


def last_stats() -> list[KernelStats]:
    """Per-program statistics of the most recent launch."""
    return list(_LAST)


@contextlib.contextmanager
def trace():
    """Collect the statistics of every launch inside the block: a list of per-launch lists."""
    launches: list[list[KernelStats]] = []
    _LAUNCHES.append(launches)
    try:
        yield launches
    finally:
        _LAUNCHES.remove(launches)


# ----------------------------------------------------------------------------------------------
# The running program: allocation accounting and engine state
# ----------------------------------------------------------------------------------------------

class _Program:
    def __init__(self, kernel: str, target: Target, program_id: int, num_programs: int,
                 shared: list):
        self.target = target
        self.program_id = program_id
        self.num_programs = num_programs
        self.stats = KernelStats(kernel, target, program_id)
        self.sbuf_bytes = 0
        self.psum_banks = 0
        # shared_hbm tensors are one set for all programs of a launch: program p > 0 gets the
        # allocation program 0 made at the same point of the kernel.
        self.shared = shared
        self.shared_seen = 0
        # ScalarE accumulation registers (nisa.activation reduce_cmd): one fp32 per partition,
        # undefined until reset.
        self.act_regs = np.full(PARTITIONS, np.nan, dtype=np.float32)
        self.closed = False

    def count(self, engine: str, cycles: float = 0.0):
        self.stats.instructions[engine] += 1
        self.stats.cycles[engine] += cycles

    def least_busy(self, engines) -> str:
        """Where the compiler puts an ``engine=unknown`` instruction that several engines can
        run: the one with the least modelled work so far."""
        clocks = {"act": self.target.scalar_ghz, "dve": self.target.vector_ghz,
                  "pool": self.target.gpsimd_ghz}
        return min(engines, key=lambda e: (self.stats.cycles[e] / clocks[e], engines.index(e)))


_PROGRAM: _Program | None = None


def program() -> _Program:
    if _PROGRAM is None or _PROGRAM.closed:
        fail("no-kernel", "NKI tensors and instructions exist only inside a running @nki.jit "
                          "kernel")
    return _PROGRAM


def _release(prog: _Program, kind: str, amount: int):
    if prog.closed:
        return
    if kind == "sbuf":
        prog.sbuf_bytes -= amount
    else:
        prog.psum_banks -= amount


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------

class _Alloc:
    """Storage of one allocated tensor: flat data plus per-element bookkeeping."""

    __slots__ = ("data", "shape", "dtype", "buffer", "name", "written", "mm_written",
                 "__weakref__")

    def __init__(self, data, shape, buffer, name, written):
        self.data = data                # 1-D numpy array
        self.shape = tuple(shape)
        self.dtype = data.dtype
        self.buffer = buffer
        self.name = name
        self.written = written          # 1-D bool, or None when fully defined (kernel inputs)
        self.mm_written = (np.zeros(data.size, dtype=bool) if buffer.kind == "psum" else None)


class NkiTensor:
    """A view of an allocated tensor: its elements are ``alloc.data[idx]``.

    Indexing follows NKI: basic slices and integers only, bounds checked; on-chip tensors keep
    the partition dimension (an integer index keeps it at size 1) and stay at least 2-D.
    """

    __slots__ = ("_alloc", "_idx", "_root")

    def __init__(self, alloc: _Alloc, idx: np.ndarray, root: bool):
        self._alloc = alloc
        self._idx = idx
        self._root = root

    shape = property(lambda self: tuple(self._idx.shape))
    dtype = property(lambda self: self._alloc.dtype)
    buffer = property(lambda self: self._alloc.buffer)
    name = property(lambda self: self._alloc.name)
    ndim = property(lambda self: self._idx.ndim)

    @property
    def on_chip(self) -> bool:
        return self._alloc.buffer.kind != "hbm"

    def __repr__(self):
        return (f"NkiTensor({self.name or '?'}{list(self.shape)}, {dtype_name(self.dtype)}, "
                f"{self.buffer!r})")

    def describe(self) -> str:
        return (f"{self.name or 'tensor'}{list(self.shape)} {dtype_name(self.dtype)} in "
                f"{self.buffer.name}")

    def __getitem__(self, key):
        program()
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > self.ndim:
            fail("index-bounds", f"{len(key)} indices for {self.describe()}")
        key = key + (slice(None),) * (self.ndim - len(key))
        norm = []
        for dim, k in enumerate(key):
            size = self.shape[dim]
            if isinstance(k, NkiTensor):
                fail("indirect-access", "runtime indices go through .ap(vector_offset=...) or "
                                        ".ap(scalar_offset=...) on an HBM tensor, not [] ")
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = int(k)
                if not 0 <= k < size:
                    fail("index-bounds", f"index {k} on dim {dim} of {self.describe()}")
                norm.append(k)
            elif isinstance(k, slice):
                start = 0 if k.start is None else k.start
                stop = size if k.stop is None else k.stop
                step = 1 if k.step is None else k.step
                if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           for v in (start, stop, step)):
                    raise TypeError(f"slice bounds must be Python ints, got {k!r}")
                if step <= 0 or not 0 <= start < stop <= size:
                    fail("index-bounds", f"slice {start}:{stop}:{step} on dim {dim} of "
                                         f"{self.describe()}")
                if dim == 0 and self.on_chip and step != 1:
                    fail("partition-dim", f"strided access along the partition dim of "
                                          f"{self.describe()}")
                norm.append(slice(int(start), int(stop), int(step)))
            else:
                raise TypeError(f"NKI tensors take int and slice indices, got {type(k).__name__}")
        if self.on_chip:
            if isinstance(norm[0], int):
                norm[0] = slice(norm[0], norm[0] + 1)
            if sum(isinstance(k, slice) for k in norm) < 2:
                last = max(i for i, k in enumerate(norm) if isinstance(k, int))
                norm[last] = slice(norm[last], norm[last] + 1)
        return NkiTensor(self._alloc, self._idx[tuple(norm)], root=False)

    def ap(self, pattern, offset=0, scalar_offset=None, vector_offset=None, indirect_dim=0):
        """Raw access pattern ``[[step, num], ...]`` over this tensor's storage.

        With ``vector_offset`` (an SBUF ``[P, 1]`` int tensor) row ``w`` of the view starts at
        ``offset + vector_offset[w] * stride(indirect_dim)``; with ``scalar_offset`` (an SBUF
        ``[1, 1]`` int tensor) the whole view moves by ``scalar_offset * stride(indirect_dim)``.
        Both are runtime values, so the view is an ``IndirectView`` that only DMA accepts.
        """
        program()
        if not self._root:
            fail("access-pattern", f".ap() needs an allocated tensor, not a view of "
                                   f"{self.describe()}")
        try:
            steps = [int(s) for s, _ in pattern]
            nums = [int(n) for _, n in pattern]
        except (TypeError, ValueError):
            raise TypeError(f"pattern must be a list of [step, num] pairs, "
                            f"got {pattern!r}") from None
        if not nums or any(n <= 0 for n in nums):
            fail("access-pattern", f"pattern counts must be positive, got {pattern!r}")
        if self.on_chip:
            free = int(np.prod(self.shape[1:]))
            if steps[0] != free or nums[0] > self.shape[0]:
                fail("access-pattern", f"the partition entry of an SBUF/PSUM pattern must be "
                                       f"[{free}, <= {self.shape[0]}], got {pattern[0]!r}")
        if vector_offset is not None or scalar_offset is not None:
            return IndirectView(self, steps, nums, int(offset), scalar_offset, vector_offset,
                                int(indirect_dim))
        idx = _pattern_index(steps, nums, int(offset))
        if idx.min() < 0 or idx.max() >= self._alloc.data.size:
            fail("index-bounds", f"pattern {pattern!r} offset {offset} leaves "
                                 f"{self.describe()}")
        return NkiTensor(self._alloc, idx, root=False)

    # Kernel code describes work for the engines; it never sees values on the host.
    def _no_host(self, *args, **kwargs):
        fail("host-access", f"kernel code cannot read the values of {self.describe()} on the "
                            f"host; compute with nki.isa instructions")

    __array__ = __bool__ = __float__ = __int__ = __index__ = __iter__ = __len__ = _no_host

    def __setitem__(self, key, value):
        fail("host-access", f"assignment into {self.describe()}: write tensors with nki.isa "
                            f"instructions (dst=...)")


def _pattern_index(steps, nums, offset) -> np.ndarray:
    idx = np.full([1] * len(nums), offset, dtype=np.int64)
    for dim, (step, num) in enumerate(zip(steps, nums, strict=True)):
        shape = [1] * len(nums)
        shape[dim] = num
        idx = idx + step * np.arange(num, dtype=np.int64).reshape(shape)
    return np.broadcast_to(idx, nums).copy()


class IndirectView:
    """An access pattern whose start depends on runtime offsets held in SBUF (DMA only)."""

    def __init__(self, base: NkiTensor, steps, nums, offset, scalar_offset, vector_offset,
                 indirect_dim):
        if scalar_offset is not None and vector_offset is not None:
            fail("indirect-access", "vector_offset and scalar_offset are mutually exclusive")
        if base.buffer.kind != "hbm":
            fail("indirect-access", f"runtime offsets index HBM tensors, not {base.describe()}")
        if not 0 <= indirect_dim < base.ndim:
            fail("indirect-access", f"indirect_dim {indirect_dim} for {base.describe()}")
        offsets = vector_offset if vector_offset is not None else scalar_offset
        if not isinstance(offsets, NkiTensor) or offsets.buffer.kind != "sbuf":
            fail("indirect-access", "runtime offsets must be an SBUF tensor")
        if offsets.dtype not in (int32, uint32):
            fail("indirect-access", f"runtime offsets must be int32/uint32, got "
                                    f"{dtype_name(offsets.dtype)}")
        want = (nums[0], 1) if vector_offset is not None else (1, 1)
        if offsets.shape != want:
            fail("indirect-access", f"{'vector' if vector_offset is not None else 'scalar'}"
                                    f"_offset must have shape {want}, got {offsets.shape}")
        self.base = base
        self.steps, self.nums, self.offset = steps, nums, offset
        self.offsets = offsets
        self.per_row = vector_offset is not None
        self.indirect_dim = indirect_dim
        self.stride = int(np.prod(base.shape[indirect_dim + 1:]))

    shape = property(lambda self: tuple(self.nums))
    dtype = property(lambda self: self.base.dtype)
    buffer = property(lambda self: self.base.buffer)

    def describe(self):
        return f"indirect view {list(self.nums)} of {self.base.describe()}"

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat storage indices and a per-element in-bounds mask, from the offsets' values."""
        offs = read_values(self.offsets).astype(np.int64).reshape(-1)
        size = self.base._alloc.data.size
        limit = self.base.shape[self.indirect_dim]
        if self.per_row:
            static = _pattern_index([0] + self.steps[1:], self.nums, self.offset)
            shift = (offs * self.stride).reshape([-1] + [1] * (len(self.nums) - 1))
            idx = static + shift
            row_ok = (offs >= 0) & (offs < limit)
            ok = np.broadcast_to(row_ok.reshape(shift.shape), idx.shape)
        else:
            idx = _pattern_index(self.steps, self.nums, self.offset) + offs[0] * self.stride
            ok = np.full(idx.shape, 0 <= offs[0] < limit)
        ok = ok & (idx >= 0) & (idx < size)
        return idx, ok


def new_tensor(shape, dtype, buffer: Buffer, name: str = "") -> NkiTensor:
    """Allocate (nl.ndarray): on-chip rules, capacity accounting, NaN/sentinel fill."""
    prog = program()
    if not isinstance(buffer, Buffer):
        fail("memory-space", f"buffer must be nl.sbuf, nl.psum or an HBM buffer, got {buffer!r}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        fail("shape-mismatch", f"tensor shape must be positive sizes, got {shape}")
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES + INT_DTYPES:
        fail("dtype", f"unsupported dtype {dtype}")
    if buffer.kind != "hbm":
        if len(shape) < 2:
            fail("partition-dim", f"an {buffer.name} tensor needs a partition dim and a free "
                                  f"dim, got shape {shape}")
        if shape[0] > PARTITIONS:
            fail("partition-dim", f"number of partitions {shape[0]} of {name or 'tensor'} "
                                  f"exceeds the architecture limit of {PARTITIONS}")
    if buffer is shared_hbm and prog.program_id > 0:
        # Same launch, same kernel text: the n-th shared allocation is program 0's n-th.
        alloc = prog.shared[prog.shared_seen]
        prog.shared_seen += 1
        if alloc.shape != shape or alloc.dtype != dtype:
            fail("kernel-output", "programs of one launch allocated different shared_hbm tensors")
        return NkiTensor(alloc, np.arange(alloc.data.size).reshape(shape), root=True)

    fill = np.nan if dtype in FLOAT_DTYPES else UNINIT_INT
    data = np.full(math.prod(shape), fill, dtype=dtype)
    alloc = _Alloc(data, shape, buffer, name, np.zeros(data.size, dtype=bool))
    per_partition = math.prod(shape[1:]) * dtype.itemsize
    if buffer.kind == "psum":
        if per_partition > prog.target.psum_tile_bytes:
            fail("psum-bank", f"PSUM tile {name or ''}{list(shape)} {dtype_name(dtype)} needs "
                              f"{per_partition} bytes per partition; {prog.target.name} "
                              f"allows {prog.target.psum_tile_bytes} (a bank is "
                              f"{PSUM_BANK_BYTES})")
        banks = -(-per_partition // PSUM_BANK_BYTES)
        if prog.psum_banks + banks > PSUM_BANKS:
            fail("psum-capacity", f"PSUM tile {name or ''}{list(shape)} needs {banks} bank(s) "
                                  f"with {prog.psum_banks} of {PSUM_BANKS} live")
        prog.psum_banks += banks
        prog.stats.peak_psum_banks = max(prog.stats.peak_psum_banks, prog.psum_banks)
        weakref.finalize(alloc, _release, prog, "psum", banks)
    elif buffer.kind == "sbuf":
        limit = prog.target.sbuf_partition_bytes
        if prog.sbuf_bytes + per_partition > limit:
            fail("sbuf-capacity", f"SBUF tile {name or ''}{list(shape)} needs {per_partition} "
                                  f"bytes per partition with {prog.sbuf_bytes} live; "
                                  f"{prog.target.name} has {limit}")
        prog.sbuf_bytes += per_partition
        prog.stats.peak_sbuf_bytes = max(prog.stats.peak_sbuf_bytes, prog.sbuf_bytes)
        weakref.finalize(alloc, _release, prog, "sbuf", per_partition)
    elif buffer is shared_hbm:
        prog.shared.append(alloc)
        prog.shared_seen += 1
    return NkiTensor(alloc, np.arange(data.size).reshape(shape), root=True)


def read_values(t: NkiTensor) -> np.ndarray:
    """The elements of ``t`` (in its dtype); reading unwritten memory is an error."""
    alloc = t._alloc
    if alloc.written is not None:
        seen = alloc.written[t._idx]
        if not seen.all():
            fail("uninitialized-read", f"{t.describe()} has {int((~seen).sum())} element(s) "
                                       f"no instruction wrote")
    return alloc.data[t._idx]


def write_values(t: NkiTensor, values: np.ndarray, *, mask: np.ndarray | None = None,
                 from_matmul: bool = False):
    """Store ``values`` (already in ``t.dtype``) into ``t``, where ``mask`` allows."""
    alloc = t._alloc
    idx = t._idx if mask is None else t._idx[mask]
    vals = values if mask is None else values[mask]
    alloc.data[idx] = vals
    if alloc.written is not None:
        alloc.written[idx] = True
    if alloc.mm_written is not None:
        alloc.mm_written[idx] = from_matmul


# ----------------------------------------------------------------------------------------------
# Kernels: nki.jit, launches, the Python-subset lint
# ----------------------------------------------------------------------------------------------

def _hashable_arg(value) -> bool:
    if isinstance(value, (bool, int, float, str, type(None), np.dtype, Buffer)):
        return True
    if isinstance(value, tuple):
        return all(_hashable_arg(v) for v in value)
    return False


class _Linter(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where = where

    def visit_Compare(self, node):
        for op in node.ops:
            if isinstance(op, (ast.Is, ast.IsNot)):
                fail("python-subset", f"{self.where} line {node.lineno}: 'is'/'is not' is not "
                                      f"supported by the NKI compiler; use ==/!=")
        self.generic_visit(node)


_LINTED: set = set()  # kernels (with their sub-kernels) that passed


def _lint_function(fn, top_level: bool, seen: set):
    if fn in seen or fn.__name__ == "<lambda>":  # lambdas: test harness one-liners
        return
    seen.add(fn)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return
    tree = ast.parse(source)
    node = tree.body[0]
    where = f"{fn.__module__}.{fn.__qualname__}"
    if top_level and isinstance(node, ast.FunctionDef):
        args = node.args
        if args.vararg or args.kwarg or args.kwonlyargs:
            fail("python-subset", f"{where}: kernel parameters cannot use *args, **kwargs or "
                                  f"keyword-only arguments")
    _Linter(where).visit(node)
    # Sub-kernels called by name from the same package are compiled (inlined) with the kernel.
    package = (fn.__module__ or "").rpartition(".")[0]
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            target = fn.__globals__.get(sub.id)
            if (inspect.isfunction(target) and target is not fn
                    and (target.__module__ or "").rpartition(".")[0] == package):
                _lint_function(target, False, seen)


class Kernel:
    """``@nki.jit`` kernel: call it with NumPy arrays (and constants), get NumPy arrays back."""

    def __init__(self, fn, num_programs: int = 1):
        self.fn = fn
        self.num_programs = num_programs
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __getitem__(self, grid):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid not in (1, 2):
            fail("lnc", f"{self.__name__}[{grid!r}]: the launch bracket takes the logical core "
                        f"degree 1 or 2; multi-dimensional SPMD grids do not exist in NKI")
        return Kernel(self.fn, grid)

    def __call__(self, *args, **kwargs):
        global _PROGRAM
        if _PROGRAM is not None and not _PROGRAM.closed:
            fail("python-subset", f"{self.__name__} is called from inside a kernel; sub-kernels "
                                  f"must not carry @nki.jit")
        if self.fn not in _LINTED:
            _lint_function(self.fn, True, set())
            _LINTED.add(self.fn)
        target = current_target()
        inputs = []  # (numpy array, alloc) to copy back if the kernel wrote into a copy

        def wrap(value):
            if isinstance(value, np.ndarray):
                if value.dtype not in FLOAT_DTYPES + INT_DTYPES:
                    fail("dtype", f"{self.__name__}: input of dtype {value.dtype} is not an NKI "
                                  f"dtype")
                arr = value if (value.flags.c_contiguous and value.flags.writeable) \
                    else np.ascontiguousarray(value).copy()
                alloc = _Alloc(arr.reshape(-1), arr.shape, private_hbm, "input", None)
                inputs.append((value, arr))
                return NkiTensor(alloc, np.arange(arr.size).reshape(arr.shape), root=True)
            if not _hashable_arg(value):
                fail("kernel-args", f"{self.__name__}: argument {value!r} is not a NumPy array "
                                    f"or hashable constant (use tuples, not lists)")
            return value

        args = [wrap(a) for a in args]
        kwargs = {k: wrap(v) for k, v in kwargs.items()}
        shared: list = []
        programs = []
        result = None
        for pid in range(self.num_programs):
            prog = _Program(self.__name__, target, pid, self.num_programs, shared)
            _PROGRAM = prog
            try:
                returned = self.fn(*args, **kwargs)
            finally:
                prog.closed = True
                _PROGRAM = None
            programs.append(prog.stats)
            if pid == 0:
                result = returned
        outputs = result if isinstance(result, tuple) else (result,)
        for out in outputs:
            if not (isinstance(out, NkiTensor) and out._root and out.buffer is shared_hbm):
                fail("kernel-output", f"{self.__name__} must return shared_hbm tensors it "
                                      f"allocated, got {out!r}")
            if not out._alloc.written.all():
                missing = int((~out._alloc.written).sum())
                fail("output-not-written", f"{self.__name__}: output {out.describe()} has "
                                           f"{missing} unwritten element(s)")
        for original, arr in inputs:
            if arr is not original:
                original[...] = arr
        _LAST[:] = programs
        for launches in _LAUNCHES:
            launches.append(programs)
        arrays = tuple(out._alloc.data.reshape(out.shape).copy() for out in outputs)
        return arrays if isinstance(result, tuple) else arrays[0]


def jit(fn=None):
    """``@nki.jit`` (also ``@nki.jit()``)."""
    if fn is None:
        return jit
    return Kernel(fn)


# nki.isa and nki.language as attributes of this stand-in for the ``nki`` package (they import
# this module, hence the imports at the end).
from ember.neuron_kernels import sim_isa as isa  # noqa: E402, F401
from ember.neuron_kernels import sim_language as language  # noqa: E402, F401
