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

}  // namespace ember
