#pragma once
#include <cstdint>

namespace ember {

// RMSNorm over rows of `hidden` elements. Inputs have a contiguous last dim and any row stride
// (in elements); outputs are dense [rows, hidden] and never alias the inputs.
struct RmsNormParams {
  const void* x;             // [rows, hidden]
  const void* residual;      // [rows, hidden] for fused_add_rms_norm, else nullptr
  const void* weight;        // [hidden], contiguous
  void* out;                 // [rows, hidden]: normalised row * weight
  void* residual_out;        // fused only, [rows, hidden]: x + residual rounded to the dtype
  int64_t rows, hidden;
  int64_t x_row_stride, residual_row_stride;
  float eps;
};

// rms_norm, or fused_add_rms_norm when p.residual is set. Every tensor has dtype `dtype`.
void rms_norm(const RmsNormParams& p, int dtype, std::intptr_t stream);

}  // namespace ember
