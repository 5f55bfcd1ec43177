// What the rotary kernels share (rotary_embedding, and rotary_embedding_and_store_kvcache): the
// pair rotation with its rounding points, the work split of a token's CTA and the dispatch of the
// kernel variants, so that both rotate bit for bit alike.
//
// A token's CTA is 2-D: threadIdx.x walks the groups of pairs, threadIdx.y the heads, so a thread
// loads its group's cos/sin once and applies it to every head it visits. With 16-byte aligned rows
// (and rotary_dim, head_dim whole numbers of vectors) a work item is one 16-byte vector of each
// half (neox) or of interleaved pairs (gpt-j); otherwise one pair.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/common.h"
#include "common/vec.cuh"

namespace ember {

constexpr int kRotaryMaxThreads = 512;

// Pairs per work item: neox's two halves each fill a 16-byte vector; gpt-j's interleaved pairs
// fill one between them.
template <typename T>
__host__ __device__ constexpr int pairs_per_item(bool neox, bool vectorized) {
  return !vectorized ? 1 : neox ? kVec16<T> : kVec16<T> / 2;
}

// (a, b) -> (a cos - b sin, b cos + a sin) in float32, each product rounded on its own as in the
// reference's tensor arithmetic (no FMA contraction): results match it bit for bit.
template <typename T>
__device__ __forceinline__ void rotate_pair(float a, float b, float cos, float sin, T& out_a,
                                            T& out_b) {
  out_a = from_float<T>(__fsub_rn(__fmul_rn(a, cos), __fmul_rn(b, sin)));
  out_b = from_float<T>(__fadd_rn(__fmul_rn(b, cos), __fmul_rn(a, sin)));
}

// Rotates work item g of one head row `in` (kPairs pairs, with their cos and sin) and hands each
// rotated vector to store(feature, vec), feature being the index of its first element.
template <bool kNeox, int kPairs, typename T, typename TCos, typename Store>
__device__ __forceinline__ void rotate_item(const T* in, int g, int half,
                                            const Vec<TCos, kPairs>& cos,
                                            const Vec<TCos, kPairs>& sin, Store&& store) {
  if constexpr (kNeox) {  // features g * kPairs + j and half + g * kPairs + j
    const int first = g * kPairs;
    const Vec<T, kPairs> a = load_vec<kPairs>(in + first);
    const Vec<T, kPairs> b = load_vec<kPairs>(in + first + half);
    Vec<T, kPairs> out_a, out_b;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      rotate_pair(to_float(a.v[j]), to_float(b.v[j]), to_float(cos.v[j]), to_float(sin.v[j]),
                  out_a.v[j], out_b.v[j]);
    }
    store(first, out_a);
    store(first + half, out_b);
  } else {  // features 2 * (g * kPairs + j) and the one after
    const int first = 2 * g * kPairs;
    const Vec<T, 2 * kPairs> ab = load_vec<2 * kPairs>(in + first);
    Vec<T, 2 * kPairs> out;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      rotate_pair(to_float(ab.v[2 * j]), to_float(ab.v[2 * j + 1]), to_float(cos.v[j]),
                  to_float(sin.v[j]), out.v[2 * j], out.v[2 * j + 1]);
    }
    store(first, out);
  }
}

// Whether head_dim and rotary_dim are whole numbers of 16-byte work items of T: vectors of each
// neox half, or of interleaved gpt-j pairs, and of the copied tail. (The rows' alignment is the
// caller's other condition.)
template <typename T>
inline bool rotary_dims_vectorizable(int head_dim, int rotary_dim, bool neox) {
  constexpr int kVec = kVec16<T>;
  return head_dim % kVec == 0 && rotary_dim % (neox ? 2 * kVec : kVec) == 0;
}

// A token's CTA: one thread per group of pairs along x (up to the limit), heads along y.
template <typename T>
inline dim3 rotary_block(int rotary_dim, int heads, bool neox, bool vectorized) {
  const int groups = rotary_dim / 2 / pairs_per_item<T>(neox, vectorized);
  dim3 block(std::min(groups, kRotaryMaxThreads));
  block.y = std::clamp<int>(kRotaryMaxThreads / block.x, 1, heads);
  return block;
}

// Calls f(TPos{}, neox, vectorized): the positions' integer type as a value of it, and the two
// flags as std::bool_constant, so that each kernel variant is compiled apart.
template <typename F>
inline void dispatch_rotary_variant(bool positions_int64, bool neox, bool vectorized, F&& f) {
  dispatch_bool(positions_int64, [&](auto int64_positions) {
    using TPos = std::conditional_t<decltype(int64_positions)::value, int64_t, int32_t>;
    dispatch_bool(neox, [&](auto neox_flag) {
      dispatch_bool(vectorized, [&](auto vectorized_flag) {
        f(TPos{}, neox_flag, vectorized_flag);
      });
    });
  });
}

}  // namespace ember
