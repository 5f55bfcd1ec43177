"""ember.ops: the public kernel API, and the only entry point to kernels.

Every op has a torch reference (``ember.ops.reference``) and up to three hand-written backends
(``cuda``, ``triton``, ``nki``), chosen by the ``backend=`` keyword ("auto" by default, or the
``EMBER_BACKEND`` environment variable); ``available_backends(op)`` lists what can run here.

How an op module is laid out (see kvcache.py):
1. the public function: docstring with shapes and dtypes, validation through _validation.py,
   ``_registry.resolve`` for the backend, then the ``torch.ops.ember.<op>`` custom op;
2. the ``torch.library.custom_op`` and its fake implementation (torch.compile, CUDA graphs);
3. ``_registry.register(op, cuda=..., triton="module:function", torch=...)``.
"""

from ember.ops._registry import available_backends, ops
from ember.ops.kvcache import store_kvcache

__all__ = [
    "available_backends",
    "ops",
    "store_kvcache",
]
