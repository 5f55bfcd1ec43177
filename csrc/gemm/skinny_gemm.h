#pragma once
#include <cstdint>

namespace ember {

// y = x @ weight^T (+ bias) for a few rows of x (1 <= m <= 16), accumulated in float32: the
// decode-time linear layer, which streams the weight once.
struct SkinnyGemmParams {
  // [m, k] with a contiguous last dim and any row stride (in elements); with silu_and_mul,
  // [m, 2k] = [gate | up] and the GEMM input is silu(gate) * up rounded to the dtype.
  const void* x;
  const void* weight;  // [n, k], contiguous
  const void* bias;    // [n], contiguous, or nullptr
  void* y;             // [m, n], dense
  int64_t m, n, k, x_row_stride;
  bool silu_and_mul;
  // The caller promises that no kernel before this one on the stream writes `weight`: it may
  // then be read before those kernels finish (see csrc/common/pdl.cuh).
  bool static_weight;
};

// Every tensor has dtype `dtype` (fp16 or bf16); k is a multiple of 8 and x's rows and the
// weight start on 16-byte boundaries. num_sms sizes the grid to fill the device.
void skinny_gemm(const SkinnyGemmParams& p, int num_sms, int dtype, std::intptr_t stream);

}  // namespace ember
