// store_kvcache: scatter new K/V rows into a paged cache by slot index.
//
// Pure data movement. Bytes moved per token: 2 * heads * head_dim * (in_bytes + cache_bytes)
// plus 8 for the slot index; no FLOPs (an fp8 cache adds one divide per element). The bar is
// the device-to-device copy bandwidth.
//
// One CTA handles TOKENS_PER_CTA tokens; each thread moves one 16-byte input vector
// (8 half-precision elements) of K and the matching one of V, so loads are coalesced along
// head_dim and two independent loads are in flight per thread.
#include <type_traits>

#include "common/common.h"
#include "common/vec.cuh"
#include "kvcache/store_cache.cuh"
#include "kvcache/store_kvcache.h"

namespace ember {
namespace {

constexpr int kVec = 8;  // 16-bit elements per 16-byte vector
constexpr int kThreads = 256;

// TCache: T, or Fp8 for a float8_e4m3fn cache.
template <typename T, typename TCache>
__global__ void __launch_bounds__(kThreads) store_kvcache_kernel(StoreKVCacheParams p) {
  constexpr bool kFp8Cache = std::is_same_v<TCache, Fp8>;
  const int64_t vecs_per_head = p.head_dim / kVec;
  const int64_t vecs_per_token = p.num_heads * vecs_per_head;
  const int64_t total = p.num_tokens * vecs_per_token;
  const float k_scale = kFp8Cache ? *p.k_scale : 1.f;
  const float v_scale = kFp8Cache ? *p.v_scale : 1.f;

  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t token = i / vecs_per_token;
    const int64_t rem = i - token * vecs_per_token;
    const int64_t head = rem / vecs_per_head;
    const int64_t col = (rem - head * vecs_per_head) * kVec;
    const int64_t slot = p.slot_mapping[token];
    if (slot < 0) continue;
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot - block * p.block_size;

    const Vec<T, kVec> kv = load_vec<kVec>(
        static_cast<const T*>(p.k) + token * p.k_stride_token + head * p.k_stride_head + col);
    const Vec<T, kVec> vv = load_vec<kVec>(
        static_cast<const T*>(p.v) + token * p.v_stride_token + head * p.v_stride_head + col);
    const int64_t kc = block * p.kc_stride_block + offset * p.kc_stride_slot +
                       head * p.kc_stride_head + col;
    const int64_t vc = block * p.vc_stride_block + offset * p.vc_stride_slot +
                       head * p.vc_stride_head + col;
    // The cache is taken to be dense (rows of head_dim, a multiple of 8), so the 8 elements at
    // col, a multiple of 8, are aligned to their size: 16 bytes, or 8 in an fp8 cache.
    store_cache_vec</*kAligned=*/true>(static_cast<TCache*>(p.k_cache) + kc, kv, k_scale);
    store_cache_vec</*kAligned=*/true>(static_cast<TCache*>(p.v_cache) + vc, vv, v_scale);
  }
}

}  // namespace

void store_kvcache(const StoreKVCacheParams& p, int input_dtype, int cache_dtype,
                   std::intptr_t stream) {
  if (p.num_tokens == 0) return;
  const int64_t total = p.num_tokens * p.num_heads * (p.head_dim / kVec);
  // Grid-stride loop: enough CTAs to fill any GPU several times over, capped for huge inputs.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  const bool fp8 = static_cast<DType>(cache_dtype) == DType::kFloat8E4M3;
  if (!fp8 && cache_dtype != input_dtype) unsupported_dtype("store_kvcache(cache)", cache_dtype);
  EMBER_DISPATCH_HALF_TYPES(input_dtype, "store_kvcache", [&] {
    if (fp8) {
      store_kvcache_kernel<scalar_t, Fp8><<<blocks, kThreads, 0, as_stream(stream)>>>(p);
    } else {
      store_kvcache_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, as_stream(stream)>>>(p);
    }
  });
  check_launch("store_kvcache_kernel");
}

}  // namespace ember
