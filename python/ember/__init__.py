"""ember: hand-written LLM inference kernels (CUDA C++, Triton, NKI) and a minimal engine."""

__version__ = "0.1.0"

from ember import ops  # noqa: E402,F401
