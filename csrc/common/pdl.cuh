// Programmatic dependent launch (PDL, Hopper and later): a kernel launched with
// `launch_with_pdl` may start while the kernel before it on the stream is still running, and
// must call `wait_for_prior_grids()` before it touches memory that earlier work writes or reads.
//
// Why: a batch-1 decode step is a chain of ~150 short kernels, most of them a few microseconds
// long. Without PDL each one starts only after its predecessor has drained, paying the launch
// latency and its own ramp-up in series. With it, the next kernel's CTAs are already resident
// when the previous one ends; a kernel whose leading work depends on nothing earlier (streaming
// a constant weight matrix into shared memory) can do that work before the wait.
//
// Rules every kernel launched this way follows:
// - `wait_for_prior_grids()` comes before the first access (read or write) of any tensor that
//   a previous kernel may write or may still read. It returns once every prior grid on the
//   stream has completed and its writes are visible; without PDL it is a no-op.
// - `allow_dependent_launch()` tells the hardware the next kernel may start its CTAs; ember's
//   kernels call it first thing, since the dependent kernel waits before reading anyway. It
//   takes effect once every CTA of this grid has called it or exited, so this grid is fully
//   resident before any dependent CTA is placed.
// - A kernel that is not launched with PDL (torch's, cuBLAS's) waits for full completion of its
//   predecessor as usual, so mixing the two is safe.
//
// EMBER_PDL=0 in the environment launches everything without the attribute (for A/B timing).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "common/common.h"

namespace ember {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether launches on the current device get the PDL attribute: compute capability 9.0 or
// later, and not switched off by EMBER_PDL=0.
inline bool pdl_enabled() {
  static const bool env_allows = [] {
    const char* v = std::getenv("EMBER_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return env_allows && current_device_cc_major() >= 9;
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...), with the PDL attribute where enabled.
template <typename... KernelArgs, typename... Args>
void launch_with_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                     cudaStream_t stream, const char* name, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

}  // namespace ember
