// Requests into L2 of the leading bytes of a constant matrix's rows, issued by a kernel for a
// later kernel that streams the matrix (see csrc/copy/prefetch_l2.cu for why).
#pragma once

#include <cstdint>

#include "common/prefetch_l2.h"

namespace ember {

// One row's request: a single bulk prefetch on sm_90 (the copy engine walks the row), one
// prefetch per 128-byte line before that. Returns at once; nothing waits for the bytes.
__device__ __forceinline__ void prefetch_row_l2(const char* row, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(row), "r"(bytes) : "memory");
#else
  constexpr uint32_t kLineBytes = 128;
  for (uint32_t offset = 0; offset < bytes; offset += kLineBytes) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + offset));
  }
#endif
}

// Every row of `r`, shared among `threads` threads of which this is `thread`.
__device__ __forceinline__ void prefetch_rows_l2(const L2PrefetchRows& r, int64_t thread,
                                                 int64_t threads) {
  for (int64_t row = thread; row < r.rows; row += threads) {
    prefetch_row_l2(static_cast<const char*>(r.base) + row * r.pitch, r.bytes);
  }
}

}  // namespace ember
