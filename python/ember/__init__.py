"""ember: hand-written LLM inference kernels (CUDA C++, Triton, NKI) and a minimal engine.

``ember.ops`` is the kernel API; ``ember.LLM`` and ``ember.SamplingParams`` the engine.
"""

__version__ = "0.1.0"

from ember import ops  # noqa: E402,F401
from ember.engine import LLM, SamplingParams  # noqa: E402,F401

__all__ = ["LLM", "SamplingParams", "ops"]
