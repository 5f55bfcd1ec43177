#pragma once
#include <cstdint>

namespace ember {

// silu_and_mul over rows of 2 * inner elements (gate features, then up). x has a contiguous
// last dim and any row stride (in elements); out is dense and never aliases x.
struct SiluAndMulParams {
  const void* x;    // [rows, 2 * inner]
  void* out;        // [rows, inner]: silu(gate) * up
  int64_t rows, inner, x_row_stride;
};

void silu_and_mul(const SiluAndMulParams& p, int dtype, std::intptr_t stream);

}  // namespace ember
