// Folding attention states by their log-sum-exp, one query row per warp: shared by the
// merge_attn_states kernel (merge_states.cu) and the split-KV epilogue of the decode kernel,
// whose last split to finish folds all of them (decode_attention_kernel.cuh).
//
// States (o_s, lse_s) of the same query row over disjoint key sets merge into the attention over
// their union: lse = log(sum_s exp(lse_s)) and o = sum_s exp(lse_s - lse) * o_s. A state with
// lse = -inf saw no key and weighs nothing; a row whose states are all empty comes out as zeros
// with lse = -inf.
//
// Traffic: every state that saw keys read once and the result written once. Lane l handles
// columns l, l + 32, ..., so each load instruction of a warp covers a contiguous run of the row
// whatever the tensor's alignment.
#pragma once

#include <cstdint>

#include "common/vec.cuh"
#include "decode/decode_attention.h"

namespace ember {
namespace merge {

// Loads of state values as float. The float32 split partials were written by other CTAs of the
// same kernel: read them from L2 (ld.global.cg), never from a stale L1 line.
__device__ __forceinline__ float load_value(const float* x) { return __ldcg(x); }
template <typename T>
__device__ __forceinline__ float load_value(const T* x) { return to_float(*x); }

// The split-KV partials of flash_attn_with_kvcache, one float32 state per split.
struct SplitStates {
  StateRows<const float> first;
  int64_t o_split_stride, lse_split_stride;
  int count;
  __device__ __forceinline__ int size() const { return count; }
  __device__ __forceinline__ StateRows<const float> state(int s) const {
    StateRows<const float> r = first;
    r.o += s * o_split_stride;
    r.lse += s * lse_split_stride;
    return r;
  }
};

// merge_attn_states' two inputs.
template <typename T>
struct PairStates {
  StateRows<const T> a, b;
  __device__ __forceinline__ int size() const { return 2; }
  __device__ __forceinline__ StateRows<const T> state(int s) const { return s == 0 ? a : b; }
};

// Folds the states of row (b, pos, head) into `out`; called by all 32 lanes of a warp.
template <typename TIn, typename TOut, int kHeadDim, class States>
__device__ __forceinline__ void merge_row(const States& states, const StateRows<TOut>& out,
                                          int64_t b, int pos, int head, int lane) {
  constexpr int kPerLane = kHeadDim / 32;
  // Each state's load is a round trip to L2; a loop that waits for one state before asking for
  // the next pays that latency once per state, which at 32 splits cost more than the whole K/V
  // stream of a 4k-key decode. So the lse of 32 states are read per warp load (lane l reads
  // state s0 + l), those of the first kLseGroups groups all at once, first for the common
  // maximum, then to find the states that saw keys; only those rows are read, kBatch states at
  // a time, all in flight together. The round trips are what the last split's fold costs (at
  // batch 1 and 84 splits, 11 of them before the lse loads were issued together and the
  // batches doubled, 4 after). Empty states are common: the split count is planned from the
  // cache's capacity (so that CUDA graphs can be captured), and a short sequence leaves most
  // splits without keys.
  constexpr int kLseGroups = 4;
  const int count = states.size();
  const auto state_lse = [&](int s) {
    if (s >= count) return -INFINITY;
    const StateRows<const TIn> st = states.state(s);
    return load_value(st.lse + b * st.lse_batch_stride + head * st.lse_head_stride + pos);
  };
  float group_lse[kLseGroups];  // states 32 g + lane, kept for the second pass
#pragma unroll
  for (int g = 0; g < kLseGroups; ++g) group_lse[g] = state_lse(32 * g + lane);
  float top = -INFINITY;
#pragma unroll
  for (int g = 0; g < kLseGroups; ++g) top = fmaxf(top, group_lse[g]);
  for (int s0 = 32 * kLseGroups; s0 < count; s0 += 32) top = fmaxf(top, state_lse(s0 + lane));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));

  // About 64 row values per lane in flight per batch.
  constexpr int kBatch = kPerLane >= 64 ? 1 : (64 / kPerLane < 32 ? 64 / kPerLane : 32);
  float sum = 0.f;  // sum of exp(lse_s - top)
  float acc[kPerLane] = {};
  for (int s0 = 0; s0 < count; s0 += 32) {
    float my_lse = -INFINITY;
#pragma unroll
    for (int g = 0; g < kLseGroups; ++g) {
      if (s0 == 32 * g) my_lse = group_lse[g];
    }
    if (s0 >= 32 * kLseGroups) my_lse = state_lse(s0 + lane);
    // States of this group of 32 with keys (lse = -inf weighs nothing; its o may hold anything).
    uint32_t live = __ballot_sync(0xffffffffu, my_lse != -INFINITY);
    while (live != 0) {  // warp-uniform: every lane holds the same mask
      float lse[kBatch];
      float v[kBatch][kPerLane];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        lse[u] = -INFINITY;  // past the last live state: no weight
        if (live != 0) {
          const int bit = __ffs(live) - 1;
          live &= live - 1;
          lse[u] = __shfl_sync(0xffffffffu, my_lse, bit);
          const StateRows<const TIn> st = states.state(s0 + bit);
          const TIn* o =
              st.o + b * st.o_batch_stride + pos * st.o_row_stride + head * st.o_head_stride;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) v[u][i] = load_value(o + lane + 32 * i);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (lse[u] != -INFINITY) {
          const float weight = __expf(lse[u] - top);
          sum += weight;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) acc[i] = fmaf(weight, v[u][i], acc[i]);
        }
      }
    }
  }

  const bool seen = sum > 0.f;
  const float inv = seen ? 1.f / sum : 0.f;
  TOut* dst = out.o + b * out.o_batch_stride + pos * out.o_row_stride + head * out.o_head_stride;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dst[lane + 32 * i] = from_float<TOut>(acc[i] * inv);
  if (lane == 0) {
    out.lse[b * out.lse_batch_stride + head * out.lse_head_stride + pos] =
        seen ? top + __logf(sum) : -INFINITY;
  }
}

}  // namespace merge
}  // namespace ember
