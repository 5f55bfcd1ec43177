"""Triton kernels of ember, installed as ``ember.triton_kernels``.

Each module holds one op family's kernels and a launcher taking already-validated tensors;
call them through ``ember.ops``, which validates inputs and chooses the backend.
"""
