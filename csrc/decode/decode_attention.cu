// flash_attn_with_kvcache: checks the launch-level arguments and dispatches on the head dim.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/common.h"
#include "decode/decode_attention.h"
#include "decode/decode_attention_kernel.cuh"

namespace ember {

DecodeTileShape decode_tile_shape(int head_dim, int packed_rows, bool fp8, bool wide) {
  // The tile shape depends on the cache's element size, not on q's type: read it off the fp16
  // configs.
  const bool decode_layout = decode::decode_warps_m(packed_rows) == 1;
  auto shape = [&](auto head_dim_tag, auto fp8_tag) -> DecodeTileShape {
    constexpr int kD = decltype(head_dim_tag)::value;
    constexpr bool kF = decltype(fp8_tag)::value;
    using One = decode::DecodeConfig<__half, kD, 1, kF>;
    using Wide = decode::DecodeConfig<__half, kD, 1, kF, true>;
    using Four = decode::DecodeConfig<__half, kD, 4, kF>;
    if (!decode_layout) return DecodeTileShape{Four::kBlockM, Four::kBlockN};
    return wide ? DecodeTileShape{Wide::kBlockM, Wide::kBlockN}
                : DecodeTileShape{One::kBlockM, One::kBlockN};
  };
  auto for_dim = [&](auto head_dim_tag) {
    return fp8 ? shape(head_dim_tag, std::true_type{}) : shape(head_dim_tag, std::false_type{});
  };
  switch (head_dim) {
    case 64: return for_dim(std::integral_constant<int, 64>{});
    case 96: return for_dim(std::integral_constant<int, 96>{});
    case 128: return for_dim(std::integral_constant<int, 128>{});
    case 256: return for_dim(std::integral_constant<int, 256>{});
    default:
      throw std::invalid_argument(
          "ember: flash_attn_with_kvcache: head_dim must be 64, 96, 128 or 256, got " +
          std::to_string(head_dim));
  }
}

void flash_attn_with_kvcache(const DecodeParams& p, int dtype, int cache_dtype,
                             std::intptr_t stream) {
  // Python validates shapes and values; these guard the kernel's own assumptions.
  const std::string op = "ember: flash_attn_with_kvcache: ";
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    throw std::invalid_argument(op + "heads_q (" + std::to_string(p.heads_q) +
                                ") must be a multiple of heads_kv (" + std::to_string(p.heads_kv) +
                                ")");
  }
  if (p.batch > 65535 || p.heads_kv > 65535) {  // grid.z and grid.y
    throw std::invalid_argument(op + "at most 65535 sequences and 65535 kv heads");
  }
  if (p.num_splits < 1) throw std::invalid_argument(op + "num_splits must be >= 1");
  if (p.unsplit_tiles < 0) throw std::invalid_argument(op + "unsplit_tiles must be >= 0");
  if (p.num_splits > 1 &&
      (p.out_part == nullptr || p.lse_part == nullptr || p.split_counters == nullptr)) {
    throw std::invalid_argument(op + "num_splits > 1 needs the out_part/lse_part/split_counters "
                                     "workspace");
  }
  if (p.block_table != nullptr && (p.page_size < 16 || p.page_size % 16 != 0)) {
    throw std::invalid_argument(op + "page size must be a positive multiple of 16, got " +
                                std::to_string(p.page_size));
  }
  // The kernel forms a cache row's offset as a 32 x 32 -> 64-bit product (load_kv_tile), and a
  // paged cache block's.
  constexpr int64_t kMaxRowStride = INT32_MAX;
  if (p.k_row_stride < 0 || p.k_row_stride > kMaxRowStride || p.v_row_stride < 0 ||
      p.v_row_stride > kMaxRowStride) {
    throw std::invalid_argument(op + "k_cache and v_cache need a row stride (dim 1) in [0, 2^31), "
                                     "got " + std::to_string(p.k_row_stride) + " and " +
                                std::to_string(p.v_row_stride));
  }
  // A paged cache's block offset likewise (dim 0: one block of page_size rows).
  if (p.block_table != nullptr &&
      (p.k_batch_stride < 0 || p.k_batch_stride > kMaxRowStride || p.v_batch_stride < 0 ||
       p.v_batch_stride > kMaxRowStride)) {
    throw std::invalid_argument(op + "paged k_cache and v_cache need a block stride (dim 0) in "
                                     "[0, 2^31), got " + std::to_string(p.k_batch_stride) +
                                " and " + std::to_string(p.v_batch_stride));
  }
  const bool fp8 = static_cast<DType>(cache_dtype) == DType::kFloat8E4M3;
  if (!fp8 && cache_dtype != dtype) {
    unsupported_dtype("flash_attn_with_kvcache(cache)", cache_dtype);
  }
  if (fp8 && (p.k_scale == nullptr || p.v_scale == nullptr)) {
    throw std::invalid_argument(op + "fp8 caches need k_scale and v_scale");
  }
  if (p.new_k != nullptr) {
    if (p.seqlen_q != 1 || p.new_v == nullptr) {
      throw std::invalid_argument(op + "a new token in the kernel needs seqlen_q == 1 and new_v");
    }
    if (p.rotary_cos != nullptr &&
        (p.rotary_sin == nullptr || p.rotary_rows < 1 || p.rotary_dim < 2 ||
         p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim)) {
      throw std::invalid_argument(op + "rotary needs rotary_sin, at least one row and an even "
                                       "rotary_dim <= head_dim");
    }
  } else if (p.rotary_cos != nullptr) {
    throw std::invalid_argument(op + "rotary applies to a new token: pass new_k");
  }
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0) return;  // nothing to write

  const cudaStream_t s = as_stream(stream);
  switch (p.head_dim) {
    case 64: run_decode_hdim64(p, dtype, fp8, s); break;
    case 96: run_decode_hdim96(p, dtype, fp8, s); break;
    case 128: run_decode_hdim128(p, dtype, fp8, s); break;
    case 256: run_decode_hdim256(p, dtype, fp8, s); break;
    default:
      throw std::invalid_argument(op + "head_dim must be 64, 96, 128 or 256, got " +
                                  std::to_string(p.head_dim));
  }
}

}  // namespace ember
