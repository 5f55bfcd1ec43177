// Helpers shared by the csrc/<family>/bindings_*.cpp files: Python passes device pointers as
// integers and strides (in elements) as tuples.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace ember {

template <typename T>
inline T* ptr_arg(std::intptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline int64_t stride_arg(const pybind11::tuple& strides, int i) {
  return strides[i].cast<int64_t>();
}

// The (batch, row, head) strides of q, k, v and out and the (batch, head) strides of lse into
// the fields every attention parameter block names alike (FlashFwdParams, DecodeParams).
template <class Params>
inline void set_attention_strides(Params& p, const pybind11::tuple& q, const pybind11::tuple& k,
                                  const pybind11::tuple& v, const pybind11::tuple& out,
                                  const pybind11::tuple& lse) {
  p.q_batch_stride = stride_arg(q, 0);
  p.q_row_stride = stride_arg(q, 1);
  p.q_head_stride = stride_arg(q, 2);
  p.k_batch_stride = stride_arg(k, 0);
  p.k_row_stride = stride_arg(k, 1);
  p.k_head_stride = stride_arg(k, 2);
  p.v_batch_stride = stride_arg(v, 0);
  p.v_row_stride = stride_arg(v, 1);
  p.v_head_stride = stride_arg(v, 2);
  p.o_batch_stride = stride_arg(out, 0);
  p.o_row_stride = stride_arg(out, 1);
  p.o_head_stride = stride_arg(out, 2);
  p.lse_batch_stride = stride_arg(lse, 0);
  p.lse_head_stride = stride_arg(lse, 1);
}

// The (token, head) strides of the k and v rows a kernel writes into a paged cache and the
// (block, slot, head) strides of the caches (StoreKVCacheParams, RotaryStoreKVCacheParams).
template <class Params>
inline void set_cache_write_strides(Params& p, const pybind11::tuple& k, const pybind11::tuple& v,
                                    const pybind11::tuple& k_cache,
                                    const pybind11::tuple& v_cache) {
  p.k_stride_token = stride_arg(k, 0);
  p.k_stride_head = stride_arg(k, 1);
  p.v_stride_token = stride_arg(v, 0);
  p.v_stride_head = stride_arg(v, 1);
  p.kc_stride_block = stride_arg(k_cache, 0);
  p.kc_stride_slot = stride_arg(k_cache, 1);
  p.kc_stride_head = stride_arg(k_cache, 2);
  p.vc_stride_block = stride_arg(v_cache, 0);
  p.vc_stride_slot = stride_arg(v_cache, 1);
  p.vc_stride_head = stride_arg(v_cache, 2);
}

}  // namespace ember
