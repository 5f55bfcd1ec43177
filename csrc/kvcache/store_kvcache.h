#pragma once
#include <cstdint>

namespace ember {

// Strides are in elements; the head_dim axis is contiguous for every tensor.
struct StoreKVCacheParams {
  const void* k;            // [num_tokens, num_heads, head_dim]
  const void* v;
  void* k_cache;            // [num_blocks, block_size, num_heads, head_dim]
  void* v_cache;
  const int64_t* slot_mapping;  // [num_tokens], block * block_size + offset, -1 = skip
  const float* k_scale;     // fp8 caches only: cache = value / scale
  const float* v_scale;
  int64_t num_tokens, num_heads, head_dim, block_size;
  int64_t k_stride_token, k_stride_head, v_stride_token, v_stride_head;
  int64_t kc_stride_block, kc_stride_slot, kc_stride_head;
  int64_t vc_stride_block, vc_stride_slot, vc_stride_head;
};

void store_kvcache(const StoreKVCacheParams& p, int input_dtype, int cache_dtype,
                   std::intptr_t stream);

}  // namespace ember
