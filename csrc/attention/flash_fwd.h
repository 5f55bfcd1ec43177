// FlashAttention-2 forward: parameters shared by the kernel, the launchers and the bindings.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ember {

// One struct serves batch mode and varlen mode.
//
// Batch mode: cu_seqlens_q/k are null; every sequence has seqlen_q queries and seqlen_k keys, and
// row `i` of sequence `b` is at `ptr + b * batch_stride + i * row_stride + h * head_stride`.
// Varlen mode: cu_seqlens_q/k (int32, [batch + 1]) give each sequence's first token; the batch
// strides are 0, row `i` of sequence `b` is token `cu_seqlens[b] + i`, and seqlen_q / seqlen_k
// hold the maximum lengths (they size the grid only; the kernel reads each sequence's own length).
//
// Strides are in elements; the head_dim axis is contiguous, and every row starts on a 16-byte
// boundary (the Python side guarantees both). The LSE of query token `t` (its index counted from
// the start of its sequence in batch mode, from the start of the packed tensor in varlen mode)
// and head `h` is at `lse + b * lse_batch_stride + h * lse_head_stride + t`.
struct FlashFwdParams {
  const void* q;  // [batch, seqlen_q, heads_q, head_dim] or [total_q, heads_q, head_dim]
  const void* k;  // [batch, seqlen_k, heads_kv, head_dim] or [total_k, heads_kv, head_dim]
  const void* v;
  void* out;      // shaped like q
  float* lse;     // [batch, heads_q, seqlen_q] or [heads_q, total_q], natural log
  const int* cu_seqlens_q;  // varlen only, else nullptr
  const int* cu_seqlens_k;
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  float softmax_scale;  // multiplies q.k before the softmax
  float scale_log2;     // softmax_scale * log2(e): the kernel works in base 2
  // Key j is visible to query i of a sequence with lengths (sq, sk) iff
  // i + (sk - sq) - window_left <= j <= i + (sk - sq) + window_right, a bound of -1 being
  // absent. Causal attention arrives as window_right = 0.
  int window_left, window_right;
};

// Launches the forward kernel for p.head_dim (64, 96, 128 or 256) and the dtype code
// (fp16 or bf16) on `stream`. Throws std::invalid_argument on an unsupported configuration.
void flash_attn_fwd(const FlashFwdParams& p, int dtype, std::intptr_t stream);

// One per head dim, each in its own translation unit so they compile in parallel.
void run_flash_fwd_hdim64(const FlashFwdParams& p, int dtype, cudaStream_t stream);
void run_flash_fwd_hdim96(const FlashFwdParams& p, int dtype, cudaStream_t stream);
void run_flash_fwd_hdim128(const FlashFwdParams& p, int dtype, cudaStream_t stream);
void run_flash_fwd_hdim256(const FlashFwdParams& p, int dtype, cudaStream_t stream);

}  // namespace ember
