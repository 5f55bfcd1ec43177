// Python bindings of the kvcache family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "common/binding_args.h"
#include "kvcache/store_kvcache.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_kvcache(py::module_& m) {
  m.def(
      "store_kvcache",
      [](intptr_t k, intptr_t v, intptr_t k_cache, intptr_t v_cache, intptr_t slot_mapping,
         intptr_t k_scale, intptr_t v_scale, int64_t num_tokens, int64_t num_heads,
         int64_t head_dim, int64_t block_size, py::tuple k_strides, py::tuple v_strides,
         py::tuple kc_strides, py::tuple vc_strides, int input_dtype, int cache_dtype,
         intptr_t stream) {
        StoreKVCacheParams p{};
        p.k = ptr_arg<const void>(k);
        p.v = ptr_arg<const void>(v);
        p.k_cache = ptr_arg<void>(k_cache);
        p.v_cache = ptr_arg<void>(v_cache);
        p.slot_mapping = ptr_arg<const int64_t>(slot_mapping);
        p.k_scale = ptr_arg<const float>(k_scale);
        p.v_scale = ptr_arg<const float>(v_scale);
        p.num_tokens = num_tokens;
        p.num_heads = num_heads;
        p.head_dim = head_dim;
        p.block_size = block_size;
        set_cache_write_strides(p, k_strides, v_strides, kc_strides, vc_strides);
        store_kvcache(p, input_dtype, cache_dtype, stream);
      },
      "Scatter K/V rows into a paged cache (raw pointers; use ember.ops.store_kvcache)");
}

}  // namespace ember
