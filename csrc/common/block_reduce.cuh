// Sums over a warp and over a thread block, for kernels that reduce one row per CTA.
#pragma once

namespace ember {

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over a 1-D block whose size is a multiple of 32, returned to every thread. Each
// warp folds its lanes with shuffles and leaves one partial in shared memory; after the single
// barrier every warp folds all partials itself, so no second barrier is needed to broadcast
// the result. The partials buffer is reused by every call: a kernel that reduces twice must
// __syncthreads() between the calls.
__device__ __forceinline__ float block_reduce_sum(float v) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_reduce_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x / 32;
  return warp_reduce_sum(lane < num_warps ? warp_sums[lane] : 0.f);
}

}  // namespace ember
