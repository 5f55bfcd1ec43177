"""Weight-quantized GEMMs on a NeuronCore: ``w8a16_gemm`` (int8 weights, per output channel
scales) and ``fp8_gemm`` (e4m3 weights with per-channel scales, activations quantised to e4m3
per token on the device), in the formats of ``ember.ops.quant``.

TensorE takes no integers and, before NeuronCore-v4 (trn3), not the OCP ``float8_e4m3fn``
the weights are stored in; both are exact in bf16/fp16, so the weight tiles travel from HBM at
1 byte per element and are widened on the copy out of the TensorE transpose (the tile they
would be copied by anyway), then multiply in the activations' 16-bit type with float32
accumulation. The per-channel scales are applied once per output tile, after accumulation.
"""

from ember.neuron_kernels import host
from ember.neuron_kernels.matmul import linear
from ember.neuron_kernels.nki_api import nki, nl


@nki.jit
def w8a16_kernel(x, qweight, scale):
    """x ``[M, K]`` fp16/bf16/fp32, qweight int8 ``[N, K]``, scale float32 ``[N]`` ->
    ``(x @ qweight^T) * scale`` ``[M, N]`` in x's dtype."""
    out = nl.ndarray((x.shape[0], qweight.shape[0]), dtype=x.dtype, buffer=nl.shared_hbm,
                     name="out")
    linear(out, x, qweight, x.dtype, col_scale=scale, scale_columns=True)
    return out


@nki.jit
def fp8_kernel(x, w_fp8, w_scale):
    """x ``[M, K]`` fp16/bf16/fp32, w_fp8 float8_e4m3fn ``[N, K]``, w_scale float32 ``[N]`` ->
    ``(q(x) @ w_fp8^T) * x_scale * w_scale`` ``[M, N]`` in x's dtype, q = per-row e4m3."""
    out = nl.ndarray((x.shape[0], w_fp8.shape[0]), dtype=x.dtype, buffer=nl.shared_hbm,
                     name="out")
    linear(out, x, w_fp8, nl.bfloat16, col_scale=w_scale, scale_columns=True, quantize_x=True)
    return out


def w8a16_gemm(x, qweight, scale):
    """Backend ``"w8a16_gemm"`` (arguments of ``ember.ops.quant.w8a16_gemm``)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, qweight.shape[0])
    out = w8a16_kernel(host.to_numpy(x), host.to_numpy(qweight), host.to_numpy(scale))
    return host.to_torch(out, x.device)


def fp8_gemm(x, w_fp8, w_scale):
    """Backend ``"fp8_gemm"`` (arguments of ``ember.ops.quant.fp8_gemm``)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w_fp8.shape[0])
    out = fp8_kernel(host.to_numpy(x), host.to_numpy(w_fp8), host.to_numpy(w_scale))
    return host.to_torch(out, x.device)
