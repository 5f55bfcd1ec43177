// multi_copy: several small copies, between device memory and pinned host memory in any
// direction, done by one kernel.
//
// Why a kernel and not cudaMemcpyAsync: a decode step's inputs (token ids, positions, sampling
// parameters, block-table rows: a few hundred bytes to a few KB) and its sampled ids go through
// the copy engines as separate stream operations, and on the H100 each switch between a
// copy-engine operation and a kernel on the stream left 5-8 us idle (torch profiler trace of a
// batch-1 Llama-3.2-1B step: 20-26 us from the sampler's end to the next step's first kernel,
// for 6 us of transfers). A kernel reads and writes pinned host memory directly over the bus
// (unified addressing maps it into the device's address space) and queues behind the previous
// kernel like any other.
//
// Bytes: each region's rows * row_bytes, read once and written once; nothing else. Work: grid
// (blocks, regions); the threads of a region's blocks stride over its 16-byte vectors when the
// region's pointers, row size and pitches are multiples of 16, else over its bytes.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/common.h"
#include "common/pdl.cuh"
#include "copy/multi_copy.h"

namespace ember {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerRegion = 32;

template <typename Unit>
__device__ void copy_region(const CopyRegion& r) {
  const int64_t units_per_row = r.row_bytes / int64_t{sizeof(Unit)};
  const int64_t total = r.rows * units_per_row;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t row = i / units_per_row;
    const int64_t unit = i - row * units_per_row;
    const Unit value =
        reinterpret_cast<const Unit*>(static_cast<const char*>(r.src) + row * r.src_pitch)[unit];
    reinterpret_cast<Unit*>(static_cast<char*>(r.dst) + row * r.dst_pitch)[unit] = value;
  }
}

bool vector_aligned(const CopyRegion& r) {
  const auto a = [](int64_t v) { return v % 16 == 0; };
  return a(reinterpret_cast<std::intptr_t>(r.dst)) && a(reinterpret_cast<std::intptr_t>(r.src)) &&
         a(r.row_bytes) && (r.rows == 1 || (a(r.dst_pitch) && a(r.src_pitch)));
}

// The parameters travel by value (kernel parameter space), so the kernel reads no host state.
__global__ void __launch_bounds__(kThreads)
    multi_copy_kernel(const MultiCopyParams p, const unsigned vector_mask) {
  allow_dependent_launch();
  wait_for_prior_grids();  // sources may be written, destinations read, by earlier kernels
  const int region = blockIdx.y;
  if ((vector_mask >> region) & 1u) {
    copy_region<uint4>(p.regions[region]);
  } else {
    copy_region<unsigned char>(p.regions[region]);
  }
}

void* device_address(void* host, const char* what) {
  void* device = nullptr;
  const cudaError_t err = cudaHostGetDevicePointer(&device, host, 0);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    throw std::invalid_argument(std::string("ember: multi_copy: ") + what +
                                " is host memory the device cannot address (is it pinned?): " +
                                cudaGetErrorString(err));
  }
  return device;
}

}  // namespace

void multi_copy(MultiCopyParams p, std::intptr_t stream) {
  if (p.count < 1 || p.count > kMaxCopyRegions) {
    throw std::invalid_argument("ember: multi_copy: 1 to " + std::to_string(kMaxCopyRegions) +
                                " regions per launch, got " + std::to_string(p.count));
  }
  unsigned vector_mask = 0;
  int64_t most_units = 0;
  for (int i = 0; i < p.count; ++i) {
    CopyRegion& r = p.regions[i];
    if (r.rows < 0 || r.row_bytes < 0 || (r.rows > 1 && (r.dst_pitch < r.row_bytes ||
                                                          r.src_pitch < r.row_bytes))) {
      throw std::invalid_argument("ember: multi_copy: region " + std::to_string(i) +
                                  " has negative sizes or rows that overlap");
    }
    if (r.dst_on_host) r.dst = device_address(r.dst, "a destination");
    if (r.src_on_host) r.src = device_address(const_cast<void*>(r.src), "a source");
    const bool vectors = vector_aligned(r);
    vector_mask |= unsigned{vectors} << i;
    most_units = std::max(most_units, r.rows * (vectors ? r.row_bytes / 16 : r.row_bytes));
  }
  if (most_units == 0) return;
  const int blocks = static_cast<int>(
      std::min<int64_t>((most_units + kThreads - 1) / kThreads, kMaxBlocksPerRegion));
  launch_with_pdl(multi_copy_kernel, dim3(blocks, p.count), dim3(kThreads), 0,
                  reinterpret_cast<cudaStream_t>(stream), "multi_copy_kernel", p, vector_mask);
}

}  // namespace ember
