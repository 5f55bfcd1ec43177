// rotary_embedding: rotate feature pairs of every q and k head by the token's position.
//
// Per token, with Hq + Hk heads of head_dim D and s-byte elements: every head is read and
// written once, 2 * (Hq + Hk) * D * s bytes, plus one cos/sin row (rotary_dim values of the
// cache; rows of recurring positions come from L2) and the position. Each rotated pair costs 6
// FLOPs (4 multiplies, 2 adds), 3 * (Hq + Hk) * rotary_dim FLOPs per token: under 1 FLOP/byte,
// memory-bound; the bar is the copy bandwidth.
//
// One CTA per token handles all its q and k heads (the work split of rotary.cuh). Features past
// rotary_dim (partial rotary) are copied, since the outputs are new tensors. Positions are clipped
// to [0, max_positions): an unchecked bad position (they are never read on the host) rotates by a
// wrong angle but never reads out of bounds.
#include <algorithm>
#include <stdexcept>

#include "common/common.h"
#include "common/vec.cuh"
#include "rotary/rotary.cuh"
#include "rotary/rotary.h"

namespace ember {
namespace {

template <typename T>
struct HeadRows {
  const T* in;
  T* out;
};

// Head h of the token: q's heads first, then k's.
template <typename T>
__device__ __forceinline__ HeadRows<T> head_rows(const RotaryParams& p, int64_t token, int h) {
  const bool is_q = h < p.heads_q;
  const HeadRows<T> r =
      is_q ? HeadRows<T>{static_cast<const T*>(p.q) + token * p.q_stride_token +
                             h * p.q_stride_head,
                         static_cast<T*>(p.out_q) + (token * p.heads_q + h) * p.head_dim}
           : HeadRows<T>{static_cast<const T*>(p.k) + token * p.k_stride_token +
                             (h - p.heads_q) * p.k_stride_head,
                         static_cast<T*>(p.out_k) +
                             (token * p.heads_k + h - p.heads_q) * p.head_dim};
  // The choice between q and k hides from the compiler that both are global memory; without
  // this it emits generic loads and stores, which cost an address-space check each.
  __builtin_assume(__isGlobal(r.in) && __isGlobal(r.out));
  return r;
}

template <typename T, typename TCache, typename TPos, bool kNeox, bool kVectorized>
__global__ void __launch_bounds__(kRotaryMaxThreads) rotary_embedding_kernel(const RotaryParams p) {
  constexpr int kPairs = pairs_per_item<T>(kNeox, kVectorized);
  constexpr int kCopy = kVectorized ? kVec16<T> : 1;  // elements per pass-through item
  const int64_t token = blockIdx.x;
  const int64_t pos = std::clamp<int64_t>(
      static_cast<const TPos*>(p.positions)[token * p.positions_stride], 0, p.max_positions - 1);
  const int half = p.rotary_dim / 2;
  const TCache* cos_row = static_cast<const TCache*>(p.cos_sin_cache) + pos * p.rotary_dim;
  const TCache* sin_row = cos_row + half;
  const int heads = p.heads_q + p.heads_k;

  for (int g = threadIdx.x; g < half / kPairs; g += blockDim.x) {
    const Vec<TCache, kPairs> cos = load_vec<kPairs>(cos_row + g * kPairs);
    const Vec<TCache, kPairs> sin = load_vec<kPairs>(sin_row + g * kPairs);
    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
      const HeadRows<T> r = head_rows<T>(p, token, h);
      rotate_item<kNeox>(r.in, g, half, cos, sin,
                         [&](int feature, const auto& out) { store_vec(r.out + feature, out); });
    }
  }

  const int tail_items = (p.head_dim - p.rotary_dim) / kCopy;
  const int num_threads = blockDim.x * blockDim.y;
  for (int w = threadIdx.y * blockDim.x + threadIdx.x; w < heads * tail_items; w += num_threads) {
    const int h = w / tail_items;
    const int feature = p.rotary_dim + (w - h * tail_items) * kCopy;
    const HeadRows<T> r = head_rows<T>(p, token, h);
    store_vec(r.out + feature, load_vec<kCopy>(r.in + feature));
  }
}

template <typename T, typename TCache>
void launch_rotary(const RotaryParams& p, bool positions_int64, cudaStream_t stream) {
  const bool vectorized =
      rotary_dims_vectorizable<T>(p.head_dim, p.rotary_dim, p.is_neox) &&
      rows_16b_aligned<T>(p.q, {{p.num_tokens, p.q_stride_token}, {p.heads_q, p.q_stride_head}}) &&
      rows_16b_aligned<T>(p.k, {{p.num_tokens, p.k_stride_token}, {p.heads_k, p.k_stride_head}}) &&
      rows_16b_aligned<T>(p.out_q, {{p.num_tokens * p.heads_q, p.head_dim}}) &&
      rows_16b_aligned<T>(p.out_k, {{p.num_tokens * p.heads_k, p.head_dim}}) &&
      rows_16b_aligned<TCache>(p.cos_sin_cache, {{p.max_positions, p.rotary_dim}});
  const dim3 block = rotary_block<T>(p.rotary_dim, p.heads_q + p.heads_k, p.is_neox, vectorized);
  const unsigned blocks = grid_x(p.num_tokens, "rotary_embedding");
  dispatch_rotary_variant(positions_int64, p.is_neox, vectorized, [&](auto pos, auto neox,
                                                                      auto vec) {
    rotary_embedding_kernel<T, TCache, decltype(pos), decltype(neox)::value, decltype(vec)::value>
        <<<blocks, block, 0, stream>>>(p);
  });
  check_launch("rotary_embedding_kernel");
}

}  // namespace

void rotary_embedding(const RotaryParams& p, int dtype, int cache_dtype, bool positions_int64,
                      std::intptr_t stream) {
  if (p.num_tokens == 0 || p.heads_q + p.heads_k == 0) return;
  if (p.max_positions < 1) {  // no row to clip the positions into
    throw std::invalid_argument("ember: rotary_embedding: cos_sin_cache has no rows");
  }
  EMBER_DISPATCH_FLOAT_TYPES(dtype, "rotary_embedding", [&] {
    if (static_cast<DType>(cache_dtype) == DType::kFloat32) {
      launch_rotary<scalar_t, float>(p, positions_int64, as_stream(stream));
    } else if (cache_dtype == dtype) {
      launch_rotary<scalar_t, scalar_t>(p, positions_int64, as_stream(stream));
    } else {
      unsupported_dtype("rotary_embedding(cos_sin_cache)", cache_dtype);
    }
  });
}

}  // namespace ember
