"""Host side of the NKI backend: torch tensors in, NumPy arrays for the kernels, torch out.

``nki.jit`` kernels (real or simulated) take and return NumPy arrays; bfloat16 and fp8 arrays
use the ``ml_dtypes`` types. Conversions are views where the memory allows (no copy for
contiguous CPU tensors).
"""

import ml_dtypes
import numpy as np
import torch

# torch dtypes NumPy has no native type for: (same-size carrier torch dtype, NumPy dtype)
_VIEWS = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.bool: (torch.uint8, np.dtype(np.uint8)),
}
_BACK = {np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
         np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous host NumPy view (bool becomes uint8 0/1)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _VIEWS:
        carrier, np_dtype = _VIEWS[t.dtype]
        return t.view(carrier).numpy().view(np_dtype)
    return t.numpy()


def to_torch(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A kernel output as a torch tensor on ``device``."""
    a = np.ascontiguousarray(a)
    if a.dtype in _BACK:
        carrier, dtype = _BACK[a.dtype]
        return torch.from_numpy(a.view(carrier)).view(dtype).to(device)
    return torch.from_numpy(a).to(device)


def dtype_name(t: torch.Tensor) -> str:
    """The ``nki.language`` attribute name of ``t``'s dtype (kernels take dtypes by name, a
    hashable compile-time constant under both the real compiler and the simulator)."""
    return str(t.dtype).removeprefix("torch.")
