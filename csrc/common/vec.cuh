// Vectorised element access for memory-bound kernels: a vector of up to 16 bytes moved by one
// load or store, float conversions of the element types, and the host-side test of whether a
// tensor's rows may be accessed with 16-byte vectors.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common/common.h"

namespace ember {

// Elements of T in one 16-byte vector: 8 for fp16/bf16, 4 for fp32.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

// N consecutive elements. A Vec of 16 bytes or more is 16-byte aligned and moves in 128-bit
// accesses (a 32-byte one, 8 float cos values next to 8 half features, in two); a narrower one
// keeps its elements' alignment and moves element by element, so Vec<T, 1> and Vec<T, 2> are
// safe at any element address and one kernel body serves the vector and the scalar path.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : alignof(T)) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, like torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One leading (non-contiguous) dim of a tensor: its size and its stride in elements.
struct LeadingDim {
  int64_t size, stride;
};

// Whether every row (the contiguous last dim) of a tensor of T starts on a 16-byte boundary:
// the same rule as rows_16b_aligned in python/ember/ops/_validation.py. Strides of size-1 dims
// never reach an address. The caller also needs the row length to be a whole number of vectors.
template <typename T>
inline bool rows_16b_aligned(const void* base, std::initializer_list<LeadingDim> leading_dims) {
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0) return false;
  for (const LeadingDim& d : leading_dims) {
    if (d.size > 1 && d.stride % kVec16<T> != 0) return false;
  }
  return true;
}

}  // namespace ember
