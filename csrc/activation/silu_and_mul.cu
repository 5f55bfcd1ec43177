// silu_and_mul: out = silu(gate) * up for x = [gate | up], the SwiGLU of Llama-style MLPs.
//
// Per row of I outputs with s-byte elements: reads 2 * I * s bytes, writes I * s, about 5I FLOPs
// (negate, exp, add, divide, multiply, counting exp as one): memory-bound, the bar is the copy
// bandwidth.
//
// The grid is rows x column blocks (rows on x, which holds 2^31 - 1, since prefill may pass more
// than 65535 tokens); each thread computes one 16-byte vector of outputs from one vector of gate
// and one of up, two independent loads in flight. When a row, the up half or out is not 16-byte
// aligned, the same code runs with one-element vectors.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "activation/activation.h"
#include "common/common.h"
#include "common/vec.cuh"

namespace ember {
namespace {

constexpr int kMaxThreads = 256;

// silu(g) = g / (1 + exp(-g)) in float32, the form of the reference and of torch's silu kernel.
// The build's --use_fast_math makes expf and the division the hardware approximations: about
// 1e-6 relative in float32 for |g| <= 10 (growing with -g, where silu itself vanishes), far
// below the rounding to fp16/bf16.
__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kMaxThreads) silu_and_mul_kernel(const SiluAndMulParams p) {
  constexpr int kVec = kVectorized ? kVec16<T> : 1;
  const int64_t row = blockIdx.x;
  const int64_t col = (int64_t{blockIdx.y} * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.inner) return;
  const T* gate = static_cast<const T*>(p.x) + row * p.x_row_stride + col;
  const Vec<T, kVec> g = load_vec<kVec>(gate);
  const Vec<T, kVec> u = load_vec<kVec>(gate + p.inner);
  Vec<T, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    out.v[j] = from_float<T>(silu(to_float(g.v[j])) * to_float(u.v[j]));
  }
  store_vec(static_cast<T*>(p.out) + row * p.inner + col, out);
}

template <typename T>
void launch_silu_and_mul(const SiluAndMulParams& p, cudaStream_t stream) {
  // inner a whole number of vectors: the up half and every out row start aligned like x's rows.
  const bool vectorized = p.inner % kVec16<T> == 0 &&
                          rows_16b_aligned<T>(p.x, {{p.rows, p.x_row_stride}}) &&
                          rows_16b_aligned<T>(p.out, {{p.rows, p.inner}});
  const int64_t num_vecs = p.inner / (vectorized ? kVec16<T> : 1);
  const int threads = static_cast<int>(std::min<int64_t>((num_vecs + 31) / 32 * 32, kMaxThreads));
  const int64_t column_blocks = (num_vecs + threads - 1) / threads;
  if (column_blocks > 65535) {
    throw std::invalid_argument("ember: silu_and_mul: rows of " + std::to_string(2 * p.inner) +
                                " features exceed the grid's 65535 column blocks");
  }
  const dim3 grid(grid_x(p.rows, "silu_and_mul"), static_cast<unsigned>(column_blocks));
  dispatch_bool(vectorized, [&](auto vec) {
    silu_and_mul_kernel<T, decltype(vec)::value><<<grid, threads, 0, stream>>>(p);
  });
  check_launch("silu_and_mul_kernel");
}

}  // namespace

void silu_and_mul(const SiluAndMulParams& p, int dtype, std::intptr_t stream) {
  if (p.rows == 0 || p.inner == 0) return;
  EMBER_DISPATCH_FLOAT_TYPES(dtype, "silu_and_mul",
                             [&] { launch_silu_and_mul<scalar_t>(p, as_stream(stream)); });
}

}  // namespace ember
