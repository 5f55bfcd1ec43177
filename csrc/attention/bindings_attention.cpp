// Python bindings of the attention family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cmath>

#include "common/binding_args.h"
#include "attention/flash_fwd.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_attention(py::module_& m) {
  m.def(
      "flash_attn_fwd",
      [](intptr_t q, intptr_t k, intptr_t v, intptr_t out, intptr_t lse, intptr_t cu_seqlens_q,
         intptr_t cu_seqlens_k, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_k,
         int head_dim, py::tuple q_strides, py::tuple k_strides, py::tuple v_strides,
         py::tuple out_strides, py::tuple lse_strides, double softmax_scale, int window_left,
         int window_right, int dtype, intptr_t stream) {
        FlashFwdParams p{};
        p.q = ptr_arg<const void>(q);
        p.k = ptr_arg<const void>(k);
        p.v = ptr_arg<const void>(v);
        p.out = ptr_arg<void>(out);
        p.lse = ptr_arg<float>(lse);
        p.cu_seqlens_q = ptr_arg<const int>(cu_seqlens_q);
        p.cu_seqlens_k = ptr_arg<const int>(cu_seqlens_k);
        p.batch = batch;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.seqlen_q = seqlen_q;
        p.seqlen_k = seqlen_k;
        p.head_dim = head_dim;
        // (batch, row, head) strides in elements; batch strides are 0 in varlen mode.
        set_attention_strides(p, q_strides, k_strides, v_strides, out_strides, lse_strides);
        p.softmax_scale = static_cast<float>(softmax_scale);
        p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
        p.window_left = window_left;
        p.window_right = window_right;
        flash_attn_fwd(p, dtype, stream);
      },
      "FlashAttention-2 forward, batch or varlen (raw pointers; use ember.ops.flash_attn_func)");
}

}  // namespace ember
