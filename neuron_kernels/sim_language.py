"""``nki.language`` as the simulator implements it: dtypes, buffers, tile sizes, allocation and
the operator identifiers that ``nki.isa`` instructions take (ALU operators, activation
functions). Only what ember's kernels use exists; the ``nl.*`` tile-level convenience
functions (``nl.exp(x)``, ``nl.matmul``...) are not part of that subset.
"""

from dataclasses import dataclass

import numpy as np

from ember.neuron_kernels import simulator as _sim
from ember.neuron_kernels.simulator import (  # noqa: F401  (re-exported names of nki.language)
    bfloat16,
    float8_e4m3,
    float8_e4m3fn,
    float8_e5m2,
    float16,
    float32,
    hbm,
    int8,
    int32,
    private_hbm,
    psum,
    sbuf,
    shared_hbm,
    uint8,
    uint32,
)


class tile_size:  # noqa: N801  (the NKI name)
    """Hardware tile limits (``nl.tile_size``)."""

    pmax = _sim.PARTITIONS                         # partitions of any on-chip tile
    psum_fmax = _sim.PSUM_BANK_BYTES // 4          # float32 per partition in one PSUM bank
    psum_bank_fmax = psum_fmax
    gemm_stationary_fmax = 128                     # free size of the matmul stationary operand
    gemm_moving_fmax = 512                         # free size of the matmul moving operand


def ndarray(shape, dtype, buffer=sbuf, name=""):
    """A new, uninitialised tensor (NaN / int sentinel until an instruction writes it)."""
    return _sim.new_tensor(shape, dtype, buffer, name)


def ds(start, size):
    """``nl.ds(start, size)``: the slice ``start:start + size``."""
    return slice(start, start + size)


def program_id(axis=0):
    """Index of this program in a ``kernel[2]`` (logical core) launch."""
    if axis != 0:
        _sim.fail("lnc", "launches have one axis (the logical core degree)")
    return _sim.program().program_id


def num_programs(axes=0):
    if axes != 0:
        _sim.fail("lnc", "launches have one axis (the logical core degree)")
    return _sim.program().num_programs


@dataclass(frozen=True, eq=False)
class Operator:
    """An NKI operator identifier passed to ``nki.isa`` instructions.

    kind: "arith" (float32 math), "cmp" (arithmetic comparison giving 1.0/0.0) or "act" (a
    ScalarE activation function). ``fn`` is its NumPy
    implementation; ``identity`` its reduction identity where it can reduce.
    """

    name: str
    kind: str
    fn: object
    identity: float | None = None
    valid: tuple | None = None  # valid input range of an activation function

    def __repr__(self):
        return f"nl.{self.name}"

    def __call__(self, *args, **kwargs):
        raise TypeError(f"nl.{self.name}(...) as a tile function is outside the simulated NKI "
                        f"subset; pass nl.{self.name} as the op of an nki.isa instruction")


def _exp(x):
    with np.errstate(over="ignore"):
        return np.exp(x)


# ALU operators (Vector/GpSimd engines)
add = Operator("add", "arith", np.add, 0.0)
subtract = Operator("subtract", "arith", np.subtract)
multiply = Operator("multiply", "arith", np.multiply, 1.0)
divide = Operator("divide", "arith", np.divide)
maximum = Operator("maximum", "arith", np.maximum, -np.inf)
minimum = Operator("minimum", "arith", np.minimum, np.inf)
equal = Operator("equal", "cmp", np.equal)
less = Operator("less", "cmp", np.less)
greater_equal = Operator("greater_equal", "cmp", np.greater_equal)

# Activation functions (ScalarE)
exp = Operator("exp", "act", _exp)
log = Operator("log", "act", np.log, valid=(2.0 ** -64, 2.0 ** 64))
