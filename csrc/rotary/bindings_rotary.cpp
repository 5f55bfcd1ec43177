// Python bindings of the rotary family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "common/binding_args.h"
#include "rotary/rotary.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_rotary(py::module_& m) {
  m.def(
      "rotary_embedding",
      [](intptr_t positions, intptr_t q, intptr_t k, intptr_t cos_sin_cache, intptr_t out_q,
         intptr_t out_k, int64_t num_tokens, int heads_q, int heads_k, int head_dim,
         int rotary_dim, int64_t max_positions, int64_t positions_stride, py::tuple q_strides,
         py::tuple k_strides, bool is_neox, bool positions_int64, int dtype, int cache_dtype,
         intptr_t stream) {
        RotaryParams p{};
        p.positions = ptr_arg<const void>(positions);
        p.q = ptr_arg<const void>(q);
        p.k = ptr_arg<const void>(k);
        p.cos_sin_cache = ptr_arg<const void>(cos_sin_cache);
        p.out_q = ptr_arg<void>(out_q);
        p.out_k = ptr_arg<void>(out_k);
        p.num_tokens = num_tokens;
        p.max_positions = max_positions;
        p.heads_q = heads_q;
        p.heads_k = heads_k;
        p.head_dim = head_dim;
        p.rotary_dim = rotary_dim;
        p.positions_stride = positions_stride;
        p.q_stride_token = stride_arg(q_strides, 0);
        p.q_stride_head = stride_arg(q_strides, 1);
        p.k_stride_token = stride_arg(k_strides, 0);
        p.k_stride_head = stride_arg(k_strides, 1);
        p.is_neox = is_neox;
        rotary_embedding(p, dtype, cache_dtype, positions_int64, stream);
      },
      "Rotate q and k into dense outputs (raw pointers; use ember.ops.rotary_embedding)");
  m.def(
      "rotary_embedding_and_store_kvcache",
      [](intptr_t positions, intptr_t q, intptr_t k, intptr_t v, intptr_t cos_sin_cache,
         intptr_t slot_mapping, intptr_t k_scale, intptr_t v_scale, intptr_t out_q,
         intptr_t k_cache, intptr_t v_cache, int64_t num_tokens, int heads_q, int heads_kv,
         int head_dim, int rotary_dim, int64_t max_positions, int64_t num_blocks,
         int64_t block_size, int64_t positions_stride, int64_t slot_stride, py::tuple q_strides,
         py::tuple k_strides, py::tuple v_strides, py::tuple kc_strides, py::tuple vc_strides,
         bool is_neox, bool positions_int64, int dtype, int cos_sin_dtype, int cache_dtype,
         intptr_t stream) {
        RotaryStoreKVCacheParams p{};
        p.positions = ptr_arg<const void>(positions);
        p.q = ptr_arg<const void>(q);
        p.k = ptr_arg<const void>(k);
        p.v = ptr_arg<const void>(v);
        p.cos_sin_cache = ptr_arg<const void>(cos_sin_cache);
        p.slot_mapping = ptr_arg<const int64_t>(slot_mapping);
        p.k_scale = ptr_arg<const float>(k_scale);
        p.v_scale = ptr_arg<const float>(v_scale);
        p.out_q = ptr_arg<void>(out_q);
        p.k_cache = ptr_arg<void>(k_cache);
        p.v_cache = ptr_arg<void>(v_cache);
        p.num_tokens = num_tokens;
        p.max_positions = max_positions;
        p.num_blocks = num_blocks;
        p.block_size = block_size;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.head_dim = head_dim;
        p.rotary_dim = rotary_dim;
        p.positions_stride = positions_stride;
        p.slot_stride = slot_stride;
        p.q_stride_token = stride_arg(q_strides, 0);
        p.q_stride_head = stride_arg(q_strides, 1);
        set_cache_write_strides(p, k_strides, v_strides, kc_strides, vc_strides);
        p.is_neox = is_neox;
        rotary_embedding_and_store_kvcache(p, dtype, cos_sin_dtype, cache_dtype, positions_int64,
                                           stream);
      },
      "Rotate q into a dense output and write the rotated k and v into a paged cache (raw "
      "pointers; use ember.ops.rotary_embedding_and_store_kvcache)");
}

}  // namespace ember
