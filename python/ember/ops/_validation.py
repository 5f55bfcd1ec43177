"""Input validation shared by every op and backend.

Each check raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device,
layout or value) whose message names the op, the argument and what was expected. Kernels
never see inputs these checks reject.
"""

import contextlib
import contextvars
from collections.abc import Iterable, Sequence

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; ``shape`` entries of ``None`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{op}: {name} must have {' or '.join(map(str, allowed))} dims, "
                             f"got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(t.shape, shape, strict=True)
        ):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    if last_dim_contiguous and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension, "
                         f"got strides {t.stride()}")
    return t


def check_same(op: str, what: str, **values) -> None:
    """All keyword values must be equal (e.g. dtypes or sizes of several arguments)."""
    items = list(values.items())
    first_name, first = items[0]
    for name, value in items[1:]:
        if value != first:
            raise ValueError(f"{op}: {what} of {name} ({value}) must match {first_name} ({first})")


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(op: str, name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def check_fp8_scales(op: str, cache: torch.Tensor, k_scale, v_scale) -> None:
    """A float8_e4m3fn cache needs float32 one-element ``k_scale``/``v_scale`` on its device;
    any other cache takes none."""
    if cache.dtype == torch.float8_e4m3fn:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None:
                raise ValueError(f"{op}: {name} is required for a float8_e4m3fn cache")
            check_tensor(op, name, scale, dtypes=(torch.float32,), device=cache.device)
            if scale.numel() != 1:
                raise ValueError(f"{op}: {name} must hold one value, "
                                 f"got shape {tuple(scale.shape)}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{op}: k_scale/v_scale are only valid with a float8_e4m3fn cache")


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_window(op: str, window_size) -> tuple[int, int]:
    """``window_size=(left, right)``; -1 means unbounded on that side."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"{op}: window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"{op}: window_size {side} must be an int >= -1, got {value!r}")
    return int(left), int(right)


def check_softmax_scale(op: str, softmax_scale, head_dim: int) -> float:
    """Default 1/sqrt(head_dim); otherwise a finite positive float."""
    if softmax_scale is None:
        return head_dim ** -0.5
    scale = float(softmax_scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"{op}: softmax_scale must be a finite positive number, "
                         f"got {softmax_scale}")
    return scale


_VALUE_CHECKS_SKIPPED = contextvars.ContextVar("ember_value_checks_skipped", default=False)


@contextlib.contextmanager
def skip_value_checks():
    """Within this block, ops skip the checks that read tensor values back to the host: block
    table entries, cache lengths and slot ranges against the cache. Shape, dtype and layout
    checks still run.

    For a caller that builds those values itself and cannot afford the read-backs: each is a
    full device sync that stalls the launch queue. The engine's eager steps on a GPU run inside
    it (a prompt-chunk step made ~270 attention and cache-write calls, each one sync), as its
    CUDA graphs already do by construction. Out-of-range values then reach the kernels
    unchecked.
    """
    token = _VALUE_CHECKS_SKIPPED.set(True)
    try:
        yield
    finally:
        _VALUE_CHECKS_SKIPPED.reset(token)


def values_readable(device: torch.device) -> bool:
    """Whether checks that read tensor values back to the host may run now.

    Not inside ``skip_value_checks``, nor while a CUDA graph is being captured: the values do
    not exist yet (and a read-back would break the capture). Shape, dtype and layout checks
    always run.
    """
    return not (_VALUE_CHECKS_SKIPPED.get()
                or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


def rows_16b_aligned(t: torch.Tensor) -> bool:
    """Every row (last axis, contiguous) of ``t`` starts on a 16-byte boundary, as the CUDA
    kernels' 16-byte vector copies need. Strides of size-1 dims never reach an address."""
    elems = 16 // t.element_size()
    strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1]
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s % elems == 0 for s in strides))


def with_16b_aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when :func:`rows_16b_aligned`, else a contiguous copy. Layouts from a model
    or the engine are aligned (head dims are multiples of 8 elements); odd views pay a copy
    rather than a misaligned vector access."""
    return t if rows_16b_aligned(t) else t.contiguous()
