// Writing K/V values into a paged cache of the inputs' dtype or of float8_e4m3fn. Shared by
// store_kvcache and rotary_embedding_and_store_kvcache, so that both quantise an fp8 cache the
// same way, bit for bit (and as the torch reference does).
#pragma once

#include <type_traits>

#include "common/common.h"
#include "common/vec.cuh"

namespace ember {

// One element of an fp8 (e4m3) cache.
using Fp8 = __nv_fp8_storage_t;

// Saturating round-to-nearest-even, like torch's clamp(-448, 448).to(float8_e4m3fn). The
// division is IEEE-rounded even under --use_fast_math, as torch's is.
__device__ __forceinline__ Fp8 to_e4m3(float x, float scale) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
}

// N fp8 elements (N a power of two up to 16). kAligned: the address is a multiple of N bytes, so
// they move in one access; otherwise byte by byte, safe at any address.
template <int N, bool kAligned>
struct alignas(kAligned ? N : 1) Fp8Vec {
  Fp8 v[N];
};

// Stores N values into a cache row at dst: unchanged into a cache of their own dtype (aligned as
// a Vec<T, N>, see vec.cuh), or as value / scale in e4m3 into an fp8 cache. x is taken by value
// and copied here rather than handed on to store_vec by reference: nvcc 13 then split the 16-byte
// stores of store_kvcache's freshly loaded vectors into 2-byte ones.
template <bool kAligned, typename TCache, typename T, int N>
__device__ __forceinline__ void store_cache_vec(TCache* dst, const Vec<T, N> x, float scale) {
  if constexpr (std::is_same_v<TCache, Fp8>) {
    Fp8Vec<N, kAligned> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = to_e4m3(to_float(x.v[j]), scale);
    *reinterpret_cast<Fp8Vec<N, kAligned>*>(dst) = out;
  } else {
    static_assert(std::is_same_v<TCache, T>, "a cache holds the inputs' dtype or fp8");
    *reinterpret_cast<Vec<T, N>*>(dst) = x;
  }
}

}  // namespace ember
