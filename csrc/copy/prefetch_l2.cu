// prefetch_l2: warm the L2 cache with the leading bytes of every row of a constant matrix while
// earlier kernels run.
//
// Why: a batch-1 decode step alternates phases that stream weights at copy bandwidth (the MLP's
// gate/up and down projections) with phases that are latency-bound and leave the memory idle
// (the attention over a few hundred keys, the RMSNorms): on the H100's Llama-3.2-1B step, ~10 us
// a layer in which DRAM could have moved ~30 MB. Requesting the first columns of the next
// weight then lets the GEMM that reads it start on L2 hits. A GEMM's CTAs all start at k = 0
// and walk K, so a prefix of every row (not the first rows whole) is what they read first.
// Measured on an H100 (bench/prefetch_probe.py): with 24 MB of the 1B gate/up weight requested
// before a 10 us gap, the cuBLAS GEMV after the gap took 21.5 instead of 23.0 us. In the 1B
// decode step it did not pay (the traffic slows the latency-bound attention it overlaps: -0.2%
// queued after the O projection, -0.8% issued by the O projection's kernel), so the engine does
// not use it (bench/results/engine_probes_h100.md, session 21).
//
// Bytes: rows * prefix_bytes requested from DRAM into L2; nothing is written. Work: one bulk
// prefetch instruction per row on sm_90 (cp.async.bulk.prefetch.L2: the copy engine walks the
// row), one prefetch per 128-byte line before that.
//
// The kernel issues its requests before waiting on the grids before it (the matrix is constant:
// no earlier kernel writes it), then waits, so that kernels launched after it still see every
// earlier kernel complete (programmatic dependencies chain only through completed grids).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/common.h"
#include "common/pdl.cuh"
#include "copy/prefetch_l2.h"

namespace ember {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxBlocks = 132;  // one row per thread covers 16896 rows in one pass

// One row's request; returns at once, nothing waits for the bytes.
__device__ __forceinline__ void prefetch_row(const char* row, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(row), "r"(bytes) : "memory");
#else
  constexpr uint32_t kLineBytes = 128;
  for (uint32_t offset = 0; offset < bytes; offset += kLineBytes) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + offset));
  }
#endif
}

__global__ void __launch_bounds__(kThreads)
    prefetch_l2_kernel(const char* base, int64_t rows, int64_t pitch, uint32_t prefix_bytes) {
  allow_dependent_launch();
  for (int64_t r = int64_t{blockIdx.x} * kThreads + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * kThreads) {
    prefetch_row(base + r * pitch, prefix_bytes);
  }
  wait_for_prior_grids();
}

}  // namespace

void prefetch_l2(const void* base, int64_t rows, int64_t pitch, int64_t prefix_bytes,
                 std::intptr_t stream) {
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || (rows > 1 && pitch % 16 != 0)) {
    throw std::invalid_argument("ember: prefetch_l2: the rows must start on 16-byte boundaries");
  }
  if (prefix_bytes <= 0 || prefix_bytes % 16 != 0 || prefix_bytes >= (int64_t{1} << 31) ||
      (rows > 1 && prefix_bytes > pitch)) {
    throw std::invalid_argument("ember: prefetch_l2: prefix_bytes must be a positive multiple of "
                                "16 within a row, got " + std::to_string(prefix_bytes));
  }
  if (rows <= 0) return;
  const int blocks =
      static_cast<int>(std::min<int64_t>((rows + kThreads - 1) / kThreads, kMaxBlocks));
  launch_with_pdl(prefetch_l2_kernel, dim3(blocks), dim3(kThreads), 0,
                  reinterpret_cast<cudaStream_t>(stream), "prefetch_l2_kernel",
                  static_cast<const char*>(base), rows, pitch,
                  static_cast<uint32_t>(prefix_bytes));
}

}  // namespace ember
