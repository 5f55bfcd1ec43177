// Python bindings of the decode family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "common/binding_args.h"
#include "decode/decode_attention.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_decode(py::module_& m) {
  m.def(
      "decode_tile_shape",
      [](int head_dim, int packed_rows, bool fp8, bool wide) {
        const DecodeTileShape s = decode_tile_shape(head_dim, packed_rows, fp8, wide);
        return py::make_tuple(s.block_m, s.block_n);
      },
      "(block_m, block_n) of the flash_attn_with_kvcache kernel for a head dim, "
      "(heads_q / heads_kv) * seqlen_q packed query rows, a 16-bit (fp8=False) or fp8 cache and "
      "narrow or wide tiles (equal where the kernel has one width)");

  m.def(
      "flash_attn_with_kvcache",
      [](intptr_t q, intptr_t k_cache, intptr_t v_cache, intptr_t seqlens_k, intptr_t block_table,
         intptr_t tree_mask, intptr_t k_scale, intptr_t v_scale, intptr_t out, intptr_t lse,
         intptr_t out_part, intptr_t lse_part, intptr_t split_counters, int batch, int seqlen_q,
         int heads_q, int heads_kv, int head_dim, int num_splits, int unsplit_tiles,
         int page_size, int max_blocks,
         int capacity, py::tuple q_strides, py::tuple k_strides, py::tuple v_strides,
         py::tuple out_strides, py::tuple lse_strides, py::tuple part_strides,
         py::tuple lse_part_strides,
         double softmax_scale, int window_left, int window_right, int dtype, int cache_dtype,
         bool wide_tiles, py::object new_token, intptr_t stream) {
        DecodeParams p{};
        p.q = ptr_arg<const void>(q);
        p.k_cache = ptr_arg<const void>(k_cache);
        p.v_cache = ptr_arg<const void>(v_cache);
        p.seqlens_k = ptr_arg<const int>(seqlens_k);
        p.block_table = ptr_arg<const int>(block_table);
        p.tree_mask = ptr_arg<const uint8_t>(tree_mask);
        p.k_scale = ptr_arg<const float>(k_scale);
        p.v_scale = ptr_arg<const float>(v_scale);
        p.out = ptr_arg<void>(out);
        p.lse = ptr_arg<float>(lse);
        p.out_part = ptr_arg<float>(out_part);
        p.lse_part = ptr_arg<float>(lse_part);
        p.split_counters = ptr_arg<int>(split_counters);
        p.batch = batch;
        p.seqlen_q = seqlen_q;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.head_dim = head_dim;
        p.num_splits = num_splits;
        p.unsplit_tiles = unsplit_tiles;
        set_page_size(p, page_size);
        p.max_blocks = max_blocks;
        p.capacity = capacity;
        // (batch, row, head) strides in elements; for a paged cache, (block, slot, head).
        set_attention_strides(p, q_strides, k_strides, v_strides, out_strides, lse_strides);
        // (split, batch, row, head) and (split, batch, head); ignored with one split.
        p.part_split_stride = stride_arg(part_strides, 0);
        p.part_batch_stride = stride_arg(part_strides, 1);
        p.part_row_stride = stride_arg(part_strides, 2);
        p.part_head_stride = stride_arg(part_strides, 3);
        p.lse_part_split_stride = stride_arg(lse_part_strides, 0);
        p.lse_part_batch_stride = stride_arg(lse_part_strides, 1);
        p.lse_part_head_stride = stride_arg(lse_part_strides, 2);
        p.softmax_scale = static_cast<float>(softmax_scale);
        p.window_left = window_left;
        p.window_right = window_right;
        p.wide_tiles = wide_tiles;
        if (!new_token.is_none()) {
          // (new_k, new_v, (k batch, k head, v batch, v head strides), rotary_cos, rotary_sin,
          //  (cos, sin row strides), rotary_dim, rotary_rows, interleaved, float cos/sin)
          const py::tuple t = new_token.cast<py::tuple>();
          p.new_k = ptr_arg<const void>(t[0].cast<intptr_t>());
          p.new_v = ptr_arg<const void>(t[1].cast<intptr_t>());
          const py::tuple new_strides = t[2].cast<py::tuple>();
          p.new_k_batch_stride = stride_arg(new_strides, 0);
          p.new_k_head_stride = stride_arg(new_strides, 1);
          p.new_v_batch_stride = stride_arg(new_strides, 2);
          p.new_v_head_stride = stride_arg(new_strides, 3);
          p.rotary_cos = ptr_arg<const void>(t[3].cast<intptr_t>());
          p.rotary_sin = ptr_arg<const void>(t[4].cast<intptr_t>());
          const py::tuple rotary_strides = t[5].cast<py::tuple>();
          p.rotary_cos_stride = stride_arg(rotary_strides, 0);
          p.rotary_sin_stride = stride_arg(rotary_strides, 1);
          p.rotary_dim = t[6].cast<int>();
          p.rotary_rows = t[7].cast<int>();
          p.rotary_interleaved = t[8].cast<bool>();
          p.rotary_float = t[9].cast<bool>();
        }
        flash_attn_with_kvcache(p, dtype, cache_dtype, stream);
      },
      "Decode/append attention over a contiguous or paged KV cache, split-KV when num_splits > 1 "
      "(raw pointers; use ember.ops.flash_attn_with_kvcache)");

  m.def(
      "merge_attn_states",
      [](intptr_t out_a, intptr_t lse_a, intptr_t out_b, intptr_t lse_b, intptr_t out,
         intptr_t lse, int tokens, int heads, int head_dim, py::tuple a_strides,
         py::tuple b_strides, py::tuple out_strides, int64_t lse_a_head_stride,
         int64_t lse_b_head_stride, int64_t lse_head_stride, int dtype, intptr_t stream) {
        // [tokens, heads, d] rows with (token, head) strides; lse [heads, tokens]. One "batch".
        const StateRows<const void> a{ptr_arg<const void>(out_a), ptr_arg<const float>(lse_a), 0,
                                      stride_arg(a_strides, 0), stride_arg(a_strides, 1), 0,
                                      lse_a_head_stride};
        const StateRows<const void> b{ptr_arg<const void>(out_b), ptr_arg<const float>(lse_b), 0,
                                      stride_arg(b_strides, 0), stride_arg(b_strides, 1), 0,
                                      lse_b_head_stride};
        const StateRows<void> o{ptr_arg<void>(out), ptr_arg<float>(lse), 0,
                                stride_arg(out_strides, 0), stride_arg(out_strides, 1), 0,
                                lse_head_stride};
        merge_attn_states(a, b, o, 1, tokens, heads, head_dim, dtype, stream);
      },
      "Merge two attention states by their LSE (raw pointers; use ember.ops.merge_attn_states)");
}

}  // namespace ember
