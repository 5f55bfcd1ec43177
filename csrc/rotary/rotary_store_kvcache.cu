// rotary_embedding_and_store_kvcache: rotary_embedding of q and k fused with store_kvcache of the
// rotated k and of v, for the engine's decode step: one launch per layer instead of two, and the
// rotated k goes straight into its cache slot instead of through a temporary tensor.
//
// Per token, with Hq query and Hk kv heads of head_dim D, s-byte inputs and c-byte cache elements:
// reads (Hq + 2 Hk) D s bytes and writes Hq D s (the new q) plus 2 Hk D c (the cache slot), with a
// cos/sin row, the position and the slot; 3 (Hq + Hk) rotary_dim FLOPs (an fp8 cache adds one
// divide per element). Memory-bound, like its two parts; unfused, the rotated k also makes a round
// trip through global memory (2 Hk D s bytes more).
//
// One CTA per token, split as in rotary_embedding (rotary.cuh): threadIdx.x over the groups of
// pairs, threadIdx.y over the q heads then the k heads; a rotated q head goes to out_q, a k head to
// the token's k cache slot. Then all the CTA's threads copy the features past rotary_dim (partial
// rotary) of those heads, and the v heads into the v cache slot. A token whose slot is -1
// (padding) only rotates q; a slot past the end of the cache (values are not checked inside a CUDA
// graph) is dropped the same way rather than written out of bounds, and positions are clipped as
// in rotary_embedding. The rotation and its rounding are rotary_embedding's, and the rounded k and
// v are written with store_kvcache's conversion (store_cache.cuh), so the caches receive exactly
// what the two ops in sequence would have written.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/common.h"
#include "common/pdl.cuh"
#include "common/vec.cuh"
#include "kvcache/store_cache.cuh"
#include "rotary/rotary.cuh"
#include "rotary/rotary.h"

namespace ember {
namespace {

constexpr const char* kOp = "rotary_embedding_and_store_kvcache";

// TCos: float or T (the cos/sin cache); TCache: T or Fp8 (the KV caches).
template <typename T, typename TCos, typename TCache, typename TPos, bool kNeox, bool kVectorized>
__global__ void __launch_bounds__(kRotaryMaxThreads)
    rotary_store_kvcache_kernel(const RotaryStoreKVCacheParams p) {
  constexpr int kPairs = pairs_per_item<T>(kNeox, kVectorized);
  constexpr int kCopy = kVectorized ? kVec16<T> : 1;  // elements per pass-through item
  constexpr bool kFp8Cache = std::is_same_v<TCache, Fp8>;
  allow_dependent_launch();
  wait_for_prior_grids();  // q, k and v come from the previous kernel (the QKV projection)
  const int64_t token = blockIdx.x;
  const int64_t pos = std::clamp<int64_t>(
      static_cast<const TPos*>(p.positions)[token * p.positions_stride], 0, p.max_positions - 1);
  const int64_t slot = p.slot_mapping[token * p.slot_stride];
  const bool store = slot >= 0 && slot < p.num_blocks * p.block_size;
  const int64_t cache_block = store ? slot / p.block_size : 0;
  const int64_t cache_offset = store ? slot - cache_block * p.block_size : 0;
  TCache* const k_slot = static_cast<TCache*>(p.k_cache) + cache_block * p.kc_stride_block +
                         cache_offset * p.kc_stride_slot;
  const float k_scale = kFp8Cache ? *p.k_scale : 1.f;
  const int half = p.rotary_dim / 2;
  const TCos* cos_row = static_cast<const TCos*>(p.cos_sin_cache) + pos * p.rotary_dim;
  const TCos* sin_row = cos_row + half;
  // Heads to rotate: q's, then k's unless the token's k is not stored.
  const int heads = p.heads_q + (store ? p.heads_kv : 0);

  const auto input_row = [&](int h) {  // head h: q's heads first, then k's
    const T* in = h < p.heads_q ? static_cast<const T*>(p.q) + token * p.q_stride_token +
                                      h * p.q_stride_head
                                : static_cast<const T*>(p.k) + token * p.k_stride_token +
                                      (h - p.heads_q) * p.k_stride_head;
    // The choice between q and k hides from the compiler that both are global memory; without
    // this it emits generic loads, which cost an address-space check each.
    __builtin_assume(__isGlobal(in));
    return in;
  };
  // Features of head h from `feature` on: into the new q, or into the token's k cache slot.
  const auto store_head = [&](int h, int feature, const auto& x) {
    if (h < p.heads_q) {
      store_vec(static_cast<T*>(p.out_q) + (token * p.heads_q + h) * p.head_dim + feature, x);
    } else {
      store_cache_vec<kVectorized>(k_slot + (h - p.heads_q) * p.kc_stride_head + feature, x,
                                   k_scale);
    }
  };

  for (int g = threadIdx.x; g < half / kPairs; g += blockDim.x) {
    const Vec<TCos, kPairs> cos = load_vec<kPairs>(cos_row + g * kPairs);
    const Vec<TCos, kPairs> sin = load_vec<kPairs>(sin_row + g * kPairs);
    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
      rotate_item<kNeox>(input_row(h), g, half, cos, sin,
                         [&](int feature, const auto& out) { store_head(h, feature, out); });
    }
  }

  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  const int num_threads = blockDim.x * blockDim.y;
  const int tail_items = (p.head_dim - p.rotary_dim) / kCopy;
  for (int w = thread; w < heads * tail_items; w += num_threads) {
    const int h = w / tail_items;
    const int feature = p.rotary_dim + (w - h * tail_items) * kCopy;
    store_head(h, feature, load_vec<kCopy>(input_row(h) + feature));
  }

  if (!store) return;
  TCache* const v_slot = static_cast<TCache*>(p.v_cache) + cache_block * p.vc_stride_block +
                         cache_offset * p.vc_stride_slot;
  const float v_scale = kFp8Cache ? *p.v_scale : 1.f;
  const int v_items = p.head_dim / kCopy;
  for (int w = thread; w < p.heads_kv * v_items; w += num_threads) {
    const int h = w / v_items;
    const int feature = (w - h * v_items) * kCopy;
    const T* in = static_cast<const T*>(p.v) + token * p.v_stride_token + h * p.v_stride_head;
    store_cache_vec<kVectorized>(v_slot + h * p.vc_stride_head + feature,
                                 load_vec<kCopy>(in + feature), v_scale);
  }
}

template <typename T, typename TCos, typename TCache>
void launch_rotary_store_kvcache(const RotaryStoreKVCacheParams& p, bool positions_int64,
                                 cudaStream_t stream) {
  // Beyond rotary_embedding's conditions, v and both caches need aligned rows too. Every vector
  // is kVec16<T> elements at a multiple of kVec16<T> in its row, so an fp8 one (8 or 4 bytes)
  // is then aligned to its size.
  const bool vectorized =
      rotary_dims_vectorizable<T>(p.head_dim, p.rotary_dim, p.is_neox) &&
      rows_16b_aligned<T>(p.q, {{p.num_tokens, p.q_stride_token}, {p.heads_q, p.q_stride_head}}) &&
      rows_16b_aligned<T>(p.k, {{p.num_tokens, p.k_stride_token}, {p.heads_kv, p.k_stride_head}}) &&
      rows_16b_aligned<T>(p.v, {{p.num_tokens, p.v_stride_token}, {p.heads_kv, p.v_stride_head}}) &&
      rows_16b_aligned<T>(p.out_q, {{p.num_tokens * p.heads_q, p.head_dim}}) &&
      rows_16b_aligned<TCos>(p.cos_sin_cache, {{p.max_positions, p.rotary_dim}}) &&
      rows_16b_aligned<TCache>(p.k_cache, {{p.num_blocks, p.kc_stride_block},
                                           {p.block_size, p.kc_stride_slot},
                                           {p.heads_kv, p.kc_stride_head}}) &&
      rows_16b_aligned<TCache>(p.v_cache, {{p.num_blocks, p.vc_stride_block},
                                           {p.block_size, p.vc_stride_slot},
                                           {p.heads_kv, p.vc_stride_head}});
  const dim3 block = rotary_block<T>(p.rotary_dim, p.heads_q + p.heads_kv, p.is_neox, vectorized);
  const unsigned blocks = grid_x(p.num_tokens, kOp);
  dispatch_rotary_variant(positions_int64, p.is_neox, vectorized, [&](auto pos, auto neox,
                                                                      auto vec) {
    launch_with_pdl(rotary_store_kvcache_kernel<T, TCos, TCache, decltype(pos),
                                                decltype(neox)::value, decltype(vec)::value>,
                    blocks, block, 0, stream, "rotary_store_kvcache_kernel", p);
  });
}

}  // namespace

void rotary_embedding_and_store_kvcache(const RotaryStoreKVCacheParams& p, int dtype,
                                        int cos_sin_dtype, int cache_dtype, bool positions_int64,
                                        std::intptr_t stream) {
  if (p.num_tokens == 0 || p.heads_q + p.heads_kv == 0) return;
  const std::string op = std::string("ember: ") + kOp + ": ";
  if (p.max_positions < 1) {  // no row to clip the positions into
    throw std::invalid_argument(op + "cos_sin_cache has no rows");
  }
  const bool fp8 = static_cast<DType>(cache_dtype) == DType::kFloat8E4M3;
  if (!fp8 && cache_dtype != dtype) {
    unsupported_dtype("rotary_embedding_and_store_kvcache(cache)", cache_dtype);
  }
  if (fp8 && (p.k_scale == nullptr || p.v_scale == nullptr)) {
    throw std::invalid_argument(op + "fp8 caches need k_scale and v_scale");
  }
  const bool float_cos_sin = static_cast<DType>(cos_sin_dtype) == DType::kFloat32;
  if (!float_cos_sin && cos_sin_dtype != dtype) {
    unsupported_dtype("rotary_embedding_and_store_kvcache(cos_sin_cache)", cos_sin_dtype);
  }
  EMBER_DISPATCH_FLOAT_TYPES(dtype, kOp, [&] {
    dispatch_bool(float_cos_sin, [&](auto float_cos_sin_flag) {
      using TCos = std::conditional_t<decltype(float_cos_sin_flag)::value, float, scalar_t>;
      dispatch_bool(fp8, [&](auto fp8_flag) {
        using TCache = std::conditional_t<decltype(fp8_flag)::value, Fp8, scalar_t>;
        launch_rotary_store_kvcache<scalar_t, TCos, TCache>(p, positions_int64,
                                                            as_stream(stream));
      });
    });
  });
}

}  // namespace ember
