"""AWS NKI kernels of ember, installed as ``ember.neuron_kernels``, with the CPU simulator used
when the real ``nki`` package is not importable."""
