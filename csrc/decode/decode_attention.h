// Decode / append attention over a KV cache (flash_attn_with_kvcache) and merging of partial
// attention states by their log-sum-exp (merge_attn_states): parameters and entry points shared
// by the kernels, the launchers and the bindings.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace ember {

// Strides are in elements of the tensor they describe; the head_dim axis is contiguous and, for
// q and the caches, every row starts on a 16-byte boundary (python/ember/ops/_cuda_decode.py
// guarantees both).
//
// The query rows of one (sequence, kv head) are packed GQA-style: packed row r is query position
// r / group of query head kv_head * group + r % group, with group = heads_q / heads_kv.
struct DecodeParams {
  const void* q;        // [batch, seqlen_q, heads_q, head_dim], fp16/bf16
  // Contiguous [batch, capacity, heads_kv, head_dim] (block_table == nullptr), or paged
  // [num_blocks, page_size, heads_kv, head_dim]; q's dtype or float8_e4m3fn.
  const void* k_cache;
  const void* v_cache;
  const int* seqlens_k;     // [batch] keys to attend per sequence (read in the kernel)
  const int* block_table;   // [batch, max_blocks] or nullptr (contiguous caches)
  const uint8_t* tree_mask; // bool [batch, seqlen_q, seqlen_q], contiguous, or nullptr
  const float* k_scale;     // fp8 caches: key = stored value * *k_scale
  const float* v_scale;
  // Final results: out like q (contiguous), lse float32 [batch, heads_q, seqlen_q].
  void* out;
  float* lse;
  // num_splits > 1: float32 partial results, out_part [num_splits, batch, seqlen_q, heads_q,
  // head_dim] and lse_part [num_splits, batch, heads_q, seqlen_q], and split_counters, int32
  // [batch, heads_kv, row blocks], zero on entry: the splits of a (sequence, kv head, row block)
  // count themselves in, and the last to finish folds all partials into out/lse and sets its
  // counter back to zero (so a captured CUDA graph can replay with the same buffer). Unused
  // (nullptr) when num_splits == 1.
  float* out_part;
  float* lse_part;
  int* split_counters;

  int batch, seqlen_q, heads_q, heads_kv, head_dim;
  int num_splits;
  int unsplit_tiles;  // a row block seeing at most this many tiles runs as one split
  int page_size, max_blocks;          // paged caches only
  // Keys one sequence's cache holds (max_len, or max_blocks * page_size). seqlens_k above it
  // are clamped: the public op rejects them on the host, but inside a captured CUDA graph no
  // value is checked, and a bad length must not turn into reads past the cache.
  int capacity;
  // Wide KV tiles (decode_tile_shape's wide shape; where it equals the narrow one, ignored).
  bool wide_tiles;
  uint32_t page_div_mul, page_div_shift;  // key / page_size as (umulhi(key, mul) >> shift)

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  // Batch stride of a contiguous cache, block stride of a paged one.
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // lse is contiguous over seqlen_q
  int64_t part_split_stride, part_batch_stride, part_row_stride, part_head_stride;
  int64_t lse_part_split_stride, lse_part_batch_stride, lse_part_head_stride;

  // Decode with a new token per sequence (seqlen_q = 1, 16-bit cache), else nullptr: seqlens_k
  // then counts the cached keys before it, and the kernel writes new_k (rotated when
  // rotary_cos is set) and new_v at that position, attending over seqlens_k + 1 keys. q is
  // rotated at the same position.
  const void* new_k;  // [batch, 1, heads_kv, head_dim], q's dtype
  const void* new_v;
  int64_t new_k_batch_stride, new_k_head_stride, new_v_batch_stride, new_v_head_stride;
  // [rotary_rows, rotary_dim / 2] (row strides below), float32 if rotary_float else q's dtype;
  // nullptr for no rotary. Pairs (2i, 2i + 1) if rotary_interleaved, else (i, i + dim / 2).
  const void* rotary_cos;
  const void* rotary_sin;
  int64_t rotary_cos_stride, rotary_sin_stride;
  int rotary_dim, rotary_rows;
  bool rotary_interleaved, rotary_float;

  float softmax_scale;
  // Key j is visible to query i iff i + diag - window_left <= j <= i + diag + window_right
  // (diag = seqlen_k - seqlen_q; a bound of -1 is absent; causal arrives as window_right = 0),
  // and, with a tree mask, j < diag or tree_mask[b, i, j - diag].
  int window_left, window_right;
};

// Sets p.page_size and the multiplier/shift with which the kernel divides a key index by it:
// for n < 2^31 and d >= 2, floor(n / d) == umulhi(n, ceil(2^(31 + l) / d)) >> (l - 1) with
// l = ceil(log2(d)) (the rounding error of the multiplier, under d / 2^(31 + l), cannot carry
// n * mul / 2^(31 + l) past the next integer).
inline void set_page_size(DecodeParams& p, int page_size) {
  p.page_size = page_size;
  if (page_size < 2) return;  // contiguous caches never divide; the launcher rejects bad sizes
  int l = 0;
  while ((int64_t{1} << l) < page_size) ++l;
  const uint64_t d = static_cast<uint64_t>(page_size);
  p.page_div_mul = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
  p.page_div_shift = static_cast<uint32_t>(l - 1);
}

// Query rows (block_m) and keys (block_n) per tile of the kernel that serves head_dim with
// `packed_rows` = (heads_q / heads_kv) * seqlen_q rows per (sequence, kv head), over a 16-bit or
// an fp8 cache, with narrow or wide tiles (the same shape where no wide one exists). Python
// plans the split-KV count in units of block_n keys and block_m-row blocks, so both sides must
// agree.
struct DecodeTileShape {
  int block_m, block_n;
};
DecodeTileShape decode_tile_shape(int head_dim, int packed_rows, bool fp8, bool wide);

// Runs the attention kernel (with p.num_splits > 1, its last split per row block folds the
// splits). dtype: code of q (fp16/bf16); cache_dtype: q's code or float8_e4m3fn. Throws
// std::invalid_argument on an unsupported configuration.
void flash_attn_with_kvcache(const DecodeParams& p, int dtype, int cache_dtype,
                             std::intptr_t stream);

// Rows of head_dim values indexed by (batch, position, head), with their LSE at
// lse + b * lse_batch_stride + head * lse_head_stride + position (const with T).
template <typename T>
struct StateRows {
  T* o;
  std::conditional_t<std::is_const<T>::value, const float, float>* lse;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
};

// merge_attn_states: out/lse = merge of states a and b, for `batch * positions * heads` rows.
void merge_attn_states(const StateRows<const void>& a, const StateRows<const void>& b,
                       const StateRows<void>& out, int batch, int positions, int heads,
                       int head_dim, int dtype, std::intptr_t stream);

// One per head dim, each in its own translation unit so they compile in parallel.
void run_decode_hdim64(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream);
void run_decode_hdim96(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream);
void run_decode_hdim128(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream);
void run_decode_hdim256(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream);

}  // namespace ember
