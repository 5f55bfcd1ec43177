// FlashAttention-2 forward, head_dim 128: tile choice and instantiation (fp16, bf16).
//
// 128 x 64 tiles, 4 warps of 32 Q rows each (FlashAttention-2's choice on A100/H100); Q fragments
// re-read from shared memory per K tile, since O (128) + S (64) floats per thread already use
// most of the 255 registers. 32 rows per warp halve the shared-memory bytes per MMA compared
// with 16. Shared memory: Q 32 KB + 2 stages x (K 16 KB + V 16 KB) = 96 KB, so two CTAs fit
// an H100 SM (one on an A100).
#include "attention/flash_fwd_kernel.cuh"

namespace ember {

void run_flash_fwd_hdim128(const FlashFwdParams& p, int dtype, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn", [&] {
    flash::launch_flash_fwd<flash::FwdConfig<scalar_t, 128, 128, 64, 4, false>>(p, stream);
  });
}

}  // namespace ember
