"""AWS NKI kernels of ember, installed as ``ember.neuron_kernels``, with the CPU simulator used
when the real ``nki`` package is not importable.

Kernels (the ``nki`` backend of ``ember.ops``): ``attention`` (FlashAttention forward),
``decode_attention`` (decode/append over a KV cache with split-KV, and the LSE merge), ``moe``
(grouped GEMM), ``quant`` (int8 and fp8 weight GEMMs), ``matmul`` (tiled matmul and the driver
the GEMMs share); sub-kernels in ``tiles`` and ``attention_core``. ``nki_api`` is the one switch
between the real ``nki`` and the simulator (``simulator``, ``sim_language``, ``sim_isa``);
``host`` converts torch tensors to the NumPy arrays kernels take. See README.md.
"""
