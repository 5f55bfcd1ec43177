#pragma once
#include <cstdint>

namespace ember {

// Rotary position embedding of q and k. Inputs have a contiguous head_dim and any token/head
// strides (in elements), e.g. slices of a fused QKV projection; outputs are dense and never
// alias the inputs.
struct RotaryParams {
  const void* positions;        // [num_tokens] int32 or int64, clipped to [0, max_positions)
  const void* q;                // [num_tokens, heads_q, head_dim]
  const void* k;                // [num_tokens, heads_k, head_dim]
  const void* cos_sin_cache;    // dense [max_positions, rotary_dim]: cos half, then sin half
  void* out_q;                  // dense [num_tokens, heads_q, head_dim]
  void* out_k;                  // dense [num_tokens, heads_k, head_dim]
  int64_t num_tokens, max_positions;
  int heads_q, heads_k, head_dim, rotary_dim;  // rotary_dim even, <= head_dim
  int64_t positions_stride;
  int64_t q_stride_token, q_stride_head, k_stride_token, k_stride_head;
  bool is_neox;  // pairs (i, i + rotary_dim / 2); else gpt-j's (2i, 2i + 1)
};

// q, k and the outputs have dtype `dtype`; the cache has `cache_dtype`, float32 or `dtype`.
void rotary_embedding(const RotaryParams& p, int dtype, int cache_dtype, bool positions_int64,
                      std::intptr_t stream);

// rotary_embedding fused with store_kvcache of its k: q is rotated into a dense out_q; k, rotated,
// and v go into the token's slot of a paged cache (block * block_size + offset; -1, or any slot
// outside the cache, skips the token's k and v). Inputs have a contiguous head_dim and any
// token/head strides (in elements); the caches a contiguous head_dim.
struct RotaryStoreKVCacheParams {
  const void* positions;        // [num_tokens] int32 or int64, clipped to [0, max_positions)
  const void* q;                // [num_tokens, heads_q, head_dim]
  const void* k;                // [num_tokens, heads_kv, head_dim]
  const void* v;                // [num_tokens, heads_kv, head_dim]
  const void* cos_sin_cache;    // dense [max_positions, rotary_dim]: cos half, then sin half
  const int64_t* slot_mapping;  // [num_tokens]
  const float* k_scale;         // fp8 caches only: cache = value / scale
  const float* v_scale;
  void* out_q;                  // dense [num_tokens, heads_q, head_dim]
  void* k_cache;                // [num_blocks, block_size, heads_kv, head_dim]
  void* v_cache;
  int64_t num_tokens, max_positions, num_blocks, block_size;
  int heads_q, heads_kv, head_dim, rotary_dim;  // rotary_dim even, <= head_dim
  int64_t positions_stride, slot_stride;
  int64_t q_stride_token, q_stride_head, k_stride_token, k_stride_head;
  int64_t v_stride_token, v_stride_head;
  int64_t kc_stride_block, kc_stride_slot, kc_stride_head;
  int64_t vc_stride_block, vc_stride_slot, vc_stride_head;
  bool is_neox;  // pairs (i, i + rotary_dim / 2); else gpt-j's (2i, 2i + 1)
};

// q, k, v and out_q have dtype `dtype`; the cos/sin cache has `cos_sin_dtype`, float32 or `dtype`;
// the KV caches `cache_dtype`, `dtype` or float8_e4m3fn (which needs k_scale and v_scale).
void rotary_embedding_and_store_kvcache(const RotaryStoreKVCacheParams& p, int dtype,
                                        int cos_sin_dtype, int cache_dtype, bool positions_int64,
                                        std::intptr_t stream);

}  // namespace ember
