// Python bindings of the attention family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cmath>

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
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.out = reinterpret_cast<void*>(out);
        p.lse = reinterpret_cast<float*>(lse);
        p.cu_seqlens_q = reinterpret_cast<const int*>(cu_seqlens_q);
        p.cu_seqlens_k = reinterpret_cast<const int*>(cu_seqlens_k);
        p.batch = batch;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.seqlen_q = seqlen_q;
        p.seqlen_k = seqlen_k;
        p.head_dim = head_dim;
        // (batch, row, head) strides in elements; batch strides are 0 in varlen mode.
        p.q_batch_stride = q_strides[0].cast<int64_t>();
        p.q_row_stride = q_strides[1].cast<int64_t>();
        p.q_head_stride = q_strides[2].cast<int64_t>();
        p.k_batch_stride = k_strides[0].cast<int64_t>();
        p.k_row_stride = k_strides[1].cast<int64_t>();
        p.k_head_stride = k_strides[2].cast<int64_t>();
        p.v_batch_stride = v_strides[0].cast<int64_t>();
        p.v_row_stride = v_strides[1].cast<int64_t>();
        p.v_head_stride = v_strides[2].cast<int64_t>();
        p.o_batch_stride = out_strides[0].cast<int64_t>();
        p.o_row_stride = out_strides[1].cast<int64_t>();
        p.o_head_stride = out_strides[2].cast<int64_t>();
        p.lse_batch_stride = lse_strides[0].cast<int64_t>();
        p.lse_head_stride = lse_strides[1].cast<int64_t>();
        p.softmax_scale = static_cast<float>(softmax_scale);
        p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
        p.window_left = window_left;
        p.window_right = window_right;
        flash_attn_fwd(p, dtype, stream);
      },
      "FlashAttention-2 forward, batch or varlen (raw pointers; use ember.ops.flash_attn_func)");
}

}  // namespace ember
