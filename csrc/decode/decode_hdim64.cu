// flash_attn_with_kvcache, head_dim 64: both warp layouts, fp16/bf16 queries, 16-bit or fp8
// caches (tile shapes and stage counts follow from DecodeConfig).
#include "decode/decode_attention_kernel.cuh"

namespace ember {

void run_decode_hdim64(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream) {
  decode::run_decode_hdim<64>(p, dtype, fp8, stream);
}

}  // namespace ember
