// rms_norm and fused_add_rms_norm: out = x / sqrt(mean(x^2) + eps) * weight, one CTA per row.
//
// Per row of H elements of s bytes: rms_norm reads x and writes out, 2 * H * s bytes, in about
// 4H FLOPs (square and accumulate, then two multiplies); fused_add_rms_norm also reads the
// residual and writes the new one, 4 * H * s bytes in about 5H FLOPs. The weight (H * s) is read
// by every row but comes from L2 after the first. Under 1.5 FLOP/byte: memory-bound, the bar is
// the copy bandwidth.
//
// Two passes over the row. Pass 1 loads it (fused: adds the residual, rounds the sum to the
// dtype and stores it as the new residual) and accumulates the float32 sum of squares; a block
// reduction gives 1/rms; pass 2 loads the row again and writes row * inv_rms * weight, rounded
// once. The second load costs no DRAM traffic: each thread re-reads exactly the vectors it
// loaded (fused: stored) moments before, still in L1/L2 since a row is at most tens of KB.
// Keeping the row in registers instead saves that one L1/L2 round trip but needs the row length
// at compile time (one instantiation per hidden size, plus a fallback past the register budget);
// vLLM and FlashInfer re-read too.
//
// Loads and stores are 16-byte vectors when every row is 16-byte aligned and H is a whole
// number of vectors; otherwise the same code runs with one-element vectors.
#include <algorithm>

#include "common/block_reduce.cuh"
#include "common/common.h"
#include "common/pdl.cuh"
#include "common/vec.cuh"
#include "norm/norm.h"

namespace ember {
namespace {

constexpr int kMaxThreads = 1024;
// Row counts from which CTAs shrink to kThreadsManyRows threads (vLLM's rule). With few rows
// (decode) the GPU is mostly idle and a row spread over up to 1024 threads finishes soonest;
// with many, 256-thread CTAs put several rows on each SM in different phases, so one row's
// loads overlap another's barrier and reduction.
constexpr int64_t kManyRows = 256;
constexpr int kThreadsManyRows = 256;

template <typename T, bool kVectorized, bool kAddResidual>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(const RmsNormParams p, const float inv_hidden) {
  constexpr int kVec = kVectorized ? kVec16<T> : 1;
  allow_dependent_launch();
  wait_for_prior_grids();  // x and the residual come from the previous kernel
  const int64_t row = blockIdx.x;
  const int num_vecs = static_cast<int>(p.hidden / kVec);
  // Inputs are only read, and outputs are fresh tensors, so the inputs may take the read-only
  // path; the new residual, which pass 2 reads back, may not.
  const T* __restrict__ x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + row * p.hidden;
  T* residual_out = nullptr;
  const T* __restrict__ residual = nullptr;
  if constexpr (kAddResidual) {
    residual = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
    residual_out = static_cast<T*>(p.residual_out) + row * p.hidden;
  }

  float sum_squares = 0.f;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    Vec<T, kVec> v = load_vec<kVec>(x + i * kVec);
    if constexpr (kAddResidual) {
      const Vec<T, kVec> r = load_vec<kVec>(residual + i * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) + to_float(r.v[j]));
      store_vec(residual_out + i * kVec, v);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = to_float(v.v[j]);
      sum_squares += f * f;
    }
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_squares) * inv_hidden + p.eps);

  // Fused: the rounded sum is what gets normalised, as in an unfused add then rms_norm.
  const T* normalised = kAddResidual ? residual_out : x;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    const Vec<T, kVec> v = load_vec<kVec>(normalised + i * kVec);
    const Vec<T, kVec> w = load_vec<kVec>(weight + i * kVec);
    Vec<T, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      o.v[j] = from_float<T>(to_float(v.v[j]) * inv_rms * to_float(w.v[j]));
    }
    store_vec(out + i * kVec, o);
  }
}

template <typename T>
void launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  const bool fused = p.residual != nullptr;
  const bool vectorized =
      p.hidden % kVec16<T> == 0 && rows_16b_aligned<T>(p.x, {{p.rows, p.x_row_stride}}) &&
      rows_16b_aligned<T>(p.weight, {}) && rows_16b_aligned<T>(p.out, {{p.rows, p.hidden}}) &&
      (!fused || (rows_16b_aligned<T>(p.residual, {{p.rows, p.residual_row_stride}}) &&
                  rows_16b_aligned<T>(p.residual_out, {{p.rows, p.hidden}})));
  const int64_t num_vecs = p.hidden / (vectorized ? kVec16<T> : 1);
  const int64_t max_threads = p.rows < kManyRows ? kMaxThreads : kThreadsManyRows;
  // Whole warps: the block reduction needs them.
  const int threads = static_cast<int>((std::min(num_vecs, max_threads) + 31) / 32 * 32);
  const unsigned blocks = grid_x(p.rows, "rms_norm");
  // mean(x^2) as torch's CUDA mean computes it: the sum times 1/H, rounded once on the host.
  const float inv_hidden = 1.0f / static_cast<float>(p.hidden);
  dispatch_bool(vectorized, [&](auto vec) {
    dispatch_bool(fused, [&](auto add_residual) {
      launch_with_pdl(rms_norm_kernel<T, decltype(vec)::value, decltype(add_residual)::value>,
                      blocks, threads, 0, stream,
                      fused ? "fused_add_rms_norm_kernel" : "rms_norm_kernel", p, inv_hidden);
    });
  });
}

}  // namespace

void rms_norm(const RmsNormParams& p, int dtype, std::intptr_t stream) {
  if (p.rows == 0 || p.hidden == 0) return;
  EMBER_DISPATCH_FLOAT_TYPES(dtype, p.residual ? "fused_add_rms_norm" : "rms_norm",
                             [&] { launch_rms_norm<scalar_t>(p, as_stream(stream)); });
}

}  // namespace ember
