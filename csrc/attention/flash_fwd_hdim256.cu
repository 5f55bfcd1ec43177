// FlashAttention-2 forward, head_dim 256: tile choice and instantiation (fp16, bf16).
//
// 128 x 32 tiles, 8 warps of 16 Q rows each: O alone is 128 floats per thread. Shared memory:
// Q 64 KB + 2 stages x (K 16 KB + V 16 KB) = 128 KB, within the opt-in limit of sm_80 (163 KB)
// and sm_90 (227 KB).
#include "attention/flash_fwd_kernel.cuh"

namespace ember {

void run_flash_fwd_hdim256(const FlashFwdParams& p, int dtype, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn", [&] {
    flash::launch_flash_fwd<flash::FwdConfig<scalar_t, 256, 128, 32, 8, false>>(p, stream);
  });
}

}  // namespace ember
