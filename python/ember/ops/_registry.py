"""Backend registry: which implementations exist for each op and which one runs.

Each op registers up to four implementations: ``cuda`` (csrc/ through ember._C), ``triton``
(triton_kernels/), ``nki`` (neuron_kernels/) and ``torch`` (the reference). An implementation
may be given as a callable or as a ``"module:function"`` string imported on first use, so that
importing ember never imports Triton or the NKI simulator.

Selection: ``backend="auto"`` (the default, overridden by the environment variable
``EMBER_BACKEND``) takes cuda > triton > torch for CUDA tensors and torch for CPU tensors.
An explicit ``backend=`` that cannot run raises a ``ValueError`` saying why.
"""

import importlib
import os
from collections.abc import Callable

import torch

from ember.ops import _ext

BACKENDS = ("cuda", "triton", "nki", "torch")
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")

_IMPLS: dict[str, dict[str, Callable | str]] = {}


def register(op: str, **impls: Callable | str) -> None:
    """Register implementations of ``op``: ``register("rms_norm", torch=fn, triton="m:f")``."""
    for backend, impl in impls.items():
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for op {op!r}; "
                             f"expected one of {BACKENDS}")
        _IMPLS.setdefault(op, {})[backend] = impl


def ops() -> list[str]:
    """Names of all registered ops."""
    return sorted(_IMPLS)


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _runtime_missing(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None if it can."""
    if backend == "cuda":
        if _ext.load_extension() is None:
            return f"ember._C is not built ({_ext.extension_error()})"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    elif backend == "triton" and not _triton_usable():
        return "triton is not installed, or there is no GPU and TRITON_INTERPRET=1 is not set"
    return None


def available_backends(op: str) -> list[str]:
    """Backends that implement ``op`` and can run on this machine, in preference order."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; ember.ops has {ops()}")
    return [b for b in BACKENDS if b in _IMPLS[op] and _runtime_missing(b) is None]


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Pick the backend that runs ``op`` on tensors on ``device``.

    ``backend`` is "auto" or one of BACKENDS. Returns a concrete backend name.
    """
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; ember.ops has {ops()}")
    impls = _IMPLS[op]
    preferred = backend
    if backend == "auto":
        preferred = os.environ.get("EMBER_BACKEND", "auto") or "auto"
    if preferred not in ("auto", *BACKENDS):
        source = "EMBER_BACKEND" if backend == "auto" else "backend"
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {preferred!r}")

    if backend == "auto":
        # The environment variable is a preference: ops without that backend fall back to auto.
        if preferred != "auto" and preferred in impls and _device_ok(preferred, device) is None:
            return preferred
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
        for name in order:
            if name in impls and _device_ok(name, device) is None:
                return name
        raise ValueError(f"{op}: no backend can run on device {device}")

    if preferred not in impls:
        have = sorted(impls)
        raise ValueError(f"{op}: backend {preferred!r} is not implemented; implemented: {have}")
    why = _device_ok(preferred, device)
    if why is not None:
        raise ValueError(f"{op}: backend {preferred!r} cannot run: {why}")
    return preferred


def resolve_supported(op: str, registry_op: str, backend: str, device: torch.device,
                      unsupported: str | None) -> str:
    """``resolve(registry_op, ...)`` for inputs the kernel backends may not take: with
    ``unsupported`` (why the kernels cannot take them) "auto" picks torch, whatever
    EMBER_BACKEND prefers, and an explicit kernel backend raises a ValueError naming ``op``."""
    if unsupported is None:
        return resolve(registry_op, backend, device)
    chosen = resolve(registry_op, "torch" if backend == "auto" else backend, device)
    if chosen != "torch":
        raise ValueError(f"{op}: backend {chosen!r} does not support {unsupported}; "
                         f"use backend='torch' or 'auto'")
    return chosen


def _device_ok(backend: str, device: torch.device) -> str | None:
    missing = _runtime_missing(backend)
    if missing:
        return missing
    if backend == "cuda" and device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}"
    return None


def implementation(op: str, backend: str) -> Callable:
    """The callable registered for ``op`` on ``backend`` (imported on first use)."""
    impl = _IMPLS[op][backend]
    if isinstance(impl, str):
        module, _, name = impl.partition(":")
        impl = getattr(importlib.import_module(module), name)
        _IMPLS[op][backend] = impl
    return impl
